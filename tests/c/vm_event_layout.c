/* Print the offsets of hvemu_vm_event.h for tests/unit/test_vm_event_header.py: "field <name> <offset>". */
#include <stddef.h>
#include <stdio.h>

#include "hvemu_vm_event.h"

#define F(type, name) printf("field %s %zu\n", #name, offsetof(type, name))
#define F42(name) printf("field 4.2.%s %zu\n", #name, offsetof(struct hvemu_mem_event_42, name))

int main(void)
{
    F(struct hvemu_vm_event, version);
    F(struct hvemu_vm_event, flags);
    F(struct hvemu_vm_event, reason);
    F(struct hvemu_vm_event, vcpu_id);
    F(struct hvemu_vm_event, altp2m_idx);
    F(struct hvemu_vm_event, u);
    F(struct hvemu_vm_event, regs);
    F(struct hvemu_vm_event, regs.x86.rip);
    F(struct hvemu_vm_event, regs.x86.cr0);
    F(struct hvemu_vm_event, regs.x86.cr3);
    F(struct hvemu_vm_event, regs.x86.cr4);
    F(struct hvemu_vm_event, u.mem_paging.flags);
    F(struct hvemu_vm_event, u.mem_access.flags);
    F(struct hvemu_vm_event, u.write_ctrlreg.new_value);
    F(struct hvemu_vm_event, u.software_breakpoint.insn_length);
    F(struct hvemu_vm_event, u.software_breakpoint.type);
    F42(vcpu_id);
    F42(gfn);
    F42(p2mt);
    F42(reason);
    printf("size vm_event %zu\n", sizeof(struct hvemu_vm_event));
    return 0;
}
