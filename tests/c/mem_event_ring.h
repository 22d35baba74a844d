/*
 * An independent C description of hvemu's ring page, written from
 * DESIGN.md section 2 only (not from hvemu/abi.py): Xen 4.2's
 * struct mem_event_sring and the io/ring.h operations a back end needs.
 *
 * Used by abi_layout.c (offsetof/sizeof dump for tests/unit/test_abi_layout.py)
 * and by ring_backend.c (a C back end for tests/integration/test_c_backend.py).
 */
#ifndef HVEMU_TEST_MEM_EVENT_RING_H
#define HVEMU_TEST_MEM_EVENT_RING_H

#include <stddef.h>
#include <stdint.h>

/* ---- mem_event_st (DESIGN section 2, second table) ---------------------- */

#define MEM_EVENT_TYPE_SHARED 0
#define MEM_EVENT_TYPE_PAGING 1
#define MEM_EVENT_TYPE_ACCESS 2

#define MEM_EVENT_FLAG_VCPU_PAUSED (1 << 0)
#define MEM_EVENT_FLAG_DROP_PAGE (1 << 1)
#define MEM_EVENT_FLAG_EVICT_FAIL (1 << 2)
#define MEM_EVENT_FLAG_FOREIGN (1 << 3)
#define MEM_EVENT_FLAG_DUMMY (1 << 4)

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

/* ---- io/ring.h, written out for this one ring type ---------------------- */

typedef uint32_t RING_IDX;

/* Round a 32-bit unsigned constant down to the nearest power of two. */
#define __RD2(_x) (((_x) & 0x00000002) ? 0x2 : ((_x) & 0x1))
#define __RD4(_x) (((_x) & 0x0000000c) ? __RD2((_x) >> 2) << 2 : __RD2(_x))
#define __RD8(_x) (((_x) & 0x000000f0) ? __RD4((_x) >> 4) << 4 : __RD4(_x))
#define __RD16(_x) (((_x) & 0x0000ff00) ? __RD8((_x) >> 8) << 8 : __RD8(_x))
#define __RD32(_x) (((_x) & 0xffff0000) ? __RD16((_x) >> 16) << 16 : __RD16(_x))

union mem_event_sring_entry {
    mem_event_request_t req;
    mem_event_response_t rsp;
};

struct mem_event_sring {
    RING_IDX req_prod, req_event;
    RING_IDX rsp_prod, rsp_event;
    uint8_t pad[48];
    union mem_event_sring_entry ring[1]; /* variable-length */
};

struct mem_event_back_ring {
    RING_IDX rsp_prod_pvt;
    RING_IDX req_cons;
    unsigned int nr_ents;
    struct mem_event_sring *sring;
};

/* Ring size for a page of _sz bytes: entries that fit, rounded down to 2^k. */
#define __RING_SIZE(_s, _sz) \
    (__RD32(((_sz) - (long)(_s)->ring + (long)(_s)) / sizeof((_s)->ring[0])))

#define mb() __sync_synchronize()
#if defined(__x86_64__) || defined(__i386__)
/* x86 is TSO: only the compiler has to be stopped for wmb()/rmb(). */
#define wmb() __asm__ __volatile__("" ::: "memory")
#define rmb() __asm__ __volatile__("" ::: "memory")
#else
#define wmb() __sync_synchronize()
#define rmb() __sync_synchronize()
#endif

#define RING_SIZE(_r) ((_r)->nr_ents)

#define BACK_RING_ATTACH(_r, _s, __size)                                       \
    do {                                                                       \
        (_r)->sring = (_s);                                                    \
        (_r)->rsp_prod_pvt = (_s)->rsp_prod;                                   \
        (_r)->req_cons = (_s)->rsp_prod;                                       \
        (_r)->nr_ents = __size;                                                \
    } while (0)

#define RING_GET_REQUEST(_r, _idx) (&((_r)->sring->ring[((_idx) & (RING_SIZE(_r) - 1))].req))
#define RING_GET_RESPONSE(_r, _idx) (&((_r)->sring->ring[((_idx) & (RING_SIZE(_r) - 1))].rsp))

#define RING_HAS_UNCONSUMED_REQUESTS(_r)                                       \
    ({                                                                         \
        unsigned int req = (_r)->sring->req_prod - (_r)->req_cons;             \
        unsigned int rsp = RING_SIZE(_r) - ((_r)->req_cons - (_r)->rsp_prod_pvt); \
        req < rsp ? req : rsp;                                                 \
    })

/* A front end that published more than RING_SIZE unanswered requests. */
#define RING_REQUEST_PROD_OVERFLOW(_r, _prod) \
    (((RING_IDX)((_prod) - (_r)->rsp_prod_pvt)) > RING_SIZE(_r))

#define RING_PUSH_RESPONSES(_r)                                                \
    do {                                                                       \
        wmb(); /* front sees responses /before/ updated producer index */      \
        (_r)->sring->rsp_prod = (_r)->rsp_prod_pvt;                            \
    } while (0)

#define RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(_r, _notify)                      \
    do {                                                                       \
        RING_IDX __old = (_r)->sring->rsp_prod;                                \
        RING_IDX __new = (_r)->rsp_prod_pvt;                                   \
        wmb(); /* front sees responses /before/ updated producer index */      \
        (_r)->sring->rsp_prod = __new;                                         \
        mb(); /* front sees new responses /before/ we check rsp_event */       \
        (_notify) = ((RING_IDX)(__new - (_r)->sring->rsp_event) <              \
                     (RING_IDX)(__new - __old));                               \
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

#endif /* HVEMU_TEST_MEM_EVENT_RING_H */
