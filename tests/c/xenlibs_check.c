/* xenlibs_check.c -- every function of hvemu's drop-in Xen libraries, called as Xen's tools call them.
 *
 *   xenlibs_check DOMID GFNS     (HVEMU_RUN_DIR names the hypervisor; DOMID has the vm_event ABI, no guest)
 *   xenlibs_check DOMID GFNS map 5   (afterwards, in a process without a ring: gfn 5 holds 0xab, gfn 6 zeros)
 *
 * Prints "ok <function>" for each check that held and "FAIL <function>: why" for each that did not; exits 1
 * if any failed.  The prototypes are Xen 4.17's, written here: the test links against the drop-in libraries
 * only, as a Xen tool does.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- libxentoollog.so.1 */
typedef struct xentoollog_logger xentoollog_logger;
typedef struct xentoollog_logger_stdiostream xentoollog_logger_stdiostream;
enum { XTL_NONE, XTL_DEBUG, XTL_VERBOSE, XTL_DETAIL, XTL_PROGRESS, XTL_INFO, XTL_NOTICE, XTL_WARN, XTL_ERROR };
xentoollog_logger_stdiostream *xtl_createlogger_stdiostream(FILE *f, int min_level, unsigned flags);
void xtl_log(xentoollog_logger *logger, int level, int errnoval, const char *context, const char *fmt, ...);
void xtl_logv(xentoollog_logger *logger, int level, int errnoval, const char *context, const char *fmt,
              va_list al);
void xtl_logger_destroy(xentoollog_logger *logger);
const char *xtl_level_to_string(int level);

/* ---- libxenctrl.so.4.17 */
typedef struct xc_interface_core xc_interface;
typedef unsigned long xen_pfn_t;
typedef struct {
    uint16_t domain, pad1;
    uint32_t flags;
    uint64_t tot_pages, max_pages, outstanding_pages, shr_pages, paged_pages, shared_info_frame, cpu_time;
    uint32_t nr_online_vcpus, max_vcpu_id, ssidref;
    uint8_t handle[16];
    uint32_t cpupool;
    uint8_t gpaddr_bits, pad2[7];
    uint32_t emulation_flags, misc_flags;
} xc_domaininfo_t;
xc_interface *xc_interface_open(xentoollog_logger *l, xentoollog_logger *dl, unsigned flags);
int xc_interface_close(xc_interface *xch);
int xc_domain_getinfolist(xc_interface *xch, uint32_t first, unsigned int max, xc_domaininfo_t *info);
int xc_domain_maximum_gpfn(xc_interface *xch, uint32_t domid, xen_pfn_t *gpfns);
int xc_get_hvm_param(xc_interface *xch, uint32_t dom, int param, unsigned long *value);
int xc_domain_populate_physmap_exact(xc_interface *xch, uint32_t domid, unsigned long nr, unsigned int order,
                                     unsigned int flags, xen_pfn_t *pfns);
int xc_domain_decrease_reservation_exact(xc_interface *xch, uint32_t domid, unsigned long nr, unsigned int order,
                                         xen_pfn_t *pfns);
void *xc_map_foreign_pages(xc_interface *xch, uint32_t dom, int prot, const xen_pfn_t *arr, int num);
int xc_mem_paging_enable(xc_interface *xch, uint32_t domid, uint32_t *port);
int xc_mem_paging_disable(xc_interface *xch, uint32_t domid);
int xc_mem_paging_resume(xc_interface *xch, uint32_t domid);
int xc_mem_paging_nominate(xc_interface *xch, uint32_t domid, uint64_t gfn);
int xc_mem_paging_evict(xc_interface *xch, uint32_t domid, uint64_t gfn);
int xc_mem_paging_prep(xc_interface *xch, uint32_t domid, uint64_t gfn);
int xc_mem_paging_load(xc_interface *xch, uint32_t domid, uint64_t gfn, void *buffer);
void *xc_monitor_enable(xc_interface *xch, uint32_t domid, uint32_t *port);
int xc_monitor_disable(xc_interface *xch, uint32_t domid);
int xc_monitor_resume(xc_interface *xch, uint32_t domid);
int xc_set_mem_access(xc_interface *xch, uint32_t domid, int access, uint64_t first, uint32_t nr);
int xc_get_mem_access(xc_interface *xch, uint32_t domid, uint64_t pfn, int *access);
int xc_domain_set_access_required(xc_interface *xch, uint32_t domid, unsigned int required);
int xc_monitor_software_breakpoint(xc_interface *xch, uint32_t domid, bool enable);
int xc_monitor_write_ctrlreg(xc_interface *xch, uint32_t domid, uint16_t index, bool enable, bool sync,
                             uint64_t bitmask, bool onchangeonly);
