/* hvemu_glue.h -- what hvemu's drop-in Xen libraries share (libxenhvemu.so.1).
 *
 * The drop-in libxenctrl, libxenevtchn, libxenstore and libxentoollog reach
 * the hypervisor of $HVEMU_RUN_DIR (default: as hvemu's own tools find it):
 *
 *  - domctls go through an agent, `python -m hvemu.toolstack.xentools.agent`, started
 *    once per process on first use with one end of a SOCK_SEQPACKET socket
 *    pair: one request per datagram (a text line, for `load` followed by the
 *    page), one reply per datagram ("ok ..." or "ERRNO message"), file
 *    descriptors (ring page, event channel, guest memory) beside the reply
 *    with SCM_RIGHTS.  The agent holds the control connection, so a ring
 *    enabled through it belongs to this process and is orphaned (kept for a
 *    successor) if the process dies.
 *  - xenstore is spoken directly, in xenstored's wire protocol, on
 *    $HVEMU_RUN_DIR/xenstored.sock.
 *  - event channels are hvemu's: the fd the agent received with a ring.
 */
#ifndef HVEMU_GLUE_H
#define HVEMU_GLUE_H

#include <stddef.h>
#include <stdint.h>

#define HVEMU_EXPORT __attribute__((visibility("default")))
#define HVEMU_PAGE 4096u
#define HVEMU_MAX_FDS 4

/* One request to the agent.  Returns 0 and fills reply (after "ok", NUL-terminated) and the fds, or -1 with
 * errno set from the agent's errno name (the message goes to stderr when HVEMU_DEBUG is set). */
HVEMU_EXPORT int hvemu_call(const char *line, const void *data, size_t data_len, char *reply, size_t reply_len,
                            int *fds, int *nfds);
/* Like hvemu_call, but the binary payload after the reply line is copied to out (out_len bytes at most). */
HVEMU_EXPORT int hvemu_call_data(const char *line, char *reply, size_t reply_len, void *out, size_t out_len);
/* The run directory: $HVEMU_RUN_DIR, else $XDG_RUNTIME_DIR/hvemu-<uid>, else /tmp/hvemu-<uid>. */
HVEMU_EXPORT const char *hvemu_run_dir(void);
/* One line on stderr for an operation hvemu does not model; sets errno = EOPNOTSUPP. */
HVEMU_EXPORT void hvemu_unsupported(const char *function, const char *why);
HVEMU_EXPORT int hvemu_errno_of(const char *name);

/* Event-channel fds received with rings, for libxenevtchn's bind_interdomain (one per (domid, port)). */
HVEMU_EXPORT void hvemu_evtchn_offer(uint32_t domid, uint32_t port, int fd);
/* A dup of the offered fd, or -1 with errno = ENOENT. */
HVEMU_EXPORT int hvemu_evtchn_claim(uint32_t domid, uint32_t port);

/* Guest memory fds received with rings: foreign mappings of that domain's pages share its memory. */
HVEMU_EXPORT void hvemu_memory_offer(uint32_t domid, int fd, uint64_t gfns);
HVEMU_EXPORT int hvemu_memory_fd(uint32_t domid, uint64_t *gfns);

/* Where a mapping of a ring pfn was placed (the ring page replaces it when the ring is enabled). */
HVEMU_EXPORT void hvemu_ring_placeholder_set(uint32_t domid, int ring, void *addr);
HVEMU_EXPORT void *hvemu_ring_placeholder_get(uint32_t domid, int ring);

/* What xc_map_foreign_pages needs to know about a paging ring this process enabled (see xenctrl.c). */
struct hvemu_paging_ring {
    volatile uint32_t *sring;    /* the ring page's indices: req_prod, req_event, rsp_prod, rsp_event */
    const volatile uint8_t *p2m; /* the domain's p2m types, one byte per gfn (read-only) */
    uint64_t gfns;
    uint32_t slots, max_vcpus;
};
HVEMU_EXPORT void hvemu_paging_ring_set(uint32_t domid, const struct hvemu_paging_ring *info);
HVEMU_EXPORT void hvemu_paging_ring_clear(uint32_t domid);
HVEMU_EXPORT int hvemu_paging_ring_get(uint32_t domid, struct hvemu_paging_ring *info);

#endif
