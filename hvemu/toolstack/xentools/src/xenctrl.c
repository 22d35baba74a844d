/* xenctrl.c -- hvemu's drop-in libxenctrl.so.4.17: what xenpaging and xen-access of Xen 4.17 call.
 *
 * Every function keeps Xen's signature and return convention (0 or a count on
 * success, -1 with errno on failure; pointers NULL with errno).  Domctls go to
 * the hypervisor through the agent (hvemu_glue.h).  What hvemu does not model
 * (altp2m, cpuid, descriptor access, debug exceptions, in-guest pagefaults,
 * emulation) fails with EOPNOTSUPP and one line on stderr, as Xen answers when
 * a feature is unavailable.
 *
 * Where the ring page lives: hvemu's hypervisor allocates each ring page
 * itself and hands its fd over when the ring is enabled.  The HVM params
 * HVM_PARAM_{PAGING,MONITOR,SHARING}_RING_PFN name the special pfns Xen's HVM
 * builder uses (0xfefff, 0xfeffe, 0xfeffd: special_pfn(0..2)); mapping one of
 * them before its ring is enabled (xenpaging does) gives a zero placeholder
 * page, which the enable replaces in place (MAP_FIXED) by the real ring page,
 * so the address the tool holds maps the ring.  Populating or removing a ring
 * pfn from the physmap succeeds and changes nothing.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "hvemu_glue.h"
#include "xentoollog.h"

typedef unsigned long xen_pfn_t;
typedef int xenmem_access_t;

typedef struct xc_interface_core {
    xentoollog_logger *logger;
    int own_logger;
} xc_interface;

/* struct xen_domctl_getdomaininfo of Xen 4.17 (XEN_DOMCTL_INTERFACE_VERSION 0x15), 112 bytes. */
typedef struct {
    uint16_t domain;
    uint16_t pad1;
    uint32_t flags;
    uint64_t tot_pages;
    uint64_t max_pages;
    uint64_t outstanding_pages;
    uint64_t shr_pages;
    uint64_t paged_pages;
    uint64_t shared_info_frame;
    uint64_t cpu_time;
    uint32_t nr_online_vcpus;
    uint32_t max_vcpu_id;
    uint32_t ssidref;
    uint8_t handle[16];
    uint32_t cpupool;
    uint8_t gpaddr_bits;
    uint8_t pad2[7];
    uint32_t emulation_flags;
    uint32_t misc_flags;
} xc_domaininfo_t;
_Static_assert(sizeof(xc_domaininfo_t) == 112, "xen_domctl_getdomaininfo is 112 bytes");
_Static_assert(__builtin_offsetof(xc_domaininfo_t, handle) == 76, "handle at 76");

#define XEN_DOMINF_dying (1u << 0)
#define XEN_DOMINF_hvm_guest (1u << 1)
#define XEN_DOMINF_shutdown (1u << 2)
#define XEN_DOMINF_paused (1u << 3)
#define XEN_DOMINF_running (1u << 5)
#define XEN_DOMINF_hap (1u << 8)
#define XEN_DOMINF_shutdownshift 16
#define SHUTDOWN_crash 3

#define HVM_PARAM_PAGING_RING_PFN 27
#define HVM_PARAM_MONITOR_RING_PFN 28
#define HVM_PARAM_SHARING_RING_PFN 29
/* special_pfn(x) = 0xff000 - 1 - x, as Xen's HVM domain builder places the ring pages. */
#define RING_PFN(i) (0xff000ul - 1ul - (unsigned long)(i))
enum { RING_PAGING, RING_ACCESS, RING_SHARING, RINGS };
static const char *const ring_names[RINGS] = {"paging", "access", "sharing"};

#define X86_TRAP_INT3 3
#define XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_OFF 0
#define XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_ON 1
#define VM_EVENT_X86_CR0 0
#define VM_EVENT_X86_CR3 1
#define VM_EVENT_X86_CR4 2
/* hvemu's HVM_PARAM_MEMORY_EVENT_* reasons and modes (hvemu/abi.py). */
#define HVEMU_REASON_CR0 2
#define HVEMU_REASON_CR3 3
#define HVEMU_REASON_CR4 4
#define HVEMU_REASON_INT3 5
#define HVMPME_MODE_DISABLED 0
#define HVMPME_MODE_ASYNC 1
#define HVMPME_MODE_SYNC 2
#define HVMPME_ONCHANGEONLY 4