int xc_monitor_singlestep(xc_interface *xch, uint32_t domid, bool enable);
int xc_domain_debug_control(xc_interface *xch, uint32_t domid, uint32_t sop, uint32_t vcpu);
int xc_hvm_inject_trap(xc_interface *xch, uint32_t domid, int vcpu, uint8_t vector, uint8_t type,
                       uint32_t error_code, uint8_t insn_len, uint64_t cr2);
int xc_altp2m_set_domain_state(xc_interface *h, uint32_t d, bool s);
int xc_altp2m_create_view(xc_interface *h, uint32_t d, int a, uint16_t *v);
int xc_altp2m_destroy_view(xc_interface *h, uint32_t d, uint16_t v);
int xc_altp2m_switch_to_view(xc_interface *h, uint32_t d, uint16_t v);
int xc_altp2m_set_mem_access(xc_interface *h, uint32_t d, uint16_t v, xen_pfn_t g, int a);
int xc_monitor_cpuid(xc_interface *h, uint32_t d, bool e);
int xc_monitor_descriptor_access(xc_interface *h, uint32_t d, bool e);
int xc_monitor_debug_exceptions(xc_interface *h, uint32_t d, bool e, bool s);
int xc_monitor_emul_unimplemented(xc_interface *h, uint32_t d, bool e);
int xc_monitor_inguest_pagefault(xc_interface *h, uint32_t d, bool e);
int xc_monitor_privileged_call(xc_interface *h, uint32_t d, bool e);

/* ---- libxenevtchn.so.1 */
typedef struct xenevtchn_handle xenevtchn_handle;
xenevtchn_handle *xenevtchn_open(xentoollog_logger *logger, unsigned int flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, uint32_t port);
int xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid, uint32_t remote_port);
int xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid);
int xenevtchn_bind_virq(xenevtchn_handle *xce, unsigned int virq);
int xenevtchn_unbind(xenevtchn_handle *xce, uint32_t port);
int xenevtchn_pending(xenevtchn_handle *xce);
int xenevtchn_unmask(xenevtchn_handle *xce, uint32_t port);

/* ---- libxenstore.so.4 */
struct xs_handle;
struct xs_handle *xs_open(unsigned long flags);
void xs_close(struct xs_handle *h);
void xs_daemon_close(struct xs_handle *h);
int xs_fileno(struct xs_handle *h);
void *xs_read(struct xs_handle *h, uint32_t t, const char *path, unsigned int *len);
bool xs_write(struct xs_handle *h, uint32_t t, const char *path, const void *data, unsigned int len);
bool xs_rm(struct xs_handle *h, uint32_t t, const char *path);
char **xs_directory(struct xs_handle *h, uint32_t t, const char *path, unsigned int *num);
bool xs_watch(struct xs_handle *h, const char *path, const char *token);
bool xs_unwatch(struct xs_handle *h, const char *path, const char *token);
char **xs_read_watch(struct xs_handle *h, unsigned int *num);
char *xs_get_domain_path(struct xs_handle *h, unsigned int domid);
bool xs_is_domain_introduced(struct xs_handle *h, unsigned int domid);

/* ------------------------------------------------------------------ */

