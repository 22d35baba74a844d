/*
 * The ring macros of hvemu/include/hvemu_mem_event.h behave as Xen 4.2's
 * public/io/ring.h, pitfalls included (what the header's comment warns of).
 * Prints one "ok <name>" line per check, or "FAIL <name>" and exits 1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hvemu_mem_event.h"

static int failed;

static void check(int ok, const char *name)
{
    printf("%s %s\n", ok ? "ok" : "FAIL", name);
    failed |= !ok;
}

int main(void)
{
    static union {
        mem_event_sring_t s;
        unsigned char page[4096];
    } u;
    mem_event_sring_t *s = &u.s;
    mem_event_back_ring_t b;

    memset(u.page, 0xa5, sizeof(u.page));
    SHARED_RING_INIT(s);
    check(s->req_prod == 0 && s->rsp_prod == 0 && s->req_event == 1 && s->rsp_event == 1 && s->pad[47] == 0,
          "shared_ring_init_zeroes_the_indices");

    BACK_RING_INIT(&b, s, 4096);
    check(RING_SIZE(&b) == 64 && b.req_cons == 0 && b.rsp_prod_pvt == 0, "a_page_is_64_slots");
    BACK_RING_INIT(&b, s, HVEMU_RING_BYTES(8));
    check(RING_SIZE(&b) == 8, "ring_bytes_8_is_8_slots");
    check(HVEMU_RING_BYTES(8) == 64 + 8 * 40, "ring_bytes_8_is_384");

    s->req_prod = 7;
    s->rsp_prod = 3;
    BACK_RING_ATTACH(&b, s, 4096);
    check(b.req_cons == 7 && b.rsp_prod_pvt == 3, "back_ring_attach_skips_to_req_prod_as_xen");
    check(RING_HAS_UNCONSUMED_REQUESTS(&b) == 0, "so_unanswered_requests_are_not_seen");
    HVEMU_BACK_RING_REATTACH(&b, s, 4096);
    check(b.req_cons == 3 && b.rsp_prod_pvt == 3 && RING_HAS_UNCONSUMED_REQUESTS(&b) == 4,
          "reattach_serves_every_request_after_rsp_prod");

    /* Free-running indices across the 2^32 wrap. */
    s->req_prod = 2;
    s->rsp_prod = 0xfffffffe;
    HVEMU_BACK_RING_REATTACH(&b, s, 4096);
    check(RING_HAS_UNCONSUMED_REQUESTS(&b) == 4, "indices_wrap");
    check(RING_GET_REQUEST(&b, 0xffffffffu) == &s->ring[63].req, "slot_is_index_masked");

    int notify;
    b.rsp_prod_pvt += 2;
    s->rsp_event = b.rsp_prod_pvt; /* the front end asked to hear of the 2nd response */
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&b, notify);
    check(notify && s->rsp_prod == b.rsp_prod_pvt, "push_notifies_when_rsp_event_is_passed");
    b.rsp_prod_pvt += 1;
    s->rsp_event = b.rsp_prod_pvt + 5;
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&b, notify);
    check(!notify, "push_is_quiet_before_rsp_event");

    int work;
    b.req_cons = s->req_prod;
    RING_FINAL_CHECK_FOR_REQUESTS(&b, work);
    check(!work && s->req_event == b.req_cons + 1, "final_check_rearms_req_event");
    return failed;
}
