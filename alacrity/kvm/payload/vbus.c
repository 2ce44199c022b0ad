#include "vbus.h"
#include "irq.h"

#define BRIDGE_MAGIC 0xBF53EEF5u
#define HC_VERSION 1
#define IOQ_MAGIC 0x47FA2FE4u
#define IOQ_VERSION 4
#define SHM_MAGIC 0x58FA39DFu
#define SHM_VERSION 1
enum { NEGOTIATE = 0, QREG = 1, SLOWCALL = 2 };
enum { DEVOPEN = 0, DEVCLOSE = 1, DEVCALL = 2, DEVSHM = 3 };
enum { EV_DEVADD = 0, EV_DEVDROP = 1, EV_SHMSIGNAL = 2, EV_SHMCLOSE = 3 };
#define SIG_EVENTQ 0
#define SIG_SHMSIGNAL 8
#define EVENT_SIZE 144
#define EVENTQ_COUNT 16
#define SLOW_OFF 128
#define DATA_OFF 256

static u64 ring_bytes(u32 count) { return 56 + 32ul * count; }

static void ioq_init(volatile struct ioq_ring *r, u32 count) {
    memset((void *)r, 0, ring_bytes(count));
    r->magic = IOQ_MAGIC;
    r->ver = IOQ_VERSION;
    r->count = count;
    r->signal.magic = SHM_MAGIC;
    r->signal.ver = SHM_VERSION;
}

static u32 idx_used(volatile struct ioq_idx *x, u32 count) {
    if (x->head == x->tail) return x->full ? count : 0;
    return (x->tail + count - x->head) % count;
}

/* north pushes at the tail of the valid index (and of inuse, for requests): write the
   descriptors, move the tails, then hand each descriptor to south in order */
static int ioq_push(struct ioq *q, const u64 *cookie, const u64 *ptr, const u64 *len, u32 n,
                    int both) {
    volatile struct ioq_ring *r = q->r;
    u32 count = q->count;
    volatile struct ioq_idx *v = &r->idx[0], *u = &r->idx[1];
    if (n > count - idx_used(v, count)) return -1;
    u32 start = v->tail, pos = start;
    if (both && u->tail != start) return -2;
    for (u32 k = 0; k < n; k++) {
        volatile struct ioq_desc *d = &r->ring[pos];
        if (d->sown != NORTH) return -3;
        d->cookie = cookie[k];
        d->ptr = ptr[k];
        d->len = len[k];
        d->valid = 1;
        if (++pos == count) pos = 0;
    }
    compiler_barrier();
    if (v->head == pos) v->full = 1;
    v->tail = pos;
    if (both) {
        if (u->head == pos) u->full = 1;
        u->tail = pos;
    }
    compiler_barrier();                    /* x86 keeps stores in order */
    pos = start;
    for (u32 k = 0; k < n; k++) {
        r->ring[pos].sown = SOUTH;
        if (++pos == count) pos = 0;
    }
    return 0;
}

int ioq_post(struct ioq *q, const u64 *cookie, const u64 *ptr, const u64 *len, u32 n) {
    return ioq_push(q, cookie, ptr, len, n, 1);
}

u32 ioq_reap(struct ioq *q, u64 *cookies, u32 max) {
    volatile struct ioq_ring *r = q->r;
    volatile struct ioq_idx *v = &r->idx[0];
    u32 count = q->count, pos = v->head, used = idx_used(v, count), n = 0;
    if (pos >= count) return 0;
    while (n < used && n < max && r->ring[pos].sown == NORTH) {
        compiler_barrier();
        cookies[n++] = r->ring[pos].cookie;
        if (++pos == count) pos = 0;
    }
    if (n) {
        v->head = pos;
        if (v->full) v->full = 0;
    }
    return n;
}

int ioq_inject(struct ioq *q) {
    volatile u8 *south = q->r->signal.irq[SOUTH];
    south[2] = 1;                          /* dirty */
    barrier();                             /* before we look at enabled and pending */
    if (south[0] && (q->always || !south[1])) {
        south[1] = 1;
        outl((u16)q->doorbell_port, q->handle);   /* an ioeventfd: stays in the kernel */
        return 1;
    }
    return 0;
}