static int failures;
static uint32_t dom;
static unsigned long gfns;

static void check(const char *fn, int cond, const char *fmt, ...)
{
    if (cond) {
        printf("ok %s\n", fn);
    } else {
        va_list ap;
        va_start(ap, fmt);
        printf("FAIL %s: ", fn);
        vprintf(fmt, ap);
        printf(" (errno %d %s)\n", errno, strerror(errno));
        va_end(ap);
        failures++;
    }
    fflush(stdout);
}

static int readable(int fd, int ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, ms) == 1 && (p.revents & POLLIN);
}

static void toollog(void)
{
    FILE *f = tmpfile();
    xentoollog_logger *lg = (xentoollog_logger *)xtl_createlogger_stdiostream(f, XTL_WARN, 0);
    check("xtl_createlogger_stdiostream", lg != NULL, "no logger");
    xtl_log(lg, XTL_DEBUG, -1, "ctx", "quiet %d", 1);
    xtl_log(lg, XTL_ERROR, ENOENT, "ctx", "loud %d", 2);
    char buf[256] = "";
    rewind(f);
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = '\0';
    check("xtl_log", !strcmp(buf, "ctx: error: loud 2: No such file or directory\n"), "wrote [%s]", buf);
    check("xtl_logv", !strstr(buf, "quiet"), "a debug line passed a warning logger");
    check("xtl_level_to_string", !strcmp(xtl_level_to_string(XTL_WARN), "warning"), "warn is %s",
          xtl_level_to_string(XTL_WARN));
    xtl_logger_destroy(lg);
    check("xtl_logger_destroy", 1, "");
    fclose(f);
}

static void domains(xc_interface *xch)
{
    xc_domaininfo_t info[4];
    memset(info, 0xff, sizeof(info));
    int n = xc_domain_getinfolist(xch, dom, 4, info);
    check("xc_domain_getinfolist", n >= 1 && info[0].domain == dom && info[0].max_pages == gfns &&
          info[0].tot_pages == gfns && info[0].paged_pages == 0 && info[0].nr_online_vcpus == 1,
          "n=%d domain=%u max=%lu tot=%lu", n, info[0].domain, (unsigned long)info[0].max_pages,
          (unsigned long)info[0].tot_pages);
    xen_pfn_t max = 0;
    int rc = xc_domain_maximum_gpfn(xch, dom, &max);
    check("xc_domain_maximum_gpfn", rc == 0 && max == gfns - 1, "rc=%d max=%lu", rc, max);
    errno = 0;
    check("xc_domain_maximum_gpfn(no domain)", xc_domain_maximum_gpfn(xch, 999, &max) < 0 && errno == ESRCH,
          "a missing domain");
    unsigned long v = 0, w = 0;
    rc = xc_get_hvm_param(xch, dom, 27 /* HVM_PARAM_PAGING_RING_PFN */, &v);
    int rc2 = xc_get_hvm_param(xch, dom, 28 /* HVM_PARAM_MONITOR_RING_PFN */, &w);
    check("xc_get_hvm_param", rc == 0 && rc2 == 0 && v == 0xfefff && w == 0xfeffe, "paging %lx monitor %lx", v, w);
    errno = 0;
    check("xc_get_hvm_param(unmodelled)", xc_get_hvm_param(xch, dom, 1, &v) < 0 && errno == EOPNOTSUPP, "param 1");
    xen_pfn_t ring = 0xfefff, guest = 3;
    check("xc_domain_populate_physmap_exact", xc_domain_populate_physmap_exact(xch, dom, 1, 0, 0, &ring) == 0 &&
          xc_domain_populate_physmap_exact(xch, dom, 1, 0, 0, &guest) < 0 && errno == EOPNOTSUPP, "ring or guest");
    check("xc_domain_decrease_reservation_exact", xc_domain_decrease_reservation_exact(xch, dom, 1, 0, &ring) == 0 &&
          xc_domain_decrease_reservation_exact(xch, dom, 1, 0, &guest) < 0 && errno == EOPNOTSUPP, "ring or guest");
}