#define BATCH 4096 /* gfns per agent request */
#define MAP_CHUNK 64

static void xc_log(xc_interface *xch, xentoollog_level level, int errnoval, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void xc_log(xc_interface *xch, xentoollog_level level, int errnoval, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (xch && xch->logger)
        xch->logger->vmessage(xch->logger, level, errnoval, "xc", fmt, ap);
    va_end(ap);
}

static int ring_of_pfn(unsigned long pfn)
{
    for (int i = 0; i < RINGS; i++)
        if (pfn == RING_PFN(i))
            return i;
    return -1;
}

/* ------------------------------------------------------------------ interface */

HVEMU_EXPORT xc_interface *xc_interface_open(xentoollog_logger *logger, xentoollog_logger *dombuild_logger,
                                             unsigned open_flags)
{
    (void)dombuild_logger;
    (void)open_flags;
    xc_interface *xch = calloc(1, sizeof(*xch));
    if (!xch)
        return NULL;
    xch->logger = logger;
    if (!logger) {
        xch->logger = (xentoollog_logger *)xtl_createlogger_stdiostream(stderr, XTL_PROGRESS, 0);
        xch->own_logger = 1;
    }
    char reply[256];
    if (hvemu_call("hello", NULL, 0, reply, sizeof(reply), NULL, NULL) < 0) {
        int saved = errno;
        xc_log(xch, XTL_CRITICAL, saved, "cannot reach the hvemu hypervisor of %s", hvemu_run_dir());
        if (xch->own_logger)
            xtl_logger_destroy(xch->logger);
        free(xch);
        errno = saved;
        return NULL;
    }
    return xch;
}

HVEMU_EXPORT int xc_interface_close(xc_interface *xch)
{
    if (!xch)
        return 0;
    if (xch->own_logger)
        xtl_logger_destroy(xch->logger);
    free(xch);
    return 0;
}

/* ------------------------------------------------------------------ domains */

HVEMU_EXPORT int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain, unsigned int max_domains,
                                       xc_domaininfo_t *info)
{
    (void)xch;
    char line[64], reply[8192];
    snprintf(line, sizeof(line), "getinfo %u %u", first_domain, max_domains);
    if (hvemu_call(line, NULL, 0, reply, sizeof(reply), NULL, NULL) < 0)
        return -1;
    char *p = reply, *end;
    unsigned long n = strtoul(p, &end, 10);
    p = end;
    for (unsigned long i = 0; i < n && i < max_domains; i++) {
        unsigned long domid, tot, max, paged, vcpus, crashed, paused;
        char handle[40] = "";
        int used = 0;
        if (sscanf(p, " %lu %lu %lu %lu %lu %lu %lu %39s%n", &domid, &tot, &max, &paged, &vcpus, &crashed,
                   &paused, handle, &used) != 8) {
            errno = EIO;
            return -1;
        }
        p += used;
        xc_domaininfo_t *d = &info[i];
        memset(d, 0, sizeof(*d));
        d->domain = (uint16_t)domid;
        d->flags = XEN_DOMINF_hvm_guest | XEN_DOMINF_hap | (paused ? XEN_DOMINF_paused : XEN_DOMINF_running);
        if (crashed)
            d->flags |= XEN_DOMINF_shutdown | (SHUTDOWN_crash << XEN_DOMINF_shutdownshift);
        d->tot_pages = tot;
        d->max_pages = max;
        d->paged_pages = paged;
        d->nr_online_vcpus = (uint32_t)vcpus;
        d->max_vcpu_id = (uint32_t)vcpus - 1;
        d->gpaddr_bits = 52;
        for (int k = 0; k < 16 && handle[2 * k] && handle[2 * k + 1]; k++) {
            unsigned v;
            sscanf(handle + 2 * k, "%2x", &v);
            d->handle[k] = (uint8_t)v;
        }
    }
    return (int)(n < max_domains ? n : max_domains);
}

