/* Entry: the VMM sets RSP (this vCPU's stack) and RDI (the mailbox), at CPL3 on PVM hosts
   or CPL0 elsewhere, in 64-bit mode with paging on. main() returns a status that we
   report on the exit port; the VMM stops the vCPU there. */
    .section .text.start, "ax"
    .globl _start
_start:
    call main
    mov $0xF4, %dx
    out %eax, %dx
1:  jmp 1b