static void paging(xc_interface *xch, xenevtchn_handle *xce)
{
    xen_pfn_t ring_pfn = 0xfefff;
    volatile uint32_t *ring = xc_map_foreign_pages(xch, dom, PROT_READ | PROT_WRITE, &ring_pfn, 1);
    uint32_t port = 0;
    int rc = xc_mem_paging_enable(xch, dom, &port);
    /* SHARED_RING_INIT of the hypervisor: req_event = rsp_event = 1 -- seen through the ring pfn's mapping. */
    check("xc_mem_paging_enable", ring && rc == 0 && port > 0 && ring[1] == 1 && ring[3] == 1,
          "rc=%d port=%u req_event=%u", rc, port, ring ? ring[1] : 0);
    errno = 0;
    check("xc_mem_paging_enable(twice)", xc_mem_paging_enable(xch, dom, &port) < 0 && errno == EBUSY, "second");
    int local = xenevtchn_bind_interdomain(xce, dom, port);
    check("xenevtchn_bind_interdomain", local == (int)port, "local %d for port %u", local, port);
    errno = 0;
    check("xenevtchn_bind_interdomain(unknown)", xenevtchn_bind_interdomain(xce, dom, port + 100) < 0 &&
          errno == ENOENT, "a port no ring of ours has");

    check("xc_mem_paging_nominate", xc_mem_paging_nominate(xch, dom, 5) == 0, "gfn 5");
    xen_pfn_t g5 = 5;
    uint8_t *p = xc_map_foreign_pages(xch, dom, PROT_READ, &g5, 1);
    check("xc_map_foreign_pages(nominated)", p != NULL, "gfn 5 after nominate");
    if (p)
        munmap(p, 4096);
    check("xc_mem_paging_evict", xc_mem_paging_evict(xch, dom, 5) == 0, "gfn 5");
    xc_domaininfo_t info;
    xc_domain_getinfolist(xch, dom, 1, &info);
    check("xc_domain_getinfolist(paged)", info.tot_pages == gfns - 1 && info.paged_pages == 1, "tot %lu paged %lu",
          (unsigned long)info.tot_pages, (unsigned long)info.paged_pages);
    errno = 0;
    xen_pfn_t two[2] = {4, 5};
    p = xc_map_foreign_pages(xch, dom, PROT_READ, two, 2);
    check("xc_map_foreign_pages(paged)", p == NULL && errno == ENOENT, "gfn 5 is paged out");
    /* The populate request: a vm_event_st (400 bytes) in slot 0, after the 64-byte header. */
    const volatile uint8_t *req = (const volatile uint8_t *)ring + 64;
    uint32_t reason = *(const volatile uint32_t *)(req + 8);
    uint64_t gfn = *(const volatile uint64_t *)(req + 24);
    check("xenevtchn_fd", readable(xenevtchn_fd(xce), 10000), "no kick for the populate");
    check("xenevtchn_pending", xenevtchn_pending(xce) == (int)port && ring[0] == 1 && reason == 3 && gfn == 5,
          "req_prod %u reason %u gfn %lu", ring[0], reason, (unsigned long)gfn);
    check("xenevtchn_unmask", xenevtchn_unmask(xce, port) == 0, "unmask");
    uint8_t page[4096];
    memset(page, 0xab, sizeof(page));
    check("xc_mem_paging_load", xc_mem_paging_load(xch, dom, 5, page) == 0, "gfn 5");
    errno = 0;
    check("xc_mem_paging_load(no buffer)", xc_mem_paging_load(xch, dom, 5, NULL) < 0 && errno == EINVAL, "NULL");
    /* The response (version, flags, reason, vcpu, then u.mem_paging.gfn), pushed and announced. */
    volatile uint8_t *rsp = (volatile uint8_t *)ring + 64;
    memset((void *)rsp, 0, 400);
    *(volatile uint32_t *)rsp = 7;
    *(volatile uint32_t *)(rsp + 8) = 3;
    *(volatile uint64_t *)(rsp + 24) = 5;
    __atomic_store_n(&ring[2], 1u, __ATOMIC_SEQ_CST);
    check("xenevtchn_notify", xenevtchn_notify(xce, port) == 0, "notify");
    check("xc_mem_paging_resume", xc_mem_paging_resume(xch, dom) == 0, "resume");
    p = xc_map_foreign_pages(xch, dom, PROT_READ, &g5, 1);
    check("xc_map_foreign_pages", p && p[0] == 0xab && p[4095] == 0xab, "gfn 5 back with its bytes");
    if (p)
        munmap(p, 4096);
    xc_mem_paging_nominate(xch, dom, 6);
    xc_mem_paging_evict(xch, dom, 6);
    check("xc_mem_paging_prep", xc_mem_paging_prep(xch, dom, 6) == 0, "gfn 6");
    errno = 0;
    check("xc_mem_paging_nominate(out of range)", xc_mem_paging_nominate(xch, dom, gfns + 10) < 0 && errno,
          "gfn beyond the domain");
    check("xenevtchn_unbind", xenevtchn_unbind(xce, port) == 0 && xenevtchn_unbind(xce, port) < 0, "twice");
    munmap((void *)ring, 4096);
    check("xc_mem_paging_disable", xc_mem_paging_disable(xch, dom) == 0, "disable");
}

