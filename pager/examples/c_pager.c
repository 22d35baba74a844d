/* c_pager.c -- a pager in C for hvemu, on the raw attach (pager/attach.py).
 *
 *   cc -O2 -Wall -I hvemu/include -o c_pager pager/examples/c_pager.c
 *   python -m pager.attach --domid 1 --ring paging -- ./c_pager /tmp/dom1.pages
 *
 * It uses nothing but the documented contract (docs/writing-a-daemon.md):
 * the ring page layout and ring.h's back-ring macros from the header hvemu
 * ships (hvemu/include/hvemu_mem_event.h, macros that behave as Xen's), the event channel (4-byte little-endian port messages on a SEQPACKET
 * socket), read-only mappings of guest memory and of the p2m table, and the
 * attach's line-based command channel for domctls.
 *
 * It keeps the domain at its paging target by evicting pages in batches
 * (nominate, copy to PAGEFILE, evict), answers every populate request of a
 * drain by loading the pages from PAGEFILE in one command, pushes all of the
 * drain's responses with at most one notify, and on SIGTERM/SIGINT pages
 * everything back in before it exits (attach then disables the ring).  When
 * the hypervisor closes the event channel (the domain is gone) it just exits.
 * The last line on stdout is a JSON summary.  Assumes a little-endian host.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "hvemu_mem_event.h"

/* ------------------------------------------------------------------ layout */

#define ECHO_FLAGS (MEM_EVENT_FLAG_VCPU_PAUSED | MEM_EVENT_FLAG_DROP_PAGE | MEM_EVENT_FLAG_EVICT_FAIL | \
                    MEM_EVENT_FLAG_FOREIGN)
#define NO_LOAD    (MEM_EVENT_FLAG_DROP_PAGE | MEM_EVENT_FLAG_EVICT_FAIL | MEM_EVENT_FLAG_DUMMY)

/* ------------------------------------------------------------ the pager */

#define PAGE 4096u
#define BATCH 64u

static mem_event_back_ring_t back;
static int evtchn, ctl, pagefile;
static uint32_t port;
static uint64_t gfns;
static const uint8_t *mem;
static const volatile uint8_t *p2m;          /* the hypervisor changes it under us */
static FILE *ctl_in;
static volatile sig_atomic_t stop;
static unsigned long pages_out, pages_in, requests, notifies, evict_busy;
static uint64_t hand;                        /* clock hand of the victim scan */

static void die(const char *what)
{
    fprintf(stderr, "c_pager: %s: %s\n", what, errno ? strerror(errno) : "failed");
    exit(1);
}

static long env(const char *name)
{
    const char *v = getenv(name);
    if (!v) {
        fprintf(stderr, "c_pager: %s is not set: run me under python -m pager.attach\n", name);
        exit(2);
    }
    return strtol(v, NULL, 10);
}

static void write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("command channel");
        p += n;
        len -= (size_t)n;
    }
}

/* Send one command (plus raw pages for "load"), read its reply line.
 * Returns 1 for "ok ...": then *rest points at what follows "ok". */
static int command(const char *line, const void *data, size_t len, char *reply, size_t rlen, char **rest)
{
    write_all(ctl, line, strlen(line));
    if (len)
        write_all(ctl, data, len);
    if (!fgets(reply, (int)rlen, ctl_in))
        die("command channel closed");
    reply[strcspn(reply, "\n")] = 0;
    if (strncmp(reply, "ok", 2) == 0 && (reply[2] == 0 || reply[2] == ' ')) {
        if (rest)
            *rest = reply + 2;
        return 1;
    }
    return 0;
}

/* "nominate 1 2 3\n" etc. */
static void batch_line(char *buf, size_t len, const char *cmd, const uint64_t *g, unsigned n)
{
    size_t off = (size_t)snprintf(buf, len, "%s", cmd);
    for (unsigned i = 0; i < n; i++)
        off += (size_t)snprintf(buf + off, len - off, " %llu", (unsigned long long)g[i]);
    snprintf(buf + off, len - off, "\n");
}

