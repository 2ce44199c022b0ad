/* One driver-side virtqueue, split or packed, polled. */
#pragma once
#include "virtio.h"

struct pdesc { u64 addr; u32 len; u16 id, flags; };
struct packed {
    u16 size, next_avail, next_used, num_free;
    u8 avail_wrap, used_wrap;
    struct pdesc *desc;
    volatile u32 *driver;                  /* driver event suppression: off_wrap | flags << 16 */
    volatile u32 *device;                  /* device event suppression */
    u16 *ndesc;                            /* descriptors per buffer id */
    u16 *free_ids;                         /* a stack of free buffer ids */
    u16 nfree_ids, kick_old;
    u8 kick_old_wrap;
};
struct ring {
    int packed, event_idx;
    u64 notify;
    u16 index, size;
    struct split s;
    struct packed p;
};

int ring_setup(struct mailbox *mb, struct vdev *d, struct ring *r, u16 index, u16 size);
/* a chain of n buffers, the first `out` device-readable; returns its id or -1 */
int ring_add(struct ring *r, const u64 *addr, const u32 *len, int n, int out);
/* the next used buffer's id, -1 if none, -2 if the device broke the rules */
int ring_get(struct ring *r, u32 *written);
/* kick if the device wants it (or always); returns 1 if it kicked */
int ring_kick(struct ring *r, int always);
/* ask for no interrupts: the payload polls */
void ring_no_interrupts(struct ring *r);
void ring_interrupts_on(struct ring *r);
void ring_ack(struct ring *r);
int ring_pending(struct ring *r);