void ioq_mute(struct ioq *q) { q->r->signal.irq[NORTH][0] = 0; }
void ioq_unmute(struct ioq *q) { q->r->signal.irq[NORTH][0] = 1; }

/* -- the bridge ------------------------------------------------------------------------- */
static s64 bridgecall(struct vbus *b, u32 vector, u32 len, u64 datap) {
    *(volatile u64 *)b->base = vector | (u64)len << 32;
    *(volatile u64 *)(b->base + 8) = datap;
    return (s64)(int)mmio_read32(b->base);          /* the read runs it */
}

static s64 hypercall(struct vbus *b, u32 nr, u32 len) {
    u32 *desc = (u32 *)(b->scratch + SLOW_OFF);
    desc[0] = nr;
    desc[1] = len;
    *(u64 *)(desc + 2) = (u64)b->scratch;
    return bridgecall(b, SLOWCALL, 16, (u64)desc);
}

/* take the events waiting on the event queue; DEVADD fills the device table */
void vbus_take_events(struct vbus *b) {
    volatile struct ioq_ring *r = b->eventq.r;
    volatile struct ioq_idx *u = &r->idx[1];
    u32 count = b->eventq.count, taken = 0;
    for (;;) {
        u32 pos = u->head;
        if (pos >= count || idx_used(u, count) == 0 || r->ring[pos].sown != NORTH) {
            if (taken) ioq_inject(&b->eventq);     /* room again, if south waits for it */
            return;
        }
        taken++;
        compiler_barrier();
        u8 *ev = (u8 *)r->ring[pos].ptr;
        if (ev >= b->events && ev + EVENT_SIZE <= b->events + EVENT_SIZE * count
                && *(u32 *)ev == EV_DEVADD && b->ndev < 8) {
            b->devids[b->ndev] = (u32)*(u64 *)(ev + 8);
            memcpy(b->types[b->ndev], ev + 16, 31);
            b->types[b->ndev][31] = 0;
            b->ndev++;
        }
        r->ring[pos].len = EVENT_SIZE;     /* the buffer goes back to south */
        u32 next = pos + 1 == count ? 0 : pos + 1;
        u->head = next;
        if (u->full) u->full = 0;
        compiler_barrier();
        r->ring[pos].sown = SOUTH;
    }
}

int vbus_open(struct mailbox *mb, struct vbus *b, u64 base, u16 pio) {
    b->base = base;
    b->pio = pio;
    b->ndev = 0;
    b->next_cookie = 1;
    b->scratch = heap_alloc(mb, 4096, 4096);
    if (!b->scratch) return -1;
    u32 *neg = (u32 *)(b->scratch + DATA_OFF);
    neg[0] = BRIDGE_MAGIC; neg[1] = HC_VERSION; neg[2] = neg[3] = 0;
    if (bridgecall(b, NEGOTIATE, 16, (u64)neg) || neg[0] != BRIDGE_MAGIC || neg[1] != HC_VERSION)
        return -2;
    /* the event queue: north posts empty event buffers on the valid index */
    u32 count = EVENTQ_COUNT;
    b->eventq.r = heap_alloc(mb, ring_bytes(count), 64);
    b->events = heap_alloc(mb, (u64)EVENT_SIZE * count, 64);
    if (!b->eventq.r || !b->events) return -3;
    b->eventq.count = count;
    b->eventq.doorbell_port = pio + SIG_EVENTQ;
    b->eventq.handle = 0;
    b->eventq.always = 0;
    ioq_init(b->eventq.r, count);
    u64 cookie[EVENTQ_COUNT], ptr[EVENTQ_COUNT], len[EVENTQ_COUNT];
    for (u32 i = 0; i < count; i++) {
        cookie[i] = i; ptr[i] = (u64)b->events + (u64)EVENT_SIZE * i; len[i] = EVENT_SIZE;
    }
    if (ioq_push(&b->eventq, cookie, ptr, len, count, 0)) return -4;
    if (irq_mode) ioq_unmute(&b->eventq);   /* CPL0: the bus interrupt wakes us */
    else ioq_mute(&b->eventq);             /* we poll the event queue */
    u8 *reg = b->scratch + DATA_OFF;
    memset(reg, 0, 32);
    *(u32 *)reg = 1;
    *(u32 *)(reg + 8) = count;
    *(u64 *)(reg + 16) = (u64)b->eventq.r;
    *(u64 *)(reg + 24) = (u64)b->events;
    if (bridgecall(b, QREG, 32, (u64)reg)) return -5;
    vbus_take_events(b);                   /* the DEVADDs arrive at once */
    return 0;
}

