#pragma once
#include "rt.h"
extern volatile u64 irq_count;
extern int irq_mode;                 /* 1: CPL0 with interrupts; 0: we poll */
void irq_setup(struct mailbox *mb);
void irq_wait(u64 seen);             /* halt until an interrupt after `seen` arrived */
