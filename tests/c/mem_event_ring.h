/*
 * An independent C description of hvemu's ring page, written from
 * DESIGN.md section 2 only (not from hvemu/abi.py): Xen 4.2's
 * struct mem_event_sring.
 *
 * Used by abi_layout.c (offsetof/sizeof dump for tests/unit/test_abi_layout.py),
 * an oracle for the layout independent of the header hvemu ships
 * (hvemu/include/hvemu_mem_event.h, which ring_backend.c builds against).
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

/* Ring size for a page of _sz bytes: entries that fit, rounded down to 2^k. */
#define __RING_SIZE(_s, _sz) \
    (__RD32(((_sz) - (long)(_s)->ring + (long)(_s)) / sizeof((_s)->ring[0])))

#endif /* HVEMU_TEST_MEM_EVENT_RING_H */