HVEMU_EXPORT int xc_domain_maximum_gpfn(xc_interface *xch, uint32_t domid, xen_pfn_t *gpfns)
{
    (void)xch;
    char line[64], reply[64];
    snprintf(line, sizeof(line), "maxgpfn %u", domid);
    if (hvemu_call(line, NULL, 0, reply, sizeof(reply), NULL, NULL) < 0)
        return -1;
    *gpfns = strtoul(reply, NULL, 10);
    return 0;
}

HVEMU_EXPORT int xc_get_hvm_param(xc_interface *xch, uint32_t dom, int param, unsigned long *value)
{
    (void)xch;
    (void)dom;
    switch (param) {
    case HVM_PARAM_PAGING_RING_PFN:
        *value = RING_PFN(RING_PAGING);
        return 0;
    case HVM_PARAM_MONITOR_RING_PFN:
        *value = RING_PFN(RING_ACCESS);
        return 0;
    case HVM_PARAM_SHARING_RING_PFN:
        *value = RING_PFN(RING_SHARING);
        return 0;
    }
    hvemu_unsupported("xc_get_hvm_param", "only the ring pfn params exist");
    return -1;
}

static int ring_pfns_only(const char *fn, unsigned long nr, unsigned int order, const xen_pfn_t *pfns)
{
    if (order) {
        hvemu_unsupported(fn, "extents larger than a page");
        return -1;
    }
    for (unsigned long i = 0; i < nr; i++)
        if (ring_of_pfn(pfns[i]) < 0) {
            hvemu_unsupported(fn, "only the ring pages' pfns (the guest balloons its own memory)");
            return -1;
        }
    return 0;
}

HVEMU_EXPORT int xc_domain_populate_physmap_exact(xc_interface *xch, uint32_t domid, unsigned long nr_extents,
                                                  unsigned int extent_order, unsigned int mem_flags,
                                                  xen_pfn_t *extent_start)
{
    (void)xch;
    (void)domid;
    (void)mem_flags;
    return ring_pfns_only("xc_domain_populate_physmap_exact", nr_extents, extent_order, extent_start);
}

HVEMU_EXPORT int xc_domain_decrease_reservation_exact(xc_interface *xch, uint32_t domid, unsigned long nr_extents,
                                                      unsigned int extent_order, xen_pfn_t *extent_start)
{
    (void)xch;
    (void)domid;
    return ring_pfns_only("xc_domain_decrease_reservation_exact", nr_extents, extent_order, extent_start);
}

/* ------------------------------------------------------------------ foreign mappings */

static int map_chunk(uint32_t dom, const xen_pfn_t *arr, int num, int memfd, uint8_t *dst, int *err)
{
    char line[64 + MAP_CHUNK * 21], reply[64 + MAP_CHUNK * 12];
    int n = snprintf(line, sizeof(line), "map %u %s", dom, memfd >= 0 ? "shared" : "copy");
    for (int i = 0; i < num; i++)
        n += snprintf(line + n, sizeof(line) - (size_t)n, " %lu", arr[i]);
    uint8_t *pages = NULL; /* the copies, when the pages cannot be shared (threads may map at once) */
    if (memfd < 0 && !(pages = malloc((size_t)num * HVEMU_PAGE)))
        return -1;
    if (hvemu_call_data(line, reply, sizeof(reply), pages, pages ? (size_t)num * HVEMU_PAGE : 0) < 0) {
        free(pages);
        return -1;
    }
    char *p = reply;
    for (int i = 0; i < num; i++) {
        while (*p == ' ')
            p++;
        if (*p == '0' && (p[1] == ' ' || !p[1])) {
            err[i] = 0;
            if (memfd < 0)
                memcpy(dst + (size_t)i * HVEMU_PAGE, pages + (size_t)i * HVEMU_PAGE, HVEMU_PAGE);
        } else {
            err[i] = hvemu_errno_of(p);
        }
        p += strcspn(p, " ");
    }
    free(pages);
    return 0;
}

