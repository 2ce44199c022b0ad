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

/* The one interrupt vector the payload uses (CPL0 mode): save the registers C may
   clobber, count the interrupt and acknowledge it at the local APIC (irq.c), return. */
    .text
    .globl irq_entry
irq_entry:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    cld
    call irq_handler
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq
