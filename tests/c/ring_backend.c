/*
 * A mem_event back end in C, written from DESIGN.md section 2 and io/ring.h
 * (mem_event_ring.h), that answers requests produced by hvemu's Python
 * FrontRing.  Used by tests/integration/test_c_backend.py.
 *
 *   ring_backend (--fd FD | --name SHM_NAME) PAGE_SIZE KICK_BACK_FD KICK_FRONT_FD COUNT
 *
 * Maps the ring page (an inherited fd, or a POSIX shm name; with a name it
 * prints "mapped" once the mapping exists so the caller may unlink it),
 * attaches at rsp_prod (BACK_RING_ATTACH), and answers COUNT requests:
 * every field echoed except flags |= VCPU_PAUSED, gla = ~gla, access_x
 * toggled and offset = the answer's ordinal.  It kicks the front end (writes
 * its eventfd) only when RING_PUSH_RESPONSES_AND_CHECK_NOTIFY says so and
 * sleeps in a blocking read of its own eventfd only after
 * RING_FINAL_CHECK_FOR_REQUESTS found no work.
 *
 * Exit status: 0 done, 2 usage/system error, 3 corrupt ring (req_prod beyond
 * what the ring can hold).  Prints "answered N pushes P kicks K sleeps S".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "hvemu_mem_event.h" /* the header hvemu ships: Xen 4.2's ring.h semantics */

static void kick(int fd)
{
    uint64_t one = 1;
    while (write(fd, &one, sizeof(one)) < 0) {
        if (errno != EINTR) {
            perror("write eventfd");
            exit(2);
        }
    }
}

static void wait_kick(int fd)
{
    uint64_t v;
    while (read(fd, &v, sizeof(v)) < 0) {
        if (errno != EINTR) {
            perror("read eventfd");
            exit(2);
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 7 || (strcmp(argv[1], "--fd") && strcmp(argv[1], "--name"))) {
        fprintf(stderr, "usage: %s (--fd FD | --name NAME) PAGE_SIZE KICK_BACK KICK_FRONT COUNT\n", argv[0]);
        return 2;
    }
    long page_size = strtol(argv[3], NULL, 0);
    int kick_back = atoi(argv[4]);
    int kick_front = atoi(argv[5]);
    unsigned long count = strtoul(argv[6], NULL, 0);
    int by_name = !strcmp(argv[1], "--name");

    alarm(60); /* a backstop: never outlive a dead front end for long */

    int fd = by_name ? shm_open(argv[2], O_RDWR, 0) : atoi(argv[2]);
    if (fd < 0) {
        perror("shm_open");
        return 2;
    }
    struct mem_event_sring *sring = mmap(NULL, (size_t)page_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (sring == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    close(fd);
    if (by_name) {
        printf("mapped\n");
        fflush(stdout);
    }

    struct mem_event_back_ring back;
    /* Not BACK_RING_ATTACH alone: Xen's skips to req_prod, past requests left unanswered. */
    HVEMU_BACK_RING_REATTACH(&back, sring, page_size);
    if (RING_SIZE(&back) == 0) {
        fprintf(stderr, "a %ld-byte page holds no entry\n", page_size);
        return 2;
    }

    unsigned long answered = 0, pushes = 0, kicks = 0, sleeps = 0;
    while (answered < count) {
        RING_IDX rp = sring->req_prod;
        rmb();
        if (RING_REQUEST_PROD_OVERFLOW(&back, rp) || (RING_IDX)(rp - back.req_cons) > RING_SIZE(&back)) {
            fprintf(stderr, "corrupt ring: req_prod=%" PRIu32 " req_cons=%" PRIu32 " rsp_prod_pvt=%" PRIu32
                            " size=%u\n", rp, back.req_cons, back.rsp_prod_pvt, RING_SIZE(&back));
            return 3;
        }
        unsigned int n = RING_HAS_UNCONSUMED_REQUESTS(&back);
        if (n) {
            while (n-- && answered < count) {
                mem_event_request_t req = *RING_GET_REQUEST(&back, back.req_cons);
                back.req_cons++;
                mem_event_response_t rsp = req;
                rsp.flags |= MEM_EVENT_FLAG_VCPU_PAUSED;
                rsp.gla = ~req.gla;
                rsp.access_x = !req.access_x;
                rsp.offset = answered;
                *RING_GET_RESPONSE(&back, back.rsp_prod_pvt) = rsp;
                back.rsp_prod_pvt++;
                answered++;
            }
            int notify;
            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, notify);
            pushes++;
            if (notify) {
                kick(kick_front);
                kicks++;
            }
            continue;
        }
        int work;
        RING_FINAL_CHECK_FOR_REQUESTS(&back, work);
        if (work)
            continue;
        sleeps++;
        wait_kick(kick_back);
    }
    printf("answered %lu pushes %lu kicks %lu sleeps %lu\n", answered, pushes, kicks, sleeps);
    munmap(sring, (size_t)page_size);
    return 0;
}
