/* virtio-mmio (version 2) with a split ring, driven by polling. */
#pragma once
#include "rt.h"

struct vring_desc { u64 addr; u32 len; u16 flags, next; };
struct split {
    u16 size, free_head, num_free, last_used, avail_idx;
    struct vring_desc *desc;
    volatile u16 *avail;                    /* flags, idx, ring[size], used_event */
    volatile u32 *used;                     /* flags|idx, then {id, len} pairs */
    u64 notify;                             /* QueueNotify address */
    u16 index, kick_old;
};
struct vdev { u64 base; u32 device_id; u64 features; };
struct blk_req { u32 type, reserved; u64 sector; };

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

int virtio_init(struct vdev *d, u64 base, u64 want);
int virtio_queue(struct mailbox *mb, struct vdev *d, struct split *q, u16 index, u16 size);
u32 virtio_queue_max(struct vdev *d, u16 index);
int virtio_set_queue(struct vdev *d, u16 index, u16 size, u64 desc, u64 driver, u64 device);
void virtio_ready(struct vdev *d);
u32 virtio_status(struct vdev *d);
/* a chain of n buffers, the first `out` device-readable; returns the head or -1 */
int split_add(struct split *q, const u64 *addr, const u32 *len, int n, int out);
void split_kick(struct split *q);
/* the next used element (id, written), or -1 if none yet */
int split_get(struct split *q, u32 *written);
