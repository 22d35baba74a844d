/* xenevtchn.c -- hvemu's drop-in libxenevtchn.so.1 over hvemu's event channels.
 *
 * An hvemu event channel is a SOCK_SEQPACKET socket whose 4-byte little-endian
 * messages each mean "port P is pending" (hvemu/evtchn.py).  The channel of a
 * ring arrives with the ring (xc_mem_paging_enable, xc_monitor_enable); binding
 * to (domid, remote port) takes a duplicate of it.  The local port is the
 * remote port's number.  xenevtchn_fd is an epoll fd over every bound channel
 * (pollable like /dev/xen/evtchn); xenevtchn_pending drains one channel and
 * returns its port (several notifies are one event, as Xen's pending bit);
 * unmask has nothing to do.  Unbound ports and VIRQs are not modelled.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hvemu_glue.h"

typedef uint32_t evtchn_port_t;
typedef int xenevtchn_port_or_error_t;
struct xentoollog_logger;

#define MAX_BOUND 64

typedef struct xenevtchn_handle {
    int epfd;
    int n;
    struct { evtchn_port_t port; int fd; } bound[MAX_BOUND];
} xenevtchn_handle;

HVEMU_EXPORT xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags)
{
    (void)logger;
    (void)flags;
    xenevtchn_handle *xce = calloc(1, sizeof(*xce));
    if (!xce)
        return NULL;
    xce->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (xce->epfd < 0) {
        free(xce);
        return NULL;
    }
    return xce;
}

HVEMU_EXPORT int xenevtchn_close(xenevtchn_handle *xce)
{
    if (!xce)
        return 0;
    for (int i = 0; i < xce->n; i++)
        close(xce->bound[i].fd);
    close(xce->epfd);
    free(xce);
    return 0;
}

HVEMU_EXPORT int xenevtchn_fd(xenevtchn_handle *xce)
{
    return xce->epfd;
}

static int find(xenevtchn_handle *xce, evtchn_port_t port)
{
    for (int i = 0; i < xce->n; i++)
        if (xce->bound[i].port == port)
            return i;
    errno = EINVAL;
    return -1;
}

HVEMU_EXPORT xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                                  evtchn_port_t remote_port)
{
    if (xce->n == MAX_BOUND) {
        errno = ENOSPC;
        return -1;
    }
    if (find(xce, remote_port) >= 0) {
        errno = EEXIST;
        return -1;
    }
    int fd = hvemu_evtchn_claim(domid, remote_port);
    if (fd < 0)
        return -1; /* ENOENT: no ring of this process has that channel */
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = remote_port};
    if (epoll_ctl(xce->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    xce->bound[xce->n].port = remote_port;
    xce->bound[xce->n].fd = fd;
    xce->n++;
    return (xenevtchn_port_or_error_t)remote_port;
}

HVEMU_EXPORT xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid)
{
    (void)xce;
    (void)domid;
    hvemu_unsupported("xenevtchn_bind_unbound_port", "unbound ports");
    return -1;
}

HVEMU_EXPORT xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *xce, unsigned int virq)
{
    (void)xce;
    (void)virq;
    hvemu_unsupported("xenevtchn_bind_virq", "virtual IRQs");
    return -1;
}

HVEMU_EXPORT int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port)
{
    int i = find(xce, port);
    if (i < 0)
        return -1;
    epoll_ctl(xce->epfd, EPOLL_CTL_DEL, xce->bound[i].fd, NULL);
    close(xce->bound[i].fd);
    xce->bound[i] = xce->bound[--xce->n];
    return 0;
}

HVEMU_EXPORT int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port)
{
    int i = find(xce, port);
    if (i < 0)
        return -1;
    uint8_t msg[4] = {(uint8_t)port, (uint8_t)(port >> 8), (uint8_t)(port >> 16), (uint8_t)(port >> 24)};
    if (send(xce->bound[i].fd, msg, sizeof(msg), MSG_DONTWAIT | MSG_NOSIGNAL) < 0 && errno != EAGAIN)
        return errno == EPIPE || errno == ECONNRESET || errno == ECONNREFUSED ? 0 : -1;
    return 0;
}

HVEMU_EXPORT xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce)
{
    struct epoll_event ev;
    int n;
    do
        n = epoll_wait(xce->epfd, &ev, 1, -1);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        return -1;
    int i = find(xce, ev.data.u32);
    if (i < 0)
        return -1;
    uint8_t buf[16];
    int got_any = 0;
    for (;;) {
        ssize_t r = recv(xce->bound[i].fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (r > 0) {
            got_any = 1;
            continue;
        }
        if (r == 0) { /* the hypervisor closed the channel: the ring is gone */
            epoll_ctl(xce->epfd, EPOLL_CTL_DEL, xce->bound[i].fd, NULL);
            errno = ENOTCONN;
            return got_any ? (xenevtchn_port_or_error_t)ev.data.u32 : -1;
        }
        break;
    }
    return (xenevtchn_port_or_error_t)ev.data.u32;
}

HVEMU_EXPORT int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port)
{
    return find(xce, port) < 0 ? -1 : 0;
}
