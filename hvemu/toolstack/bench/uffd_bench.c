/*
 * What a user would otherwise write: a userfaultfd pager in C.
 *
 * A region of NPAGES anonymous pages is registered for missing-page faults.
 * A handler thread waits on the userfaultfd (poll + read, as a pager's event
 * loop would), reads the faulting page from a pagefile (pread) and installs
 * it with UFFDIO_COPY.  The main thread touches one page at a time, timing
 * the access (fault -> handler -> copy -> resume), checks the stamp the page
 * carries, and drops the page again (MADV_DONTNEED) so the next touch of it
 * faults too.  The same kind of fault as hvemu's page-in: a missing page
 * read back from a file by a user-space handler, then the access resumes.
 *
 * Usage: uffd_bench ITERATIONS WARMUP PAGEFILE_DIR
 * Prints one JSON object: {"n", "p50_us", "p99_us", "max_us", "mean_us",
 * "integrity_failures"} or {"error": "..."} (exit 2) when userfaultfd is
 * unavailable or not permitted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

#define NPAGES 256

static int uffd = -1;
static int pagefile = -1;
static long page_size;
static char *region;
static char *bounce;

static void fail(const char *what)
{
    printf("{\"error\": \"%s: %s\"}\n", what, strerror(errno));
    fflush(stdout);
    exit(2);
}

static int open_uffd(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0)
        return fd;
    if (errno == EPERM) /* vm.unprivileged_userfaultfd=0: user-mode faults are still allowed */
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd >= 0)
        return fd;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        close(dev);
    }
    return fd;
}

static void *handler(void *arg)
{
    (void)arg;
    for (;;) {
        struct pollfd p = {.fd = uffd, .events = POLLIN};
        if (poll(&p, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail("poll");
        }
        struct uffd_msg msg;
        ssize_t n = read(uffd, &msg, sizeof msg);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n != (ssize_t)sizeof msg)
            fail("read uffd");
        if (msg.event != UFFD_EVENT_PAGEFAULT)
            continue;
        unsigned long addr = msg.arg.pagefault.address & ~(unsigned long)(page_size - 1);
        off_t slot = (off_t)((addr - (unsigned long)region) / (unsigned long)page_size);
        if (pread(pagefile, bounce, (size_t)page_size, slot * page_size) != page_size)
            fail("pread");
        struct uffdio_copy copy = {
            .dst = addr, .src = (unsigned long)bounce, .len = (unsigned long)page_size, .mode = 0};
        if (ioctl(uffd, UFFDIO_COPY, &copy) < 0 && errno != EEXIST)
            fail("UFFDIO_COPY");
    }
    return NULL;
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s ITERATIONS WARMUP PAGEFILE_DIR\n", argv[0]);
        return 1;
    }
    long iterations = atol(argv[1]), warmup = atol(argv[2]);
    page_size = sysconf(_SC_PAGESIZE);

    char path[4096];
    snprintf(path, sizeof path, "%s/uffd-%d.pagefile", argv[3], (int)getpid());
    pagefile = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (pagefile < 0)
        fail("open pagefile");
    unlink(path);
    bounce = aligned_alloc((size_t)page_size, (size_t)page_size);
    for (long i = 0; i < NPAGES; i++) {
        memset(bounce, (int)(i & 0xff), (size_t)page_size);
        memcpy(bounce, &i, sizeof i);
        if (pwrite(pagefile, bounce, (size_t)page_size, i * page_size) != page_size)
            fail("pwrite");
    }

    uffd = open_uffd();
    if (uffd < 0)
        fail("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        fail("UFFDIO_API");
    region = mmap(NULL, (size_t)(NPAGES * page_size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        fail("mmap");
    struct uffdio_register reg = {
        .range = {.start = (unsigned long)region, .len = (unsigned long)(NPAGES * page_size)},
        .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        fail("UFFDIO_REGISTER");

    pthread_t thread;
    if (pthread_create(&thread, NULL, handler, NULL) != 0)
        fail("pthread_create");

    uint64_t *samples = calloc((size_t)iterations, sizeof *samples);
    long bad = 0;
    for (long i = 0; i < warmup + iterations; i++) {
        long slot = i % NPAGES;
        volatile long *p = (volatile long *)(region + slot * page_size);
        uint64_t t0 = now_ns();
        long stamp = *p;
        uint64_t t1 = now_ns();
        if (stamp != slot)
            bad++;
        if (i >= warmup)
            samples[i - warmup] = t1 - t0;
        if (madvise(region + slot * page_size, (size_t)page_size, MADV_DONTNEED) < 0)
            fail("madvise");
    }
    qsort(samples, (size_t)iterations, sizeof *samples, cmp);
    double total = 0;
    for (long i = 0; i < iterations; i++)
        total += (double)samples[i];
    long r50 = (iterations * 50 + 99) / 100, r99 = (iterations * 99 + 99) / 100;
    printf("{\"n\": %ld, \"p50_us\": %.2f, \"p99_us\": %.2f, \"max_us\": %.2f, \"mean_us\": %.2f, "
           "\"integrity_failures\": %ld}\n",
           iterations, samples[r50 - 1] / 1000.0, samples[r99 - 1] / 1000.0, samples[iterations - 1] / 1000.0,
           total / (double)iterations / 1000.0, bad);
    fflush(stdout);
    return 0;
}