/* The per-gfn words of a batch reply: "0" or an errno name. */
enum { RES_OK, RES_ENOMEM, RES_OTHER };
static void batch_results(char *rest, unsigned n, int *res)
{
    char *save = NULL, *w = strtok_r(rest, " ", &save);
    for (unsigned i = 0; i < n; i++, w = strtok_r(NULL, " ", &save))
        res[i] = !w ? RES_OTHER : !strcmp(w, "0") ? RES_OK : !strcmp(w, "ENOMEM") ? RES_ENOMEM : RES_OTHER;
}

static void notify(void)
{
    uint32_t msg = port;        /* little-endian host: the bytes are the LE port */
    /* EAGAIN: the hypervisor has unread notifications, it is pending anyway. */
    if (send(evtchn, &msg, sizeof msg, MSG_DONTWAIT | MSG_NOSIGNAL) == (ssize_t)sizeof msg)
        notifies++;
}

/* Read every pending notification (they are all one event); 0 if the peer closed. */
static int drain_evtchn(void)
{
    char buf[64];
    for (;;) {
        ssize_t n = recv(evtchn, buf, sizeof buf, MSG_DONTWAIT);
        if (n > 0)
            continue;
        if (n == 0)
            return 0;
        if (errno == EINTR)
            continue;
        return errno == EAGAIN || errno == EWOULDBLOCK;
    }
}

static uint64_t resident(void)
{
    uint64_t n = 0;
    for (uint64_t g = 0; g < gfns; g++)
        n += p2m[g] == p2m_ram_rw || p2m[g] == p2m_ram_paging_out;
    return n;
}

static long target(void)
{
    char reply[256], *rest;
    return command("target\n", NULL, 0, reply, sizeof reply, &rest) ? strtol(rest, NULL, 10) : -1;
}

/* Evict up to n resident pages: nominate, copy to the pagefile, evict. */
static unsigned evict(unsigned n)
{
    uint64_t victims[BATCH], nominated[BATCH];
    int ok[BATCH];
    char line[BATCH * 24 + 16], reply[BATCH * 8 + 64], *rest;
    unsigned count = 0, good = 0, done = 0;

    if (n > BATCH)
        n = BATCH;
    for (uint64_t i = 0; i < gfns && count < n; i++) {
        uint64_t g = (hand + i) % gfns;
        if (p2m[g] == p2m_ram_rw)
            victims[count++] = g;
    }
    if (!count)
        return 0;
    hand = (victims[count - 1] + 1) % gfns;
    batch_line(line, sizeof line, "nominate", victims, count);
    if (!command(line, NULL, 0, reply, sizeof reply, &rest))
        return 0;
    batch_results(rest, count, ok);
    for (unsigned i = 0; i < count; i++) {
        if (ok[i] != RES_OK)
            continue;
        /* Nominated: the guest cannot write it any more, the copy is final. */
        if (pwrite(pagefile, mem + victims[i] * PAGE, PAGE, (off_t)(victims[i] * PAGE)) != (ssize_t)PAGE)
            die("pagefile write");
        nominated[good++] = victims[i];
    }
    if (!good)
        return 0;
    batch_line(line, sizeof line, "evict", nominated, good);
    if (!command(line, NULL, 0, reply, sizeof reply, &rest))
        return 0;
    batch_results(rest, good, ok);
    for (unsigned i = 0; i < good; i++) {
        done += ok[i] == RES_OK;
        evict_busy += ok[i] != RES_OK;   /* EBUSY: touched since nominate; its populate comes as EVICT_FAIL */
    }
    pages_out += done;
    return done;
}

/* Load gfns from the pagefile with one "load" command; on ENOMEM make room and retry. */
static void load(const uint64_t *want, unsigned n)
{
    static uint8_t pages[BATCH * PAGE];
    uint64_t g[BATCH];
    int ok[BATCH];
    char line[BATCH * 24 + 16], reply[BATCH * 8 + 64], *rest;

    memcpy(g, want, n * sizeof *g);
    for (int attempt = 0; n && attempt < 8; attempt++) {
        for (unsigned i = 0; i < n; i++)
            if (pread(pagefile, pages + i * PAGE, PAGE, (off_t)(g[i] * PAGE)) != (ssize_t)PAGE)
                die("pagefile read");
        batch_line(line, sizeof line, "load", g, n);
        if (!command(line, pages, (size_t)n * PAGE, reply, sizeof reply, &rest))
            return;             /* e.g. ESRCH: the domain is going away */
        unsigned left = 0;
        batch_results(rest, n, ok);
        for (unsigned i = 0; i < n; i++) {
            pages_in += ok[i] == RES_OK;
            /* ENOMEM: retry after evicting; anything else (ENOENT, EINVAL): not paged
             * any more (a duplicate request), the response alone is right. */
            if (ok[i] == RES_ENOMEM)
                g[left++] = g[i];
        }
        n = left;
        if (n)
            evict(n);
    }
}