/* A foreign mapping of a paged-out gfn makes the hypervisor put a populate request on the paging ring.
 * Under the seed's rule a foreign request that finds the ring full is lost (EAGAIN), and the gfn stays
 * on its way in with no request for the pager: xenpaging's page-in thread maps up to 64 gfns at a time on
 * an 8-slot ring, and would then wait for those pages for ever.  So when this process holds the domain's
 * paging ring, a gfn the p2m shows paged (or nominated) is mapped alone, once the ring has more free
 * slots than the domain has vCPUs plus one (each vCPU has at most one request outstanding, one slot is
 * left for one other foreign mapper's populate, so the request will find a slot; with more vCPUs than
 * that the ring must be empty).  The bound is read from the ring page: the hypervisor sets rsp_event = rsp_cons + 1
 * whenever it consumes a response, so slots - (req_prod - (rsp_event - 1)) never exceeds its free count. */
#define P2M_PAGING_OUT 9
#define P2M_PAGED 10
#define WAIT_FOR_SLOT_NS (30ll * 1000000000ll)

/* Gfns this process nominated and has not evicted yet.  Xen maps a nominated page's frame even once the
 * guest touched it (ram_paging_in with the frame still there: PV dom0's mmu_update refuses only
 * ram_paged), and xenpaging copies a page out between its nominate and its evict: an ENOENT there is
 * fatal to it.  hvemu's MapForeign answers ENOENT for every ram_paging_in gfn (a prepared frame may be
 * half filled), so the library maps a gfn it nominated straight from guest memory, which the guest
 * cannot write since the nominate; the evict then fails with EBUSY if the guest touched it, as on Xen. */
#define NOMINATED_MAX 64
static pthread_mutex_t nominated_lock = PTHREAD_MUTEX_INITIALIZER;
static struct { uint32_t domid; uint64_t gfn; } nominated[NOMINATED_MAX];
static int n_nominated;

static void nominated_set(uint32_t domid, uint64_t gfn, int on)
{
    pthread_mutex_lock(&nominated_lock);
    for (int i = 0; i < n_nominated; i++)
        if (nominated[i].domid == domid && nominated[i].gfn == gfn) {
            if (!on)
                nominated[i] = nominated[--n_nominated];
            pthread_mutex_unlock(&nominated_lock);
            return;
        }
    if (on) {
        if (n_nominated == NOMINATED_MAX) { /* the oldest goes: a pager evicts what it nominates */
            memmove(nominated, nominated + 1, sizeof(nominated[0]) * (NOMINATED_MAX - 1));
            n_nominated--;
        }
        nominated[n_nominated].domid = domid;
        nominated[n_nominated].gfn = gfn;
        n_nominated++;
    }
    pthread_mutex_unlock(&nominated_lock);
}

static int is_nominated(uint32_t domid, uint64_t gfn)
{
    int yes = 0;
    pthread_mutex_lock(&nominated_lock);
    for (int i = 0; i < n_nominated && !yes; i++)
        yes = nominated[i].domid == domid && nominated[i].gfn == gfn;
    pthread_mutex_unlock(&nominated_lock);
    return yes;
}

static int populates(const struct hvemu_paging_ring *ring, xen_pfn_t gfn)
{
    if (!ring || gfn >= ring->gfns)
        return 0;
    uint8_t t = ring->p2m[gfn];
    return t == P2M_PAGING_OUT || t == P2M_PAGED;
}

static void wait_for_slot(const struct hvemu_paging_ring *ring)
{
    struct timespec nap = {0, 1000000};
    for (long long waited = 0; waited < WAIT_FOR_SLOT_NS; waited += nap.tv_nsec) {
        uint32_t req_prod = __atomic_load_n(&ring->sring[0], __ATOMIC_ACQUIRE);
        uint32_t rsp_event = __atomic_load_n(&ring->sring[3], __ATOMIC_ACQUIRE);
        uint32_t used = req_prod - (rsp_event - 1u);
        uint32_t margin = ring->max_vcpus + 1u < ring->slots ? ring->max_vcpus + 1u : ring->slots - 1u;
        if (used < ring->slots && ring->slots - used > margin)
            return;
        nanosleep(&nap, NULL);
    }
}