static void monitor(xc_interface *xch, xenevtchn_handle *xce)
{
    uint32_t port = 0;
    volatile uint32_t *ring = xc_monitor_enable(xch, dom, &port);
    check("xc_monitor_enable", ring && port > 0 && ring[3] == 1, "ring %p port %u", (void *)ring, port);
    check("xenevtchn_bind_interdomain(monitor)", xenevtchn_bind_interdomain(xce, dom, port) == (int)port, "port");
    int a = -1;
    int rc = xc_set_mem_access(xch, dom, 5 /* rx */, ~0ull, 0);
    check("xc_set_mem_access(default)", rc == 0 && xc_get_mem_access(xch, dom, ~0ull, &a) == 0 && a == 5,
          "rc %d default %d", rc, a);
    rc = xc_set_mem_access(xch, dom, 6 /* wx */, 2, 3);
    int in = -1, out = -1;
    xc_get_mem_access(xch, dom, 4, &in);
    xc_get_mem_access(xch, dom, 5, &out);
    check("xc_set_mem_access", rc == 0 && in == 6 && out == 7, "rc %d gfn4 %d gfn5 %d", rc, in, out);
    check("xc_get_mem_access", xc_get_mem_access(xch, dom, 2, &a) == 0 && a == 6, "gfn 2 %d", a);
    check("xc_domain_set_access_required", xc_domain_set_access_required(xch, dom, 1) == 0 &&
          xc_domain_set_access_required(xch, dom, 0) == 0, "on/off");
    check("xc_monitor_software_breakpoint", xc_monitor_software_breakpoint(xch, dom, 1) == 0 &&
          xc_monitor_software_breakpoint(xch, dom, 0) == 0, "on/off");
    check("xc_monitor_write_ctrlreg", xc_monitor_write_ctrlreg(xch, dom, 1 /* CR3 */, 1, 1, 0, 1) == 0 &&
          xc_monitor_write_ctrlreg(xch, dom, 1, 0, 0, 0, 0) == 0, "CR3 on/off");
    check("xc_monitor_write_ctrlreg(CR4, PGE masked)",
          xc_monitor_write_ctrlreg(xch, dom, 2 /* CR4 */, 1, 1, 0x80 /* X86_CR4_PGE */, 1) == 0 &&
          xc_monitor_write_ctrlreg(xch, dom, 2, 0, 0, 0, 0) == 0, "xen-access write_ctrlreg_cr4");
    errno = 0;
    check("xc_monitor_write_ctrlreg(XCR0)", xc_monitor_write_ctrlreg(xch, dom, 3, 1, 1, 0, 0) < 0 &&
          errno == EOPNOTSUPP, "XCR0");
    check("xc_monitor_singlestep", xc_monitor_singlestep(xch, dom, 1) == 0 && xc_monitor_singlestep(xch, 999, 1) < 0,
          "domain or not");
    check("xc_domain_debug_control", xc_domain_debug_control(xch, dom, 1, 0) == 0 &&
          xc_domain_debug_control(xch, dom, 0, 0) == 0 && xc_domain_debug_control(xch, dom, 1, 99) < 0,
          "vcpu 0 on/off, vcpu 99");
    check("xc_hvm_inject_trap", xc_hvm_inject_trap(xch, dom, 0, 3, 6, ~0u, 1, 0) == 0 &&
          xc_hvm_inject_trap(xch, dom, 99, 3, 6, ~0u, 1, 0) < 0, "vcpu 0, vcpu 99");
    check("xc_monitor_resume", xc_monitor_resume(xch, dom) == 0, "resume");
    xc_set_mem_access(xch, dom, 7, ~0ull, 0);
    xc_set_mem_access(xch, dom, 7, 0, (uint32_t)gfns);
    check("xenevtchn_unbind(monitor)", xenevtchn_unbind(xce, port) == 0, "unbind");
    munmap((void *)ring, 4096);
    check("xc_monitor_disable", xc_monitor_disable(xch, dom) == 0, "disable");
    errno = 0;
    check("xc_monitor_disable(twice)", xc_monitor_disable(xch, dom) < 0 && errno == ENOENT, "no ring");
}