/* -- vblock -------------------------------------------------------------------------------- */
int vblock_open(struct mailbox *mb, struct vbus *b, struct vblock *v, u32 devid, u32 qsize,
                int always) {
    v->b = b;
    u8 *a = b->scratch;
    /* DEVOPEN {devid, version, handle out} */
    memset(a, 0, 64);
    *(u32 *)a = devid; *(u32 *)(a + 4) = 1;
    if (hypercall(b, DEVOPEN, 16)) return -10;
    v->devh = *(u64 *)(a + 8);
    /* DEVCALL QUERY (func 0): capacity, block size, flags, max segments */
    u8 *out = b->scratch + DATA_OFF;
    memset(out, 0, 24);
    memset(a, 0, 32);
    *(u64 *)a = v->devh; *(u32 *)(a + 8) = 0; *(u32 *)(a + 12) = 24;
    *(u64 *)(a + 24) = (u64)out;
    if (hypercall(b, DEVCALL, 32)) return -11;
    v->capacity = *(u64 *)out;
    /* the request queue, and DEVSHM with its signal (cookie 1) */
    v->q.count = qsize;
    v->q.r = heap_alloc(mb, ring_bytes(qsize), 64);
    if (!v->q.r) return -12;
    ioq_init(v->q.r, qsize);
    v->q.always = always;
    memset(a, 0, 48);
    *(u64 *)a = v->devh; *(u32 *)(a + 8) = 0; *(u32 *)(a + 12) = (u32)ring_bytes(qsize);
    *(u32 *)(a + 24) = 8;                  /* the signal's offset in the ring */
    *(u64 *)(a + 32) = b->next_cookie++;   /* cookie */
    *(u64 *)(a + 40) = (u64)v->q.r;
    s64 h = hypercall(b, DEVSHM, 48);
    if (h <= 0) return -13;
    v->q.handle = (u32)h;
    v->q.doorbell_port = b->pio + SIG_SHMSIGNAL;
    ioq_mute(&v->q);                       /* we poll for completions */
    return 0;
}

/* -- venet ----------------------------------------------------------------------------------- */
#define VENET_BUF 1536

static s64 devcall(struct vbus *b, u64 devh, u32 func, u32 len) {
    u8 *a = b->scratch;
    memset(a, 0, 32);
    *(u64 *)a = devh; *(u32 *)(a + 8) = func; *(u32 *)(a + 12) = len;
    *(u64 *)(a + 24) = (u64)(b->scratch + DATA_OFF);
    return hypercall(b, DEVCALL, 32);
}

static int queue_shm(struct mailbox *mb, struct vbus *b, u64 devh, struct ioq *q, u32 id,
                     u32 count, int always) {
    q->count = count;
    q->r = heap_alloc(mb, ring_bytes(count), 64);
    if (!q->r) return -1;
    ioq_init(q->r, count);
    q->always = always;
    u8 *a = b->scratch;
    memset(a, 0, 48);
    *(u64 *)a = devh; *(u32 *)(a + 8) = id; *(u32 *)(a + 12) = (u32)ring_bytes(count);
    *(u32 *)(a + 24) = 8;
    *(u64 *)(a + 32) = b->next_cookie++;
    *(u64 *)(a + 40) = (u64)q->r;
    s64 h = hypercall(b, DEVSHM, 48);
    if (h <= 0) return -2;
    q->handle = (u32)h;
    q->doorbell_port = b->pio + SIG_SHMSIGNAL;
    return 0;
}

