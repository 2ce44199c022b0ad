#include "ring.h"

#define PF_NEXT 1
#define PF_WRITE 2
#define PF_AVAIL (1 << 7)
#define PF_USED (1 << 15)
#define EV_ENABLE 0
#define EV_DISABLE 1
#define EV_DESC 2

static int packed_setup(struct mailbox *mb, struct vdev *d, struct ring *r, u16 size) {
    struct packed *p = &r->p;
    p->size = size;
    p->desc = heap_alloc(mb, 16ul * size, 4096);
    p->driver = heap_alloc(mb, 4, 64);
    p->device = heap_alloc(mb, 4, 64);
    p->ndesc = heap_alloc(mb, 2ul * size, 8);
    p->free_ids = heap_alloc(mb, 2ul * size, 8);
    if (!p->desc || !p->driver || !p->device || !p->ndesc || !p->free_ids) return -2;
    for (u16 i = 0; i < size; i++) p->free_ids[i] = (u16)(size - 1 - i);
    p->nfree_ids = size;
    p->num_free = size;
    p->next_avail = p->next_used = 0;
    p->avail_wrap = p->used_wrap = 1;
    p->kick_old = 0;
    p->kick_old_wrap = 1;
    return virtio_set_queue(d, r->index, size, (u64)p->desc, (u64)p->driver, (u64)p->device);
}

int ring_setup(struct mailbox *mb, struct vdev *d, struct ring *r, u16 index, u16 size) {
    r->packed = (d->features >> 34) & 1;
    r->event_idx = (d->features >> 29) & 1;
    r->index = index;
    u32 max = virtio_queue_max(d, index);
    if (!max) return -1;
    if (size > max) size = (u16)max;
    r->size = size;
    r->notify = d->base + 0x050;
    if (r->packed) return packed_setup(mb, d, r, size);
    int rc = virtio_queue(mb, d, &r->s, index, size);
    r->size = r->s.size;
    return rc;
}

static int packed_add(struct packed *p, const u64 *addr, const u32 *len, int n, int out) {
    if (n < 1 || p->num_free < n || !p->nfree_ids) return -1;
    u16 id = p->free_ids[--p->nfree_ids];
    u16 pos = p->next_avail, head = pos;
    u8 wrap = p->avail_wrap;
    u16 bits = (u16)(wrap ? PF_AVAIL : PF_USED), head_flags = 0;
    for (int k = 0; k < n; k++) {
        struct pdesc *dd = &p->desc[pos];
        u16 f = (u16)((k >= out ? PF_WRITE : 0) | (k + 1 < n ? PF_NEXT : 0) | bits);
        dd->addr = addr[k];
        dd->len = len[k];
        dd->id = id;
        if (k == 0) head_flags = f; else dd->flags = f;
        if (++pos == p->size) { pos = 0; wrap ^= 1; bits = (u16)(wrap ? PF_AVAIL : PF_USED); }
    }
    compiler_barrier();                    /* the rest of the chain before its head */
    p->desc[head].flags = head_flags;
    p->ndesc[id] = (u16)n;
    p->num_free = (u16)(p->num_free - n);
    p->next_avail = pos;
    p->avail_wrap = wrap;
    return id;
}

static int packed_get(struct packed *p, u32 *written) {
    u16 f = p->desc[p->next_used].flags;
    u8 avail = (f & PF_AVAIL) != 0, used = (f & PF_USED) != 0;
    if (avail != used || used != p->used_wrap) return -1;
    compiler_barrier();
    u16 id = p->desc[p->next_used].id;
    *written = p->desc[p->next_used].len;
    if (id >= p->size || !p->ndesc[id]) return -2;
    u16 n = p->ndesc[id];
    p->ndesc[id] = 0;
    p->num_free = (u16)(p->num_free + n);
    p->free_ids[p->nfree_ids++] = id;
    u32 next = (u32)p->next_used + n;
    if (next >= p->size) { next -= p->size; p->used_wrap ^= 1; }
    p->next_used = (u16)next;
    return id;
}

int ring_add(struct ring *r, const u64 *addr, const u32 *len, int n, int out) {
    return r->packed ? packed_add(&r->p, addr, len, n, out) : split_add(&r->s, addr, len, n, out);
}

int ring_get(struct ring *r, u32 *written) {
    return r->packed ? packed_get(&r->p, written) : split_get(&r->s, written);
}

static int split_wants_kick(struct ring *r, u16 old) {
    struct split *q = &r->s;
    volatile u16 *used16 = (volatile u16 *)q->used;
    if (r->event_idx) {
        u16 ev = used16[2 + 4 * q->size];
        return (u16)(q->avail_idx - ev - 1) < (u16)(q->avail_idx - old);
    }
    return !(used16[0] & 1);
}

static int packed_wants_kick(struct ring *r) {
    struct packed *p = &r->p;
    u32 ev = *p->device;
    u16 flags = (u16)(ev >> 16);
    if (flags == EV_DISABLE) return 0;
    if (flags != EV_DESC || !r->event_idx) return 1;
    /* off_wrap: the position (and wrap) after which the device wants a kick */
    u16 off = (u16)(ev & 0x7FFF);
    u8 wrap = (u8)((ev >> 15) & 1);
    u32 old = p->kick_old + (p->kick_old_wrap ? 0u : p->size);       /* linear, mod 2*size */
    u32 now = p->next_avail + (p->avail_wrap ? 0u : p->size);
    u32 evl = off + (wrap ? 0u : p->size);
    u32 m = 2u * p->size;
    return (now - evl - 1 + 2 * m) % m < (now - old + m) % m;
}

int ring_kick(struct ring *r, int always) {
    int want;
    barrier();                             /* what we published before what we read */
    if (r->packed) {
        want = always || packed_wants_kick(r);
        r->p.kick_old = r->p.next_avail;
        r->p.kick_old_wrap = r->p.avail_wrap;
    } else {
        want = always || split_wants_kick(r, r->s.kick_old);
        r->s.kick_old = r->s.avail_idx;
    }
    if (want) mmio_write32(r->notify, r->index);
    return want;
}

void ring_no_interrupts(struct ring *r) {
    if (r->packed) *r->p.driver = (u32)EV_DISABLE << 16;
    else { r->s.avail[0] = 1; r->s.avail[2 + r->s.size] = 0x8000; }
}

/* CPL0 mode: ask for an interrupt at the next used buffer, then acknowledge it */
void ring_interrupts_on(struct ring *r) {
    if (r->packed) *r->p.driver = 0;                  /* ENABLE */
    else if (r->event_idx) r->s.avail[2 + r->s.size] = r->s.last_used;
    else r->s.avail[0] = 0;
    barrier();
}

void ring_ack(struct ring *r) {
    u64 base = r->notify - 0x050;
    u32 status = mmio_read32(base + 0x060);            /* InterruptStatus */
    if (status) mmio_write32(base + 0x064, status);    /* InterruptACK */
}

/* is a used buffer waiting? (without taking it) */
int ring_pending(struct ring *r) {
    if (r->packed) {
        u16 f = r->p.desc[r->p.next_used].flags;
        u8 avail = (f & PF_AVAIL) != 0, used = (f & PF_USED) != 0;
        return avail == used && used == r->p.used_wrap;
    }
    return (u16)(r->s.used[0] >> 16) != r->s.last_used;
}
