#include "virtio.h"

enum { MAGIC = 0x000, VERSION = 0x004, DEVICE_ID = 0x008, DEV_FEATURES = 0x010,
       DEV_FEATURES_SEL = 0x014, DRV_FEATURES = 0x020, DRV_FEATURES_SEL = 0x024,
       QUEUE_SEL = 0x030, QUEUE_NUM_MAX = 0x034, QUEUE_NUM = 0x038, QUEUE_READY = 0x044,
       QUEUE_NOTIFY = 0x050, STATUS = 0x070, DESC_LO = 0x080, DESC_HI = 0x084,
       DRIVER_LO = 0x090, DRIVER_HI = 0x094, DEVICE_LO = 0x0A0, DEVICE_HI = 0x0A4 };
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8, S_NEEDS_RESET = 64 };

static u32 rd(struct vdev *d, u32 off) { return mmio_read32(d->base + off); }
static void wr(struct vdev *d, u32 off, u32 v) { mmio_write32(d->base + off, v); }

int virtio_init(struct vdev *d, u64 base, u64 want) {
    d->base = base;
    if (rd(d, MAGIC) != 0x74726976 || rd(d, VERSION) != 2) return -1;
    d->device_id = rd(d, DEVICE_ID);
    wr(d, STATUS, 0);
    wr(d, STATUS, S_ACK);
    wr(d, STATUS, S_ACK | S_DRIVER);
    wr(d, DEV_FEATURES_SEL, 0);
    u64 offered = rd(d, DEV_FEATURES);
    wr(d, DEV_FEATURES_SEL, 1);
    offered |= (u64)rd(d, DEV_FEATURES) << 32;
    d->features = offered & (want | (1ul << 32));       /* VIRTIO_F_VERSION_1 always */
    wr(d, DRV_FEATURES_SEL, 0);
    wr(d, DRV_FEATURES, (u32)d->features);
    wr(d, DRV_FEATURES_SEL, 1);
    wr(d, DRV_FEATURES, (u32)(d->features >> 32));
    wr(d, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(rd(d, STATUS) & S_FEATURES_OK)) return -2;
    return 0;
}

u32 virtio_queue_max(struct vdev *d, u16 index) {
    wr(d, QUEUE_SEL, index);
    return rd(d, QUEUE_NUM_MAX);
}

int virtio_set_queue(struct vdev *d, u16 index, u16 size, u64 desc, u64 driver, u64 device) {
    wr(d, QUEUE_SEL, index);
    wr(d, QUEUE_NUM, size);
    wr(d, DESC_LO, (u32)desc); wr(d, DESC_HI, (u32)(desc >> 32));
    wr(d, DRIVER_LO, (u32)driver); wr(d, DRIVER_HI, (u32)(driver >> 32));
    wr(d, DEVICE_LO, (u32)device); wr(d, DEVICE_HI, (u32)(device >> 32));
    wr(d, QUEUE_READY, 1);
    return 0;
}

int virtio_queue(struct mailbox *mb, struct vdev *d, struct split *q, u16 index, u16 size) {
    u32 max = virtio_queue_max(d, index);
    if (!max) return -1;
    if (size > max) size = (u16)max;
    while (size & (size - 1)) size &= (u16)(size - 1);   /* split rings: a power of two */
    q->size = size;
    q->index = index;
    q->desc = heap_alloc(mb, 16ul * size, 4096);
    q->avail = heap_alloc(mb, 6 + 2ul * size, 64);
    q->used = heap_alloc(mb, 6 + 8ul * size, 4096);
    if (!q->desc || !q->avail || !q->used) return -2;
    for (u16 i = 0; i < size; i++) q->desc[i].next = (u16)(i + 1);
    q->free_head = 0;
    q->num_free = size;
    q->last_used = q->avail_idx = q->kick_old = 0;
    q->notify = d->base + QUEUE_NOTIFY;
    return virtio_set_queue(d, index, size, (u64)q->desc, (u64)q->avail, (u64)q->used);
}

void virtio_ready(struct vdev *d) { wr(d, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK); }
u32 virtio_status(struct vdev *d) { return rd(d, STATUS); }

int split_add(struct split *q, const u64 *addr, const u32 *len, int n, int out) {
    if (n < 1 || q->num_free < n) return -1;
    u16 head = q->free_head, i = head, last = head;
    for (int k = 0; k < n; k++) {
        struct vring_desc *dd = &q->desc[i];
        dd->addr = addr[k];
        dd->len = len[k];
        dd->flags = (u16)((k >= out ? VIRTQ_DESC_F_WRITE : 0) | (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
        last = i;
        i = dd->next;
    }
    q->free_head = q->desc[last].next;
    q->num_free = (u16)(q->num_free - n);
    q->avail[2 + (q->avail_idx & (q->size - 1))] = head;
    compiler_barrier();                      /* x86: stores are not reordered with stores */
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
    return head;
}

void split_kick(struct split *q) {
    barrier();
    mmio_write32(q->notify, q->index);       /* an ioeventfd: never leaves the kernel */
}

int split_get(struct split *q, u32 *written) {
    u16 idx = (u16)(q->used[0] >> 16);
    if (idx == q->last_used) return -1;
    compiler_barrier();
    u32 slot = 1 + 2u * (q->last_used & (q->size - 1));
    u32 id = q->used[slot];
    *written = q->used[slot + 1];
    q->last_used++;
    if (id >= q->size) return -2;
    /* give the chain back to the free list */
    u16 i = (u16)id, n = 1;
    while (q->desc[i].flags & VIRTQ_DESC_F_NEXT) { i = q->desc[i].next; n++; }
    q->desc[i].next = q->free_head;
    q->free_head = (u16)id;
    q->num_free = (u16)(q->num_free + n);
    return (int)id;
}