int venet_open(struct mailbox *mb, struct vbus *b, struct venet *v, u32 devid, u32 qsize,
               int always) {
    v->b = b;
    if (qsize > 256) qsize = 256;
    u8 *a = b->scratch;
    memset(a, 0, 64);
    *(u32 *)a = devid; *(u32 *)(a + 4) = 1;
    if (hypercall(b, DEVOPEN, 16)) return -30;
    v->devh = *(u64 *)(a + 8);
    if (devcall(b, v->devh, 2, 6) < 0) return -31;               /* MACQUERY */
    memcpy(v->mac, b->scratch + DATA_OFF, 6);
    if (queue_shm(mb, b, v->devh, &v->rx, 0, qsize, always)) return -32;
    if (queue_shm(mb, b, v->devh, &v->tx, 1, qsize, always)) return -33;
    v->rx_buf = heap_alloc(mb, (u64)VENET_BUF * qsize, 64);
    v->tx_buf = heap_alloc(mb, (u64)VENET_BUF * qsize, 64);
    v->tx_free = heap_alloc(mb, 2ul * qsize, 8);
    if (!v->rx_buf || !v->tx_buf || !v->tx_free) return -34;
    for (u32 i = 0; i < qsize; i++) {
        v->s_cookie[i] = i; v->s_ptr[i] = (u64)v->rx_buf + (u64)VENET_BUF * i;
        v->s_len[i] = VENET_BUF;
        v->tx_free[i] = (u16)i;
    }
    if (ioq_push(&v->rx, v->s_cookie, v->s_ptr, v->s_len, qsize, 0)) return -35;
    v->ntx = v->ntx_free = (u16)qsize;
    v->staged = 0;
    if (devcall(b, v->devh, 0, 0) < 0) return -36;               /* LINKUP */
    if (!always) { ioq_mute(&v->rx); ioq_mute(&v->tx); }
    return 0;
}

int venet_send(struct venet *v, const u8 *frame, u32 len) {
    if (!v->ntx_free) venet_reclaim(v);
    if (!v->ntx_free || len > VENET_BUF || v->staged >= 256) return -1;
    u16 slot = v->tx_free[--v->ntx_free];
    u8 *buf = v->tx_buf + (u64)VENET_BUF * slot;
    memcpy(buf, frame, len);
    v->s_cookie[v->staged] = slot; v->s_ptr[v->staged] = (u64)buf; v->s_len[v->staged] = len;
    v->staged++;
    return 0;
}

int venet_kick_tx(struct venet *v) {
    if (v->staged) {
        if (ioq_post(&v->tx, v->s_cookie, v->s_ptr, v->s_len, v->staged)) return -1;
        v->staged = 0;
    }
    return ioq_inject(&v->tx);
}

int venet_reclaim(struct venet *v) {
    u64 done[64];
    u32 n, total = 0;
    while ((n = ioq_reap(&v->tx, done, 64))) {
        for (u32 k = 0; k < n; k++) {
            if (done[k] >= v->ntx) return -2;
            v->tx_free[v->ntx_free++] = (u16)done[k];
        }
        total += n;
    }
    return (int)total;
}

int venet_recv(struct venet *v, u8 **frame, u32 *len) {
    volatile struct ioq_ring *r = v->rx.r;
    volatile struct ioq_idx *u = &r->idx[1];
    u32 pos = u->head;
    if (pos >= v->rx.count) return -2;
    if (idx_used(u, v->rx.count) == 0 || r->ring[pos].sown != NORTH) return -1;
    compiler_barrier();
    u64 i = r->ring[pos].cookie, n = r->ring[pos].len;
    if (i >= v->rx.count || n > VENET_BUF) return -2;
    *frame = v->rx_buf + (u64)VENET_BUF * i;
    *len = (u32)n;
    return 0;
}

void venet_release(struct venet *v) {
    volatile struct ioq_ring *r = v->rx.r;
    volatile struct ioq_idx *u = &r->idx[1];
    u32 pos = u->head;
    r->ring[pos].len = VENET_BUF;
    u->head = pos + 1 == v->rx.count ? 0 : pos + 1;
    if (u->full) u->full = 0;
    compiler_barrier();
    r->ring[pos].sown = SOUTH;
}