/* Drain the ring: answer every request, one load and one push per drain. */
static void serve(void)
{
    mem_event_request_t reqs[BATCH];
    uint64_t to_load[BATCH];

    for (;;) {
        unsigned n = 0, nload = 0;
        while (n < BATCH && RING_HAS_UNCONSUMED_REQUESTS(&back)) {
            rmb();              /* read the slot after seeing req_prod */
            reqs[n++] = *RING_GET_REQUEST(&back, back.req_cons);    /* copy: the slot gets our response */
            back.req_cons++;
        }
        if (!n) {
            int more;
            RING_FINAL_CHECK_FOR_REQUESTS(&back, more);
            if (more)
                continue;
            return;
        }
        requests += n;
        for (unsigned i = 0; i < n; i++) {
            int dup = 0;
            if (reqs[i].flags & NO_LOAD)
                continue;       /* dropped, or only nominated (its frame is still there) */
            for (unsigned j = 0; j < nload; j++)
                dup |= to_load[j] == reqs[i].gfn;
            if (!dup)
                to_load[nload++] = reqs[i].gfn;
        }
        if (nload)
            load(to_load, nload);
        for (unsigned i = 0; i < n; i++) {
            mem_event_response_t rsp = {
                .type = reqs[i].type, .flags = reqs[i].flags & ECHO_FLAGS, .vcpu_id = reqs[i].vcpu_id,
                .gfn = reqs[i].gfn, .p2mt = reqs[i].p2mt, .reason = reqs[i].reason,
            };
            *RING_GET_RESPONSE(&back, back.rsp_prod_pvt) = rsp;
            back.rsp_prod_pvt++;
        }
        int kick;
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, kick);
        if (kick)
            notify();
    }
}