HVEMU_EXPORT void *xc_map_foreign_pages(xc_interface *xch, uint32_t dom, int prot, const xen_pfn_t *arr, int num)
{
    (void)xch;
    if (num <= 0 || !arr) {
        errno = EINVAL;
        return NULL;
    }
    if (num == 1 && ring_of_pfn(arr[0]) >= 0) {
        /* A ring pfn: a placeholder page, replaced in place by the ring page when the ring is enabled. */
        void *page = mmap(NULL, HVEMU_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (page == MAP_FAILED)
            return NULL;
        hvemu_ring_placeholder_set(dom, ring_of_pfn(arr[0]), page);
        return page;
    }
    uint64_t gfns = 0;
    int memfd = hvemu_memory_fd(dom, &gfns);
    struct hvemu_paging_ring ring_info;
    const struct hvemu_paging_ring *ring = hvemu_paging_ring_get(dom, &ring_info) ? &ring_info : NULL;
    size_t size = (size_t)num * HVEMU_PAGE;
    uint8_t *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    int *err = calloc((size_t)num, sizeof(int));
    if (!err) {
        munmap(base, size);
        return NULL;
    }
    for (int i = 0; i < num;) {
        int k = 0;
        if (memfd >= 0 && arr[i] < gfns && is_nominated(dom, arr[i])) {
            err[i++] = 0; /* mapped from guest memory below */
            continue;
        }
        if (populates(ring, arr[i])) {
            wait_for_slot(ring);
            k = 1;
        } else {
            while (i + k < num && k < MAP_CHUNK && !populates(ring, arr[i + k]) &&
                   !(memfd >= 0 && arr[i + k] < gfns && is_nominated(dom, arr[i + k])))
                k++;
        }
        if (map_chunk(dom, arr + i, k, memfd, base + (size_t)i * HVEMU_PAGE, err + i) < 0) {
            int saved = errno;
            free(err);
            munmap(base, size);
            errno = saved;
            return NULL;
        }
        i += k;
    }
    for (int i = 0; i < num; i++) {
        if (err[i]) {
            errno = err[i];
            free(err);
            munmap(base, size);
            return NULL;
        }
        if (memfd >= 0 && (uint64_t)arr[i] < gfns &&
            mmap(base + (size_t)i * HVEMU_PAGE, HVEMU_PAGE, prot ? prot : PROT_READ, MAP_SHARED | MAP_FIXED, memfd,
                 (off_t)arr[i] * HVEMU_PAGE) == MAP_FAILED) {
            int saved = errno;
            free(err);
            munmap(base, size);
            errno = saved;
            return NULL;
        }
    }
    free(err);
    if (memfd < 0 && !(prot & PROT_WRITE))
        mprotect(base, size, prot ? prot : PROT_READ);
    return base;
}

/* ------------------------------------------------------------------ vm_event rings */

static void *ring_enable(xc_interface *xch, uint32_t domid, int ring, uint32_t *port)
{
    if (!port) {
        errno = EINVAL;
        return NULL;
    }
    char line[64], reply[256];
    int fds[HVEMU_MAX_FDS], nfds = HVEMU_MAX_FDS;
    snprintf(line, sizeof(line), "enable %u %s", domid, ring_names[ring]);
    if (hvemu_call(line, NULL, 0, reply, sizeof(reply), fds, &nfds) < 0) {
        xc_log(xch, XTL_ERROR, errno, "enabling the %s ring of domain %u", ring_names[ring], domid);
        return NULL;
    }
    unsigned long p = 0, gfns = 0, slots = 0, vcpus = 0;
    if (nfds != 4 || sscanf(reply, "%lu %lu %lu %lu", &p, &gfns, &slots, &vcpus) != 4) {
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
        errno = EIO;
        return NULL;
    }
    void *where = hvemu_ring_placeholder_get(domid, ring);
    void *page = mmap(where, HVEMU_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | (where ? MAP_FIXED : 0), fds[0], 0);
    int saved = errno;
    close(fds[0]);
    if (page == MAP_FAILED) {
        close(fds[1]);
        close(fds[2]);
        close(fds[3]);
        errno = saved;
        return NULL;
    }
    if (ring == RING_PAGING) {
        void *p2m = mmap(NULL, gfns, PROT_READ, MAP_SHARED, fds[3], 0);
        if (p2m != MAP_FAILED) {
            struct hvemu_paging_ring info = {page, p2m, gfns, (uint32_t)slots, (uint32_t)vcpus};
            hvemu_paging_ring_set(domid, &info);
        }
    }
    close(fds[3]);
    hvemu_ring_placeholder_set(domid, ring, page);
    hvemu_evtchn_offer(domid, (uint32_t)p, fds[1]);
    hvemu_memory_offer(domid, fds[2], gfns);
    *port = (uint32_t)p;
    return page;
}

static int ring_disable(uint32_t domid, int ring)
{
    char line[64];
    struct hvemu_paging_ring info;
    if (ring == RING_PAGING && hvemu_paging_ring_get(domid, &info)) {
        hvemu_paging_ring_clear(domid);
        munmap((void *)info.p2m, info.gfns);
    }
    snprintf(line, sizeof(line), "disable %u %s", domid, ring_names[ring]);
    return hvemu_call(line, NULL, 0, NULL, 0, NULL, NULL);
}

static int ring_resume(uint32_t domid, int ring)
{
    char line[64];
    snprintf(line, sizeof(line), "resume %u %s", domid, ring_names[ring]);
    return hvemu_call(line, NULL, 0, NULL, 0, NULL, NULL);
}

HVEMU_EXPORT int xc_mem_paging_enable(xc_interface *xch, uint32_t domain_id, uint32_t *port)
{
    return ring_enable(xch, domain_id, RING_PAGING, port) ? 0 : -1;
}

HVEMU_EXPORT int xc_mem_paging_disable(xc_interface *xch, uint32_t domain_id)
{
    (void)xch;
    return ring_disable(domain_id, RING_PAGING);
}

HVEMU_EXPORT int xc_mem_paging_resume(xc_interface *xch, uint32_t domain_id)
{
    (void)xch;
    return ring_resume(domain_id, RING_PAGING);
}

static int one_gfn(const char *op, uint32_t domid, uint64_t gfn, const void *page)
{
    char line[96], reply[64];
    snprintf(line, sizeof(line), "%s %u %" PRIu64, op, domid, gfn);
    if (hvemu_call(line, page, page ? HVEMU_PAGE : 0, reply, sizeof(reply), NULL, NULL) < 0)
        return -1;
    if (strcmp(reply, "0")) { /* the per-gfn result */
        errno = hvemu_errno_of(reply);
        return -1;
    }
    return 0;
}

HVEMU_EXPORT int xc_mem_paging_nominate(xc_interface *xch, uint32_t domain_id, uint64_t gfn)
{
    (void)xch;
    int rc = one_gfn("nominate", domain_id, gfn, NULL);
    if (rc == 0)
        nominated_set(domain_id, gfn, 1);
    return rc;
}

HVEMU_EXPORT int xc_mem_paging_evict(xc_interface *xch, uint32_t domain_id, uint64_t gfn)
{
    (void)xch;
    nominated_set(domain_id, gfn, 0);
    return one_gfn("evict", domain_id, gfn, NULL);
}

HVEMU_EXPORT int xc_mem_paging_prep(xc_interface *xch, uint32_t domain_id, uint64_t gfn)
{
    (void)xch;
    return one_gfn("prep", domain_id, gfn, NULL);
}

HVEMU_EXPORT int xc_mem_paging_load(xc_interface *xch, uint32_t domain_id, uint64_t gfn, void *buffer)
{
    (void)xch;
    if (!buffer) {
        errno = EINVAL;
        return -1;
    }
    return one_gfn("load", domain_id, gfn, buffer);
}

HVEMU_EXPORT void *xc_monitor_enable(xc_interface *xch, uint32_t domain_id, uint32_t *port)
{
    return ring_enable(xch, domain_id, RING_ACCESS, port);
}

HVEMU_EXPORT int xc_monitor_disable(xc_interface *xch, uint32_t domain_id)
{
    (void)xch;
    return ring_disable(domain_id, RING_ACCESS);
}

HVEMU_EXPORT int xc_monitor_resume(xc_interface *xch, uint32_t domain_id)
{
    (void)xch;
    return ring_resume(domain_id, RING_ACCESS);
}

/* ------------------------------------------------------------------ mem_access and monitor events */

HVEMU_EXPORT int xc_set_mem_access(xc_interface *xch, uint32_t domain_id, xenmem_access_t access,
                                   uint64_t first_pfn, uint32_t nr)
{
    (void)xch;
    char line[128], reply[64];
    if (first_pfn == ~0ull) { /* the p2m's default access */
        snprintf(line, sizeof(line), "access %u %d default", domain_id, access);
        return hvemu_call(line, NULL, 0, reply, sizeof(reply), NULL, NULL);
    }
    for (uint64_t done = 0; done < nr;) {
        uint64_t k = nr - done < BATCH ? nr - done : BATCH;
        snprintf(line, sizeof(line), "access %u %d %" PRIu64 " %" PRIu64, domain_id, access, first_pfn + done, k);
        if (hvemu_call(line, NULL, 0, reply, sizeof(reply), NULL, NULL) < 0)
            return -1;
        done += k;
    }
    return 0;
}

HVEMU_EXPORT int xc_get_mem_access(xc_interface *xch, uint32_t domain_id, uint64_t pfn, xenmem_access_t *access)
{
    (void)xch;
    char line[96], reply[64];
    if (pfn == ~0ull)
        snprintf(line, sizeof(line), "getaccess %u default", domain_id);
    else
        snprintf(line, sizeof(line), "getaccess %u %" PRIu64, domain_id, pfn);
    if (hvemu_call(line, NULL, 0, reply, sizeof(reply), NULL, NULL) < 0)
        return -1;
    *access = atoi(reply);
    return 0;
}

HVEMU_EXPORT int xc_domain_set_access_required(xc_interface *xch, uint32_t domid, unsigned int required)
{
    (void)xch;
    char line[64];
    snprintf(line, sizeof(line), "access-required %u %u", domid, required ? 1u : 0u);
    return hvemu_call(line, NULL, 0, NULL, 0, NULL, NULL);
}

static int hvm_param_masked(uint32_t domid, int reason, int mode, uint64_t mask)
{
    char line[96];
    snprintf(line, sizeof(line), "hvm-param %u %d %d %llu", domid, reason, mode, (unsigned long long)mask);
    return hvemu_call(line, NULL, 0, NULL, 0, NULL, NULL);
}

static int hvm_param(uint32_t domid, int reason, int mode)
{
    char line[64];
    snprintf(line, sizeof(line), "hvm-param %u %d %d", domid, reason, mode);
    return hvemu_call(line, NULL, 0, NULL, 0, NULL, NULL);
}

HVEMU_EXPORT int xc_monitor_software_breakpoint(xc_interface *xch, uint32_t domain_id, bool enable)
{
    (void)xch;
    return hvm_param(domain_id, HVEMU_REASON_INT3, enable ? HVMPME_MODE_SYNC : HVMPME_MODE_DISABLED);
}

HVEMU_EXPORT int xc_monitor_write_ctrlreg(xc_interface *xch, uint32_t domain_id, uint16_t index, bool enable,
                                          bool sync, uint64_t bitmask, bool onchangeonly)
{
    (void)xch;
    int reason;
    switch (index) {
    case VM_EVENT_X86_CR0: reason = HVEMU_REASON_CR0; break;
    case VM_EVENT_X86_CR3: reason = HVEMU_REASON_CR3; break;
    case VM_EVENT_X86_CR4: reason = HVEMU_REASON_CR4; break;
    default:
        hvemu_unsupported("xc_monitor_write_ctrlreg", "only CR0, CR3 and CR4 are modelled");
        return -1;
    }
    int mode = !enable ? HVMPME_MODE_DISABLED : (sync ? HVMPME_MODE_SYNC : HVMPME_MODE_ASYNC);
    if (enable && onchangeonly)
        mode |= HVMPME_ONCHANGEONLY;
    /* bitmask: bits whose changes alone send no event (Xen's write_ctrlreg_mask; xen-access masks CR4.PGE). */
    return hvm_param_masked(domain_id, reason, mode, enable ? bitmask : 0);
}

/* Single steps are reported by each vCPU put in single-step mode (xc_domain_debug_control): enabling the
 * monitor event is accepted as is. */
HVEMU_EXPORT int xc_monitor_singlestep(xc_interface *xch, uint32_t domain_id, bool enable)
{
    (void)xch;
    (void)enable;
    char line[64];
    snprintf(line, sizeof(line), "maxgpfn %u", domain_id); /* the domain must exist */
    return hvemu_call(line, NULL, 0, NULL, 0, NULL, NULL);
}

HVEMU_EXPORT int xc_domain_debug_control(xc_interface *xch, uint32_t domid, uint32_t sop, uint32_t vcpu)
{
    (void)xch;
    if (sop != XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_ON && sop != XEN_DOMCTL_DEBUG_OP_SINGLE_STEP_OFF) {
        hvemu_unsupported("xc_domain_debug_control", "only SINGLE_STEP_ON/OFF");
        return -1;
    }
    char line[64];
    snprintf(line, sizeof(line), "debug %u %u %u", domid, vcpu, sop);
    return hvemu_call(line, NULL, 0, NULL, 0, NULL, NULL);
}

HVEMU_EXPORT int xc_hvm_inject_trap(xc_interface *xch, uint32_t domid, int vcpu, uint8_t vector, uint8_t type,
                                    uint32_t error_code, uint8_t insn_len, uint64_t cr2)
{
    (void)xch;
    (void)type;
    (void)error_code;
    (void)insn_len;
    (void)cr2;
    char line[64];
    snprintf(line, sizeof(line), "inject %u %d %u", domid, vcpu, vector);
    return hvemu_call(line, NULL, 0, NULL, 0, NULL, NULL);
}

/* ------------------------------------------------------------------ not modelled */

#define UNSUPPORTED(ret, name, why, ...)                                                                       \
    HVEMU_EXPORT ret name(__VA_ARGS__)                                                                          \
    {                                                                                                          \
        hvemu_unsupported(#name, why);                                                                         \
        return -1;                                                                                             \
    }

UNSUPPORTED(int, xc_altp2m_set_domain_state, "altp2m", xc_interface *h, uint32_t d, bool s)
UNSUPPORTED(int, xc_altp2m_create_view, "altp2m", xc_interface *h, uint32_t d, xenmem_access_t a, uint16_t *v)
UNSUPPORTED(int, xc_altp2m_destroy_view, "altp2m", xc_interface *h, uint32_t d, uint16_t v)
UNSUPPORTED(int, xc_altp2m_switch_to_view, "altp2m", xc_interface *h, uint32_t d, uint16_t v)
UNSUPPORTED(int, xc_altp2m_set_mem_access, "altp2m", xc_interface *h, uint32_t d, uint16_t v, xen_pfn_t g,
            xenmem_access_t a)
UNSUPPORTED(int, xc_monitor_cpuid, "CPUID exits", xc_interface *h, uint32_t d, bool e)
UNSUPPORTED(int, xc_monitor_descriptor_access, "descriptor table accesses", xc_interface *h, uint32_t d, bool e)
UNSUPPORTED(int, xc_monitor_debug_exceptions, "debug exceptions", xc_interface *h, uint32_t d, bool e, bool s)
UNSUPPORTED(int, xc_monitor_emul_unimplemented, "instruction emulation", xc_interface *h, uint32_t d, bool e)
UNSUPPORTED(int, xc_monitor_inguest_pagefault, "in-guest pagefaults", xc_interface *h, uint32_t d, bool e)
UNSUPPORTED(int, xc_monitor_privileged_call, "privileged calls (SMC)", xc_interface *h, uint32_t d, bool e)