int venet_kick_rx(struct venet *v) { return ioq_inject(&v->rx); }

static u32 vblock_io(struct mailbox *mb, struct vblock *v, struct vblock_req *req, u32 type,
                     u64 sector, u8 *data, u32 len) {
    req->type = type; req->status = 0xFF; req->sector = sector;
    req->count = len ? 1 : 0;
    req->iov[0].len = len; req->iov[0].ptr = (u64)data;
    u64 cookie = 7, ptr = (u64)req, rlen = len ? 40 : 24;
    if (ioq_post(&v->q, &cookie, &ptr, &rlen, 1)) return 0x101;
    ioq_inject(&v->q);
    u64 deadline = rdtsc() + mb->tsc_khz * 5000, got;
    while (!ioq_reap(&v->q, &got, 1)) {
        if (rdtsc() > deadline) return 0x100;
        if (irq_mode) vbus_sleep(v->b, &v->q, ioq_done);
    }
    return req->status;
}

static u8 pattern(u64 seed, u64 sector, u32 i) { return (u8)(seed * 7 + sector * 31 + i); }

int vblock_selftest(struct mailbox *mb, struct vblock *v, int slot, int pattern_mode) {
    struct vblock_req *req = heap_alloc(mb, 64, 64);
    u8 *data = heap_alloc(mb, 4096, 4096), *back = heap_alloc(mb, 4096, 4096);
    if (!req || !data || !back) return -20;
    u64 seed = mb->args[0], first = mb->args[1], count = mb->args[2], ops = 0, errors = 0;
    for (u64 s = first; s < first + count; s += 8) {
        if (pattern_mode) {
            for (u32 i = 0; i < 4096; i++) data[i] = pattern(seed, s + i / 512, i % 512);
        } else {
            if (vblock_io(mb, v, req, 0, s, data, 4096)) errors++;
            ops++;
        }
        if (vblock_io(mb, v, req, 1, s, data, 4096)) errors++;
        if (vblock_io(mb, v, req, 4, 0, 0, 0)) errors++;
        if (vblock_io(mb, v, req, 0, s, back, 4096)) errors++;
        ops += 3;
        if (memcmp(data, back, 4096)) errors++;
    }
    mb->results[2 * slot] += ops;            /* several devices may share a slot (a bus) */
    mb->results[2 * slot + 1] += errors;
    return errors ? -21 : 0;
}

/* CPL0 mode: halt until the bus interrupt says something happened on `q`. First
   acknowledge what came before, in shared memory as shm-signal's wakeup does: take the
   events (their buffers go back), clear dirty and pending on the event queue's signal and
   on q's, so the next signal crosses again; then look once more and halt. A signal that
   lands after the acknowledgement finds pending clear and interrupts us. */
void vbus_sleep(struct vbus *b, struct ioq *q, int (*ready)(struct ioq *)) {
    volatile u8 *mine = q->r->signal.irq[NORTH];
    volatile u8 *bus = b->eventq.r->signal.irq[NORTH];
    mine[0] = 1;                                   /* enabled */
    mine[2] = 0;                                   /* dirty */
    bus[2] = 0;
    barrier();
    vbus_take_events(b);
    bus[1] = 0;                                    /* pending: acknowledged */
    mine[1] = 0;
    barrier();
    u64 seen = irq_count;
    if (!ready(q)) irq_wait(seen);
}

int ioq_done(struct ioq *q) {
    volatile struct ioq_ring *r = q->r;
    volatile struct ioq_idx *v = &r->idx[0];
    u32 pos = v->head;
    return pos < q->count && idx_used(v, q->count) && r->ring[pos].sown == NORTH;
}

int ioq_ready(struct ioq *q) {
    volatile struct ioq_ring *r = q->r;
    volatile struct ioq_idx *u = &r->idx[1];
    u32 pos = u->head;
    return pos < q->count && idx_used(u, q->count) && r->ring[pos].sown == NORTH;
}