static void unsupported(xc_interface *xch, xenevtchn_handle *xce)
{
    uint16_t view = 0;
#define UNSUP(name, call)                                                                                       \
    do {                                                                                                       \
        errno = 0;                                                                                             \
        int r_ = (call);                                                                                       \
        check(name, r_ < 0 && errno == EOPNOTSUPP, "rc %d", r_);                                              \
    } while (0)
    UNSUP("xc_altp2m_set_domain_state", xc_altp2m_set_domain_state(xch, dom, 1));
    UNSUP("xc_altp2m_create_view", xc_altp2m_create_view(xch, dom, 7, &view));
    UNSUP("xc_altp2m_destroy_view", xc_altp2m_destroy_view(xch, dom, 1));
    UNSUP("xc_altp2m_switch_to_view", xc_altp2m_switch_to_view(xch, dom, 1));
    UNSUP("xc_altp2m_set_mem_access", xc_altp2m_set_mem_access(xch, dom, 1, 0, 7));
    UNSUP("xc_monitor_cpuid", xc_monitor_cpuid(xch, dom, 1));
    UNSUP("xc_monitor_descriptor_access", xc_monitor_descriptor_access(xch, dom, 1));
    UNSUP("xc_monitor_debug_exceptions", xc_monitor_debug_exceptions(xch, dom, 1, 1));
    UNSUP("xc_monitor_emul_unimplemented", xc_monitor_emul_unimplemented(xch, dom, 1));
    UNSUP("xc_monitor_inguest_pagefault", xc_monitor_inguest_pagefault(xch, dom, 1));
    UNSUP("xc_monitor_privileged_call", xc_monitor_privileged_call(xch, dom, 1));
    UNSUP("xenevtchn_bind_unbound_port", xenevtchn_bind_unbound_port(xce, dom));
    UNSUP("xenevtchn_bind_virq", xenevtchn_bind_virq(xce, 3));
}

