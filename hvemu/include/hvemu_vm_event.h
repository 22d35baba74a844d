/*
 * hvemu_vm_event.h -- the entries of the two other ring ABIs a domain may be created with
 * (hvemu create --abi 4.2 | vm_event; docs/contract.md section 2), for daemons written in C.
 *
 *   struct hvemu_mem_event_42     Xen 4.2.0's mem_event_st: u32 flags (the MEM_EVENT_FLAG_* bits of
 *                                 hvemu_mem_event.h), no type; 40 bytes, 64 slots a page.
 *   struct hvemu_vm_event         Xen 4.17's vm_event_st, VM_EVENT_INTERFACE_VERSION 7: 400 bytes,
 *                                 8 slots a page (HVEMU_VM_EVENT_RING_SLOTS).
 *
 * The page header (the four ring.h indices and the 48-byte pad) is the same for every ABI; so are the
 * rules (ring.h's).  The register block of a vm_event request is zero except rip (the gla of an
 * access, breakpoint or step, when there is one) and the control register a write_ctrlreg event names:
 * hvemu's guest has no other registers.  The offsets are checked against hvemu/abi.py by
 * tests/unit/test_vm_event_header.py.  Written from Xen's public headers' documented layout; no Xen
 * code is copied here.
 */
#ifndef HVEMU_VM_EVENT_H
#define HVEMU_VM_EVENT_H

#include <stdint.h>

/* ---- Xen 4.2.0: mem_event_st with a u32 flags and no type ------------------------------------------ */

struct hvemu_mem_event_42 {
    uint32_t flags;     /* MEM_EVENT_FLAG_* */
    uint32_t vcpu_id;
    uint64_t gfn;
    uint64_t offset;
    uint64_t gla;       /* if gla_valid */
    uint32_t p2mt;
    uint16_t access_r : 1;
    uint16_t access_w : 1;
    uint16_t access_x : 1;
    uint16_t gla_valid : 1;
    uint16_t available : 12;
    uint16_t reason;    /* MEM_EVENT_REASON_* */
};

/* ---- Xen 4.17: vm_event_st ------------------------------------------------------------------------ */

#define HVEMU_VM_EVENT_INTERFACE_VERSION 0x00000007
#define HVEMU_VM_EVENT_RING_SLOTS 8

#define HVEMU_VM_EVENT_FLAG_VCPU_PAUSED (1 << 0)
#define HVEMU_VM_EVENT_FLAG_FOREIGN (1 << 1)

#define HVEMU_VM_EVENT_REASON_MEM_ACCESS 1
#define HVEMU_VM_EVENT_REASON_MEM_SHARING 2
#define HVEMU_VM_EVENT_REASON_MEM_PAGING 3
#define HVEMU_VM_EVENT_REASON_WRITE_CTRLREG 4
#define HVEMU_VM_EVENT_REASON_SOFTWARE_BREAKPOINT 6
#define HVEMU_VM_EVENT_REASON_SINGLESTEP 7

#define HVEMU_VM_EVENT_X86_CR0 0
#define HVEMU_VM_EVENT_X86_CR3 1
#define HVEMU_VM_EVENT_X86_CR4 2

#define HVEMU_MEM_ACCESS_R (1 << 0)
#define HVEMU_MEM_ACCESS_W (1 << 1)
#define HVEMU_MEM_ACCESS_X (1 << 2)
#define HVEMU_MEM_ACCESS_GLA_VALID (1 << 3)

#define HVEMU_MEM_PAGING_DROP_PAGE (1 << 0)
#define HVEMU_MEM_PAGING_EVICT_FAIL (1 << 1)

struct hvemu_vm_event_paging {
    uint64_t gfn;
    uint32_t p2mt;
    uint32_t flags;     /* HVEMU_MEM_PAGING_* */
};

struct hvemu_vm_event_sharing {
    uint64_t gfn;
    uint32_t p2mt;
    uint32_t _pad;
};

struct hvemu_vm_event_mem_access {
    uint64_t gfn;
    uint64_t offset;
    uint64_t gla;       /* if HVEMU_MEM_ACCESS_GLA_VALID */
    uint32_t flags;     /* HVEMU_MEM_ACCESS_* */
    uint32_t _pad;
};

struct hvemu_vm_event_write_ctrlreg {
    uint32_t index;     /* HVEMU_VM_EVENT_X86_CR* */
    uint32_t _pad;
    uint64_t new_value;
    uint64_t old_value; /* 0 here: the seed's event never carried it */
};

struct hvemu_vm_event_debug {
    uint64_t gfn;
    uint64_t pending_dbg;
    uint32_t insn_length; /* 1: an INT3 */
    uint8_t type;         /* 6: X86_EVENTTYPE_SW_EXCEPTION */
    uint8_t _pad[3];
};

struct hvemu_vm_event_singlestep {
    uint64_t gfn;
};

/* The x86 register block, in Xen's order (344 bytes). */
struct hvemu_vm_event_regs_x86 {
    uint64_t rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rflags, dr6, dr7, rip, cr0, cr2, cr3, cr4;
    uint64_t sysenter_cs, sysenter_esp, sysenter_eip;
    uint64_t msr_efer, msr_star, msr_lstar;
    uint64_t gdtr_base, npt_base, vmtrace_pos;
    uint32_t cs_base, ss_base, ds_base, es_base;
    uint64_t fs_base, gs_base;
    uint32_t cs, ss, ds, es, fs, gs; /* selector registers: limit:20, ar:12 each */
    uint64_t shadow_gs;
    uint16_t gdtr_limit, cs_sel, ss_sel, ds_sel, es_sel, fs_sel, gs_sel, _pad;
};

struct hvemu_vm_event {
    uint32_t version;   /* HVEMU_VM_EVENT_INTERFACE_VERSION */
    uint32_t flags;     /* HVEMU_VM_EVENT_FLAG_* */
    uint32_t reason;    /* HVEMU_VM_EVENT_REASON_* */
    uint32_t vcpu_id;
    uint16_t altp2m_idx;
    uint16_t _pad[3];
    union {
        struct hvemu_vm_event_paging mem_paging;
        struct hvemu_vm_event_sharing mem_sharing;
        struct hvemu_vm_event_mem_access mem_access;
        struct hvemu_vm_event_write_ctrlreg write_ctrlreg;
        struct hvemu_vm_event_debug software_breakpoint;
        struct hvemu_vm_event_singlestep singlestep;
        uint8_t _size[32];
    } u;
    union {
        struct hvemu_vm_event_regs_x86 x86;
    } regs;
};

_Static_assert(sizeof(struct hvemu_mem_event_42) == 40, "Xen 4.2.0's mem_event_st is 40 bytes");
_Static_assert(sizeof(struct hvemu_vm_event_regs_x86) == 344, "vm_event_regs_x86 is 344 bytes");
_Static_assert(sizeof(struct hvemu_vm_event) == 400, "vm_event_st is 400 bytes");

#endif
