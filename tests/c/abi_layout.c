/*
 * Dump the layout of mem_event_ring.h (written from DESIGN.md section 2) so
 * that tests/unit/test_abi_layout.py can compare hvemu/abi.py against it.
 *
 *   abi_layout layout     "field <name> <offset> <size>" and "bits <name> <first bit> <width>"
 *   abi_layout ringsize   "ringsize <entry size> <page size> <entries>" (Xen's __RING_SIZE)
 *   abi_layout encode     stdin: one entry per line as 12 decimal numbers
 *                         (type flags vcpu_id gfn offset gla p2mt r w x gla_valid reason);
 *                         stdout: the 40 bytes of the struct in hex
 *   abi_layout decode     stdin: one entry per line as 80 hex digits;
 *                         stdout: the 13 fields (12 above + available) as decimal
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem_event_ring.h"

/* A second entry definition: today's 400-byte vm_event_st, as opaque words. */
struct vm_event_entry {
    uint64_t words[50];
};
union vm_event_sring_entry {
    struct vm_event_entry req;
    struct vm_event_entry rsp;
};
struct vm_event_sring {
    RING_IDX req_prod, req_event;
    RING_IDX rsp_prod, rsp_event;
    uint8_t pad[48];
    union vm_event_sring_entry ring[1];
};

#define FIELD(type, name) \
    printf("field %s %zu %zu\n", #name, offsetof(type, name), sizeof(((type *)0)->name))

/* Bitfields have no offsetof: set the field in a zeroed struct and find the bits. */
#define BITS(name, ones)                                                           \
    do {                                                                           \
        mem_event_request_t e;                                                     \
        memset(&e, 0, sizeof(e));                                                  \
        e.name = (ones);                                                           \
        const unsigned char *p = (const unsigned char *)&e;                        \
        int first = -1, width = 0;                                                 \
        for (size_t i = 0; i < sizeof(e) * 8; i++) {                               \
            if (p[i / 8] & (1u << (i % 8))) {                                      \
                if (first < 0)                                                     \
                    first = (int)i;                                                \
                width++;                                                           \
            }                                                                      \
        }                                                                          \
        printf("bits %s %d %d\n", #name, first, width);                            \
    } while (0)

static int do_layout(void)
{
    printf("sizeof sring_header %zu\n", offsetof(struct mem_event_sring, ring));
    FIELD(struct mem_event_sring, req_prod);
    FIELD(struct mem_event_sring, req_event);
    FIELD(struct mem_event_sring, rsp_prod);
    FIELD(struct mem_event_sring, rsp_event);
    FIELD(struct mem_event_sring, pad);
    printf("field ring %zu %zu\n", offsetof(struct mem_event_sring, ring),
           sizeof(((struct mem_event_sring *)0)->ring[0]));
    printf("sizeof entry %zu\n", sizeof(mem_event_request_t));
    FIELD(mem_event_request_t, type);
    FIELD(mem_event_request_t, flags);
    FIELD(mem_event_request_t, vcpu_id);
    FIELD(mem_event_request_t, gfn);
    FIELD(mem_event_request_t, offset);
    FIELD(mem_event_request_t, gla);
    FIELD(mem_event_request_t, p2mt);
    FIELD(mem_event_request_t, reason);
    BITS(access_r, 1);
    BITS(access_w, 1);
    BITS(access_x, 1);
    BITS(gla_valid, 1);
    BITS(available, 0xfff);
    printf("flag VCPU_PAUSED %d\nflag DROP_PAGE %d\nflag EVICT_FAIL %d\nflag FOREIGN %d\nflag DUMMY %d\n",
           MEM_EVENT_FLAG_VCPU_PAUSED, MEM_EVENT_FLAG_DROP_PAGE, MEM_EVENT_FLAG_EVICT_FAIL,
           MEM_EVENT_FLAG_FOREIGN, MEM_EVENT_FLAG_DUMMY);
    return 0;
}

static int do_ringsize(void)
{
    /* The real macro on the real structs, page of 4096 bytes. */
    struct mem_event_sring *ms = malloc(4096);
    struct vm_event_sring *vs = malloc(4096);
    if (!ms || !vs)
        return 1;
    printf("ringsize %zu 4096 %ld\n", sizeof(ms->ring[0]), (long)__RING_SIZE(ms, 4096));
    printf("ringsize %zu 4096 %ld\n", sizeof(vs->ring[0]), (long)__RING_SIZE(vs, 4096));
    /* The same rounding on a sweep of entry and page sizes. */
    static const long pages[] = {64 + 1 * 40, 64 + 4 * 40, 64 + 5 * 40, 1024, 4096, 8192};
    for (size_t p = 0; p < sizeof(pages) / sizeof(pages[0]); p++) {
        for (long esz = 1; esz <= pages[p] - 64; esz++) {
            unsigned long fit = (unsigned long)(pages[p] - 64) / (unsigned long)esz;
            printf("sweep %ld %ld %lu\n", esz, pages[p], (unsigned long)__RD32(fit));
        }
    }
    free(ms);
    free(vs);
    return 0;
}

static int do_encode(void)
{
    unsigned long long v[12];
    while (scanf("%llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                 &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9], &v[10], &v[11]) == 12) {
        mem_event_request_t e;
        memset(&e, 0, sizeof(e));
        e.type = (uint16_t)v[0];
        e.flags = (uint16_t)v[1];
        e.vcpu_id = (uint32_t)v[2];
        e.gfn = v[3];
        e.offset = v[4];
        e.gla = v[5];
        e.p2mt = (uint32_t)v[6];
        e.access_r = v[7] & 1;
        e.access_w = v[8] & 1;
        e.access_x = v[9] & 1;
        e.gla_valid = v[10] & 1;
        e.reason = (uint16_t)v[11];
        const unsigned char *p = (const unsigned char *)&e;
        for (size_t i = 0; i < sizeof(e); i++)
            printf("%02x", p[i]);
        printf("\n");
    }
    return 0;
}

static int do_decode(void)
{
    char line[256];
    while (scanf("%255s", line) == 1) {
        mem_event_request_t e;
        unsigned char *p = (unsigned char *)&e;
        if (strlen(line) != 2 * sizeof(e))
            return 2;
        for (size_t i = 0; i < sizeof(e); i++) {
            unsigned int b;
            if (sscanf(line + 2 * i, "%2x", &b) != 1)
                return 2;
            p[i] = (unsigned char)b;
        }
        printf("%u %u %" PRIu32 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu32 " %u %u %u %u %u %u\n",
               e.type, e.flags, e.vcpu_id, e.gfn, e.offset, e.gla, e.p2mt, e.access_r, e.access_w,
               e.access_x, e.gla_valid, e.reason, e.available);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s layout|ringsize|encode|decode\n", argv[0]);
        return 2;
    }
    if (!strcmp(argv[1], "layout"))
        return do_layout();
    if (!strcmp(argv[1], "ringsize"))
        return do_ringsize();
    if (!strcmp(argv[1], "encode"))
        return do_encode();
    if (!strcmp(argv[1], "decode"))
        return do_decode();
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
