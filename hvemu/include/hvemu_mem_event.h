/*
 * hvemu_mem_event.h -- the ring page of an hvemu domain, for daemons written in C.
 *
 * The layout is Xen's mem_event_sring as the seed patch knew it: the
 * public/mem_event.h of Nov 2011 - Feb 2012, with a u16 `type` and a u16
 * `flags`.  Xen 4.2.0 as released merged the two into one u32 `flags` and
 * dropped `type`: a daemon compiled against 4.2.0's mem_event.h builds
 * cleanly here and then misreads every flag.  Use this header (or the same
 * layout) for a domain created with the default ABI.
 *
 * The ring macros below are written for this one ring type and behave as
 * those of Xen 4.2's public/io/ring.h, pitfalls included:
 *   - SHARED_RING_INIT zeroes the indices: only the hypervisor initialises a
 *     ring (at enable).  A daemon calling it on a live ring hides the
 *     requests outstanding; hvemu then crashes the domain, reason logged.
 *   - BACK_RING_ATTACH sets req_cons = req_prod: on a re-attach it skips
 *     every request a dead daemon left unanswered.  Re-attach with
 *     HVEMU_BACK_RING_REATTACH (consume from rsp_prod) instead.
 *   - BACK_RING_INIT/ATTACH(..., PAGE_SIZE) sizes the ring as 64 slots.  A
 *     domain may have a smaller ring (the hypervisor says how many slots):
 *     pass HVEMU_RING_BYTES(slots) as the size.  A daemon that writes past
 *     the last slot of a smaller ring gets its domain crashed, reason logged.
 *
 * Independent of Xen's headers: no Xen code is copied here.
 */
#ifndef HVEMU_MEM_EVENT_H
#define HVEMU_MEM_EVENT_H

#include <stddef.h>
#include <stdint.h>

/* ---- mem_event_st ---------------------------------------------------------- */

#define MEM_EVENT_TYPE_SHARED 0
#define MEM_EVENT_TYPE_PAGING 1
#define MEM_EVENT_TYPE_ACCESS 2

#define MEM_EVENT_FLAG_VCPU_PAUSED (1 << 0)
#define MEM_EVENT_FLAG_DROP_PAGE (1 << 1)
#define MEM_EVENT_FLAG_EVICT_FAIL (1 << 2)
#define MEM_EVENT_FLAG_FOREIGN (1 << 3)
#define MEM_EVENT_FLAG_DUMMY (1 << 4)

#define MEM_EVENT_REASON_UNKNOWN 0
#define MEM_EVENT_REASON_VIOLATION 1
#define MEM_EVENT_REASON_CR0 2
#define MEM_EVENT_REASON_CR3 3
#define MEM_EVENT_REASON_CR4 4
#define MEM_EVENT_REASON_INT3 5
#define MEM_EVENT_REASON_SINGLESTEP 6

/* Xen's p2m_type_t (RELEASE-4.2.0 numbers): the bytes of the shared p2m table. */
enum hvemu_p2m_type {
    p2m_ram_rw = 0,
    p2m_invalid = 1,
    p2m_ram_logdirty = 2,
    p2m_ram_ro = 3,
    p2m_mmio_dm = 4,
    p2m_mmio_direct = 5,
    p2m_populate_on_demand = 6,
    p2m_grant_map_rw = 7,
    p2m_grant_map_ro = 8,
    p2m_ram_paging_out = 9,
    p2m_ram_paged = 10,
    p2m_ram_paging_in = 11,
    p2m_ram_shared = 12,
    p2m_ram_broken = 13,
};

typedef struct mem_event_st {
    uint16_t type;
    uint16_t flags;
    uint32_t vcpu_id;
    uint64_t gfn;
    uint64_t offset;
    uint64_t gla;
    uint32_t p2mt;
    uint16_t access_r : 1;
    uint16_t access_w : 1;
    uint16_t access_x : 1;
    uint16_t gla_valid : 1;
    uint16_t available : 12;
    uint16_t reason;
} mem_event_request_t, mem_event_response_t;

_Static_assert(sizeof(mem_event_request_t) == 40, "mem_event_st is 40 bytes");

/* ---- the shared ring and its back end -------------------------------------- */

typedef uint32_t RING_IDX;

union mem_event_sring_entry {
    mem_event_request_t req;
    mem_event_response_t rsp;
};

typedef struct mem_event_sring {
    RING_IDX req_prod, req_event;
    RING_IDX rsp_prod, rsp_event;
    uint8_t pad[48];
    union mem_event_sring_entry ring[1]; /* as many as fit, rounded down to a power of two */
} mem_event_sring_t;

typedef struct mem_event_back_ring {
    RING_IDX rsp_prod_pvt;
    RING_IDX req_cons;
    unsigned int nr_ents;
    mem_event_sring_t *sring;
} mem_event_back_ring_t;

_Static_assert(offsetof(mem_event_sring_t, ring) == 64, "ring[] starts at byte 64");