static void store(void)
{
    struct xs_handle *xs = xs_open(0);
    check("xs_open", xs != NULL, "no xenstore");
    if (!xs)
        return;
    char *path = xs_get_domain_path(xs, dom);
    char want[64];
    snprintf(want, sizeof(want), "/local/domain/%u", dom);
    check("xs_get_domain_path", path && !strcmp(path, want), "%s", path ? path : "NULL");
    free(path);
    check("xs_is_domain_introduced", xs_is_domain_introduced(xs, dom) && !xs_is_domain_introduced(xs, 999), "");
    check("xs_write", xs_write(xs, 0, "/hvemu-test/a", "val", 3), "write");
    unsigned int len = 0;
    char *v = xs_read(xs, 0, "/hvemu-test/a", &len);
    check("xs_read", v && len == 3 && !strcmp(v, "val"), "%s", v ? v : "NULL");
    free(v);
    errno = 0;
    v = xs_read(xs, 0, "/hvemu-test/missing", NULL);
    check("xs_read(missing)", v == NULL && errno == ENOENT, "a missing key");
    unsigned int num = 0;
    char **dir = xs_directory(xs, 0, "/hvemu-test", &num);
    check("xs_directory", dir && num == 1 && !strcmp(dir[0], "a"), "%u entries", num);
    free(dir);
    int fd = xs_fileno(xs);
    check("xs_watch", xs_watch(xs, "/hvemu-test", "tok"), "watch");
    check("xs_fileno", fd >= 0 && readable(fd, 10000), "the watch fires at once");
    char **ev = xs_read_watch(xs, &num);
    check("xs_read_watch", ev && num == 2 && !strcmp(ev[0], "/hvemu-test") && !strcmp(ev[1], "tok"), "%s %s",
          ev ? ev[0] : "", ev ? ev[1] : "");
    free(ev);
    xs_write(xs, 0, "/hvemu-test/a/b", "1", 1);
    ev = readable(fd, 10000) ? xs_read_watch(xs, &num) : NULL;
    check("xs_read_watch(below)", ev && !strcmp(ev[0], "/hvemu-test/a/b"), "%s", ev ? ev[0] : "none");
    free(ev);
    check("xs_unwatch", xs_unwatch(xs, "/hvemu-test", "tok") && !xs_unwatch(xs, "/hvemu-test", "tok"), "twice");
    check("xs_rm", xs_rm(xs, 0, "/hvemu-test") && !xs_read(xs, 0, "/hvemu-test/a", NULL), "rm");
    xs_close(xs);
    check("xs_close", 1, "");
    xs = xs_open(0);
    xs_daemon_close(xs);
    check("xs_daemon_close", xs != NULL, "");
}

/* A process that holds no ring of the domain: its foreign mappings are copies. */
static int map_copy(xen_pfn_t gfn)
{
    xc_interface *xch = xc_interface_open(NULL, NULL, 0);
    xen_pfn_t both[2] = {gfn, gfn + 1};
    uint8_t *p = xch ? xc_map_foreign_pages(xch, dom, PROT_READ, both, 2) : NULL;
    check("xc_map_foreign_pages(copy)", p && p[0] == 0xab && p[4095] == 0xab && p[4096] == 0, "gfn %lu", gfn);
    if (p)
        munmap(p, 2 * 4096);
    xc_interface_close(xch);
    return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc != 3 && !(argc == 5 && !strcmp(argv[3], "map"))) {
        fprintf(stderr, "usage: %s DOMID GFNS [map GFN]\n", argv[0]);
        return 2;
    }
    dom = (uint32_t)strtoul(argv[1], NULL, 10);
    gfns = strtoul(argv[2], NULL, 10);
    if (argc == 5)
        return map_copy(strtoul(argv[4], NULL, 10));
    toollog();
    xc_interface *xch = xc_interface_open(NULL, NULL, 0);
    check("xc_interface_open", xch != NULL, "cannot open");
    if (!xch)
        return 1;
    xenevtchn_handle *xce = xenevtchn_open(NULL, 0);
    check("xenevtchn_open", xce != NULL, "cannot open");
    domains(xch);
    paging(xch, xce);
    monitor(xch, xce);
    unsupported(xch, xce);
    check("xenevtchn_close", xenevtchn_close(xce) == 0, "close");
    store();
    check("xc_interface_close", xc_interface_close(xch) == 0, "close");
    return failures ? 1 : 0;
}
