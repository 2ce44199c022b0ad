/* Interrupts, for CPL0 mode (VMX/SVM hosts): an IDT with one vector, the local APIC
   enabled, the IOAPIC routing each device's pin to that vector, and a wait that halts. */
#include "irq.h"

#define VECTOR 0x30
#define LAPIC 0xFEE00000ul
#define IOAPIC 0xFEC00000ul

struct idt_entry { u16 off0, sel; u8 ist, attr; u16 off1; u32 off2, zero; };
static struct idt_entry idt[256] __attribute__((aligned(16)));
volatile u64 irq_count;
int irq_mode;

extern void irq_entry(void);

void irq_handler(void) {
    irq_count++;
    mmio_write32(LAPIC + 0xB0, 0);               /* EOI */
}

static void ioapic_write(u32 reg, u32 v) {
    mmio_write32(IOAPIC, reg);
    mmio_write32(IOAPIC + 0x10, v);
}

void irq_setup(struct mailbox *mb) {
    u64 h = (u64)irq_entry;
    /* every external vector goes to the one handler (exceptions stay empty: a fault in
       the payload is a triple fault the VMM reports with its RIP) */
    for (u32 v = 32; v < 256; v++) {
        idt[v].off0 = (u16)h;
        idt[v].sel = 0x08;
        idt[v].ist = 0;
        idt[v].attr = 0x8E;                      /* present, DPL0, interrupt gate */
        idt[v].off1 = (u16)(h >> 16);
        idt[v].off2 = (u32)(h >> 32);
    }
    outb(0x21, 0xFF);                            /* the legacy PICs: all masked */
    outb(0xA1, 0xFF);
    struct { u16 limit; u64 base; } __attribute__((packed)) d = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" :: "m"(d));
    mmio_write32(LAPIC + 0xF0, 0x100 | 0xFF);    /* software enable, spurious vector */
    mmio_write32(LAPIC + 0x80, 0);               /* task priority: take everything */
    mmio_write32(LAPIC + 0x350, 1 << 16);        /* LINT0 and LINT1 masked */
    mmio_write32(LAPIC + 0x360, 1 << 16);
    for (u32 i = 0; i < mb->ndevices && i < MAX_DEVICES; i++) {
        u32 pin = mb->gsi[i];
        if (!pin || pin >= 24) continue;
        ioapic_write(0x11 + 2 * pin, 0);         /* destination: APIC 0 */
        ioapic_write(0x10 + 2 * pin, VECTOR);    /* fixed, physical, edge, high, unmasked */
    }
    irq_mode = 1;
}

void irq_wait(u64 seen) {
    /* sti takes effect after the next instruction: an interrupt cannot slip in between
       the check and the halt */
    __asm__ volatile("cli");
    if (irq_count == seen) __asm__ volatile("sti; hlt" ::: "memory");
    __asm__ volatile("sti");
}