/* Bytes of a ring with exactly n slots (n a power of two): the size to pass to
 * BACK_RING_INIT / BACK_RING_ATTACH for a domain whose ring is smaller than a page. */
#define HVEMU_RING_BYTES(n) (offsetof(mem_event_sring_t, ring) + (n) * sizeof(union mem_event_sring_entry))

/* The largest power of two <= x (x > 0, 32 bits). */
static inline unsigned int hvemu_round_down_pow2(unsigned long x)
{
    unsigned int p = 1;
    while ((unsigned long)p * 2 <= x)
        p *= 2;
    return x ? p : 0;
}

/* Slots of a ring in _sz bytes of page: __RING_SIZE. */
#define __RING_SIZE(_s, _sz) \
    hvemu_round_down_pow2(((_sz) - offsetof(mem_event_sring_t, ring)) / sizeof((_s)->ring[0]))

#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)

#define SHARED_RING_INIT(_s)                                                   \
    do {                                                                       \
        (_s)->req_prod = (_s)->rsp_prod = 0;                                   \
        (_s)->req_event = (_s)->rsp_event = 1;                                 \
        for (size_t __i = 0; __i < sizeof((_s)->pad); __i++)                   \
            (_s)->pad[__i] = 0;                                                \
    } while (0)

#define BACK_RING_INIT(_r, _s, __size)                                         \
    do {                                                                       \
        (_r)->rsp_prod_pvt = 0;                                                \
        (_r)->req_cons = 0;                                                    \
        (_r)->nr_ents = __RING_SIZE(_s, __size);                               \
        (_r)->sring = (_s);                                                    \
    } while (0)

/* As Xen's: consumes from req_prod, i.e. treats every published request as seen. */
#define BACK_RING_ATTACH(_r, _s, __size)                                       \
    do {                                                                       \
        (_r)->sring = (_s);                                                    \
        (_r)->rsp_prod_pvt = (_s)->rsp_prod;                                   \
        (_r)->req_cons = (_s)->req_prod;                                       \
        (_r)->nr_ents = __RING_SIZE(_s, __size);                               \
    } while (0)

/* hvemu's re-attach: every request after rsp_prod is unanswered, serve them again. */
#define HVEMU_BACK_RING_REATTACH(_r, _s, __size)                               \
    do {                                                                       \
        BACK_RING_ATTACH(_r, _s, __size);                                      \
        (_r)->req_cons = (_r)->rsp_prod_pvt;                                   \
    } while (0)

#define RING_SIZE(_r) ((_r)->nr_ents)

#define RING_HAS_UNCONSUMED_REQUESTS(_r)                                       \
    ({                                                                         \
        unsigned int __req = (_r)->sring->req_prod - (_r)->req_cons;           \
        unsigned int __rsp = RING_SIZE(_r) - ((_r)->req_cons - (_r)->rsp_prod_pvt); \
        __req < __rsp ? __req : __rsp;                                         \
    })

#define RING_GET_REQUEST(_r, _idx) (&((_r)->sring->ring[((_idx) & (RING_SIZE(_r) - 1))].req))
#define RING_GET_RESPONSE(_r, _idx) (&((_r)->sring->ring[((_idx) & (RING_SIZE(_r) - 1))].rsp))

#define RING_REQUEST_CONS_OVERFLOW(_r, _cons) (((_cons) - (_r)->rsp_prod_pvt) >= RING_SIZE(_r))
/* A front end that published more than RING_SIZE unanswered requests. */
#define RING_REQUEST_PROD_OVERFLOW(_r, _prod) (((RING_IDX)((_prod) - (_r)->rsp_prod_pvt)) > RING_SIZE(_r))

#define RING_PUSH_RESPONSES(_r)                                                \
    do {                                                                       \
        wmb(); /* the responses before the index */                           \
        (_r)->sring->rsp_prod = (_r)->rsp_prod_pvt;                            \
    } while (0)

#define RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(_r, _notify)                      \
    do {                                                                       \
        RING_IDX __old = (_r)->sring->rsp_prod;                                \
        RING_IDX __new = (_r)->rsp_prod_pvt;                                   \
        wmb(); /* the responses before the index */                           \
        (_r)->sring->rsp_prod = __new;                                         \
        mb(); /* the index before reading rsp_event */                         \
        (_notify) = ((RING_IDX)(__new - (_r)->sring->rsp_event) < (RING_IDX)(__new - __old)); \
    } while (0)

#define RING_FINAL_CHECK_FOR_REQUESTS(_r, _work_to_do)                         \
    do {                                                                       \
        (_work_to_do) = RING_HAS_UNCONSUMED_REQUESTS(_r);                      \
        if (_work_to_do)                                                       \
            break;                                                             \
        (_r)->sring->req_event = (_r)->req_cons + 1;                           \
        mb();                                                                  \
        (_work_to_do) = RING_HAS_UNCONSUMED_REQUESTS(_r);                      \
    } while (0)

#endif /* HVEMU_MEM_EVENT_H */