/* Before exiting on a signal: bring every page back (the ring goes away after us). */
/* Returns 1 when nothing is out any more (or the domain is gone), 0 when pages stay out. */
static int page_in_all(void)
{
    for (int round = 0; round < 1000; round++) {
        uint64_t batch[BATCH];
        unsigned n = 0, out = 0;
        char line[BATCH * 24 + 16], reply[BATCH * 8 + 64];

        serve();
        for (uint64_t g = 0; g < gfns; g++) {
            uint8_t t = p2m[g];
            if (t == p2m_ram_paged || t == p2m_ram_paging_in) {
                out++;
                if (n < BATCH)
                    batch[n++] = g;
            } else if (t == p2m_ram_paging_out) {
                /* Only nominated (its frame still holds the data; a foreign map would just map it):
                 * copy and evict it, the next round loads it like any paged gfn. */
                out++;
                if (pwrite(pagefile, mem + g * PAGE, PAGE, (off_t)(g * PAGE)) != (ssize_t)PAGE)
                    die("pagefile write");
                batch_line(line, sizeof line, "evict", &g, 1);
                command(line, NULL, 0, reply, sizeof reply, NULL);
            }
        }
        if (!out)
            return 1;
        if (n)
            load(batch, n);
        if (!drain_evtchn())
            return 1;           /* the domain is gone: nothing to page in */
    }
    fprintf(stderr, "c_pager: pages still out after paging in\n");
    return 0;
}

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: python -m pager.attach --domid N -- %s PAGEFILE\n", argv[0]);
        return 2;
    }
    uint32_t size = (uint32_t)env("HVEMU_RING_SIZE");
    gfns = (uint64_t)env("HVEMU_GFNS");
    port = (uint32_t)env("HVEMU_PORT");
    evtchn = (int)env("HVEMU_EVTCHN_FD");
    ctl = (int)env("HVEMU_CTL_FD");
    if (env("HVEMU_PAGE_SIZE") != PAGE || !size || size & (size - 1) || size > BATCH) {
        fprintf(stderr, "c_pager: unexpected page or ring size\n");
        return 2;
    }
    mem_event_sring_t *s = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, (int)env("HVEMU_RING_FD"), 0);
    mem = mmap(NULL, gfns * PAGE, PROT_READ, MAP_SHARED, (int)env("HVEMU_MEMORY_FD"), 0);
    p2m = mmap(NULL, 2 * gfns, PROT_READ, MAP_SHARED, (int)env("HVEMU_P2M_FD"), 0);
    if (s == MAP_FAILED || mem == MAP_FAILED || p2m == MAP_FAILED)
        die("mmap");
    if (!(ctl_in = fdopen(dup(ctl), "r")))
        die("fdopen");
    /* A re-attached ring's pages are in the pagefile already: keep it then,
     * but only if it is this domain's (PATH.owner names the domain handle);
     * serving another domain's file would hand the guest the wrong bytes. */
    const char *handle = getenv("HVEMU_DOMAIN_HANDLE");
    char owner_path[4096], owner[64] = "";
    snprintf(owner_path, sizeof owner_path, "%s.owner", argv[1]);
    int ofd = open(owner_path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    FILE *of = ofd >= 0 ? fdopen(ofd, "r") : NULL;
    if (of) {
        if (!fgets(owner, sizeof owner, of))
            owner[0] = 0;
        fclose(of);
        owner[strcspn(owner, "\n")] = 0;
    }
    int mine = handle && *handle && strcmp(owner, handle) == 0;
    if (env("HVEMU_REATTACHED") && !mine) {
        fprintf(stderr, "c_pager: %s does not hold this domain's pages (%s names %s, not %s): "
                "re-attach with the pagefile of the pager that paged them out\n",
                argv[1], owner_path, owner[0] ? owner : "nothing", handle ? handle : "?");
        return 1;
    }
    int flags = O_RDWR | O_CREAT | O_CLOEXEC | (mine ? 0 : O_TRUNC);
    if ((pagefile = open(argv[1], flags, 0600)) < 0 || ftruncate(pagefile, (off_t)(gfns * PAGE)))
        die(argv[1]);
    if (!mine && handle && (of = fopen(owner_path, "w"))) {
        fprintf(of, "%s\n", handle);
        fclose(of);
    }

    /* SA_RESTART: a read of the command channel (fgets) interrupted by the
     * signal resumes instead of failing half-way through a reply; poll()
     * is never restarted (signal(7)), so the main loop still sees EINTR. */
    struct sigaction sa = { .sa_handler = on_signal, .sa_flags = SA_RESTART };
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    /* Not BACK_RING_ATTACH alone (Xen's skips to req_prod, past unanswered requests),
     * and not a whole page: the domain's ring may have fewer than 64 slots. */
    HVEMU_BACK_RING_REATTACH(&back, s, HVEMU_RING_BYTES(size));
    int gone = 0;
    long tgt = target();
    double next_target = now() + 0.2;
    while (!stop) {
        serve();
        if (now() >= next_target) {
            tgt = target();
            next_target = now() + 0.2;
        }
        uint64_t res = resident();
        if (tgt >= 0 && res > (uint64_t)tgt && evict((unsigned)(res - (uint64_t)tgt)))
            continue;           /* keep evicting, but serve between batches */
        struct pollfd pfd = { .fd = evtchn, .events = POLLIN };
        if (poll(&pfd, 1, 50) > 0 && !drain_evtchn()) {
            gone = 1;           /* the hypervisor closed the channel: the domain is gone */
            break;
        }
    }
    if (gone || page_in_all()) {
        /* Everything is in (or the domain is gone): the file must not pass for
         * the store of pages a later pager, with another file, pages out. */
        unlink(owner_path);
        if (ftruncate(pagefile, 0))
            die(argv[1]);
    }
    printf("{\"c_pager\": true, \"pages_out\": %lu, \"pages_in\": %lu, \"requests\": %lu, "
           "\"notifies\": %lu, \"evict_busy\": %lu, \"domain_gone\": %s}\n",
           pages_out, pages_in, requests, notifies, evict_busy, gone ? "true" : "false");
    return 0;
}
