/* The benchmark loops of `alacrity bench --guest kvm`: the same workloads as the process
   guests' (bench/blk.py guest_main), timed with rdtsc. The VMM snapshots its counters when
   we write MARK_START / MARK_END to the mark port; latencies go into a histogram the VMM
   reads (100 ns buckets). The guest polls for completions (it never takes interrupts:
   at CPL3 on PVM it cannot halt). */
#include "rt.h"
#include "virtio.h"
#include "bench.h"
#include "ring.h"
#include "net.h"
#include "vbus.h"
#include "irq.h"

static void mark(u32 what) { outl(MARK_PORT, what); }

static void record(struct mailbox *mb, u64 cycles) {
    u64 ns = cycles * 1000000ul / mb->tsc_khz;
    u64 b = ns / HIST_BUCKET_NS;
    if (b >= HIST_BUCKETS) b = HIST_BUCKETS - 1;
    HIST[b]++;
}

/* the measured window: warm-up, then `seconds` between the VMM's two marks */
struct window { u64 t_start, t_end, t0, t1, seconds; int measuring, done; };

static void window_init(struct window *w, struct mailbox *mb) {
    w->t_start = rdtsc() + mb->args[4] * mb->tsc_khz;       /* args[4]: warm-up ms */
    w->seconds = mb->args[5] * mb->tsc_khz;                  /* args[5]: window ms */
    w->t_end = w->t0 = w->t1 = 0;
    w->measuring = w->done = 0;
}

/* start or end the window; the doorbell counters restart with it */
static void window_check(struct window *w, u64 now, u64 *kicks, u64 *suppressed) {
    if (!w->measuring && !w->done && now >= w->t_start) {
        mark(MARK_START);
        w->measuring = 1;
        w->t0 = rdtsc();
        w->t_end = w->t0 + w->seconds;
        *kicks = *suppressed = 0;
    } else if (w->measuring && now >= w->t_end) {
        w->t1 = rdtsc();
        mark(MARK_END);
        w->measuring = 0;
        w->done = 1;
    }
}

static int window_results(struct mailbox *mb, struct window *w, u64 ops, u64 errors, u64 kicks,
                          u64 suppressed) {
    mb->results[0] = ops;
    mb->results[1] = w->t1 - w->t0;
    mb->results[2] = errors;
    mb->results[3] = kicks;
    mb->results[4] = suppressed;
    return 0;
}

/* where the next request goes: sequential, or uniformly random over the disk (xorshift),
   bs-aligned, as bench/limits.block_offsets lays them out for the Python guests */
struct picker { u64 blocks, step, k, x; int random; };

static void picker_init(struct picker *p, u64 sectors, u64 bs, int random) {
    p->step = bs / 512;
    p->blocks = sectors / p->step ? sectors / p->step : 1;
    p->k = 0;
    p->x = 0x9E3779B97F4A7C15ul;
    p->random = random;
}

static u64 pick(struct picker *p) {
    if (!p->random) return (p->k++ % p->blocks) * p->step;
    p->x ^= p->x << 13; p->x ^= p->x >> 7; p->x ^= p->x << 17;
    return (p->x % p->blocks) * p->step;
}

int bench_blk(struct mailbox *mb, struct vdev *d) {
    u64 depth = mb->args[0], bs = mb->args[1], write = mb->args[2] & 1, notify = mb->args[3];
    u64 qsize = mb->args[6], sectors = mb->args[7];
    int always = notify == NOTIFY_ALWAYS;
    struct ring q;
    if (depth < 1 || depth > 256 || bs > 65536 || !sectors) return -20;
    if (ring_setup(mb, d, &q, 0, (u16)qsize) < 0) return -21;
    if (3 * depth > q.size) return -22;
    virtio_ready(d);
    /* we poll (CPL3, or `poll`): ask for no interrupts, except in `always`, where nothing
       is suppressed on either side; in CPL0 mode we sleep on interrupts instead */
    int sleep = irq_mode && notify != NOTIFY_POLL;
    if (!always && !sleep) ring_no_interrupts(&q);
    struct blk_req *hdr = heap_alloc(mb, 16 * depth, 64);
    u8 *status = heap_alloc(mb, 64 * depth, 64);
    u8 *data = heap_alloc(mb, bs * depth, 4096);
    u64 *t_sub = heap_alloc(mb, 8 * depth, 8);
    u64 *token = heap_alloc(mb, 8 * 1024, 8);      /* head -> slot */
    if (!hdr || !status || !data || !t_sub || !token) return -23;
    u64 ops = 0, errors = 0, kicks = 0, suppressed = 0;
    struct picker pk;
    picker_init(&pk, sectors, bs, (mb->args[2] >> 1) & 1);
    u64 next_sector = pick(&pk);
    u32 type = write ? 1 : 0;
    int inflight = 0;
    struct window w;
    window_init(&w, mb);
    u64 now = rdtsc();
    for (u64 s = 0; s < depth; s++) {
        struct blk_req *h = &hdr[s];
        h->type = type; h->reserved = 0; h->sector = next_sector;
        next_sector = pick(&pk);
        status[64 * s] = 0xFF;
        u64 addr[3] = {(u64)h, (u64)data + bs * s, (u64)&status[64 * s]};
        u32 lens[3] = {16, (u32)bs, 1};
        int head = ring_add(&q, addr, lens, 3, write ? 2 : 1);
        token[head] = s;
        t_sub[s] = now;
        inflight++;
    }
    if (ring_kick(&q, always)) kicks++; else suppressed++;
    int added = 0;
    for (;;) {
        u32 written;
        int head = ring_get(&q, &written);
        if (head < 0) {
            if (head == -2) return -24;
            if (w.done && !inflight) break;
            now = rdtsc();
            if (w.measuring && now >= w.t_end) goto window;
            if (sleep) {                     /* CPL0: halt until the completion interrupt */
                u64 seen = irq_count;
                ring_interrupts_on(&q);
                if (ring_pending(&q)) continue;
                irq_wait(seen);
                ring_ack(&q);
            }
            continue;
        }
        /* take everything that is there before kicking once */
        now = rdtsc();
        do {
            u64 s = token[head];
            inflight--;
            if (status[64 * s]) errors++;
            if (w.measuring) { record(mb, now - t_sub[s]); ops++; }
            if (!w.done) {
                struct blk_req *h = &hdr[s];
                h->sector = next_sector;
                next_sector = pick(&pk);
                status[64 * s] = 0xFF;
                u64 addr[3] = {(u64)h, (u64)data + bs * s, (u64)&status[64 * s]};
                u32 lens[3] = {16, (u32)bs, 1};
                int nh = ring_add(&q, addr, lens, 3, write ? 2 : 1);
                if (nh < 0) return -25;
                token[nh] = s;
                added++;
                t_sub[s] = now;
                inflight++;
            }
        } while ((head = ring_get(&q, &written)) >= 0);
        if (added) {
            if (ring_kick(&q, always)) kicks++; else suppressed++;
            added = 0;
        }
    window:
        window_check(&w, now, &kicks, &suppressed);
    }
    return window_results(mb, &w, ops, errors, kicks, suppressed);
}

/* `alacrity bench net`, on one device with the loopback backend, or two devices joined
   by the pair backend (frames go out on the first and come in on the second; pingpong
   sends them back the other way, two round trips per op). stream keeps the tx ring full
   and counts frames arriving; pingpong keeps one frame in flight. Latency: every 16th
   frame in stream (its sequence number travels in the frame), every op in pingpong. */
static int take_all(struct mailbox *mb, struct net *n, u64 size, u64 *received, int measuring,
                    u64 *ops, u64 *errors, u64 *t_sent, int per_frame, int always,
                    u64 *kicks, u64 *suppressed) {
    u8 *f = 0; u32 len = 0; u16 s = 0;
    int r, got = 0;
    while ((r = net_recv(n, &f, &len, &s)) != -1) {
        if (r == -2) return -42;
        u64 now = rdtsc();
        if (r < 0 || len != size) (*errors)++;
        else {
            u32 seq = *(u32 *)(f + 14);
            if (seq != (u32)*received) (*errors)++;
            else if (measuring && per_frame && (seq & 15) == 0)
                record(mb, now - t_sent[seq & 4095]);
        }
        (*received)++;
        if (measuring && per_frame) (*ops)++;
        net_repost(n, s);
        got++;
    }
    if (got) { if (net_kick_rx(n, always)) (*kicks)++; else (*suppressed)++; }
    return got;
}

int bench_net(struct mailbox *mb, struct net *a, struct net *b) {
    u64 pingpong = mb->args[0], size = mb->args[1], notify = mb->args[2];
    int always = notify == NOTIFY_ALWAYS;
    if (size < 60 || size > 1514) return -40;
    int sleep = irq_mode && notify != NOTIFY_POLL;
    if (!always && !sleep) { net_quiet(a); net_quiet(b); }
    u8 frame[1514];
    for (u32 i = 0; i < size; i++) frame[i] = (u8)(i * 7);
    memset(frame, 0xFF, 6);
    frame[12] = 0x88; frame[13] = 0xB5;
    u64 *t_sent = heap_alloc(mb, 8 * 4096, 8);
    if (!t_sent) return -41;
    u64 ops = 0, errors = 0, kicks = 0, suppressed = 0, sent = 0, received = 0;
    u64 back_sent = 0, back_received = 0;
    struct window w;
    window_init(&w, mb);
    u64 now = rdtsc(), t_op = 0;
    for (;;) {
        int added = 0;
        if (!w.done && (!pingpong || (sent == received && back_sent == back_received))) {
            do {
                *(u32 *)(frame + 14) = (u32)sent;
                if (net_send(a, frame, (u32)size)) break;
                if ((sent & 15) == 0) t_sent[sent & 4095] = rdtsc();
                if (pingpong) t_op = rdtsc();
                sent++;
                added++;
            } while (!pingpong);
        }
        if (added) { if (net_kick_tx(a, always)) kicks++; else suppressed++; }
        int got = take_all(mb, b, size, &received, w.measuring, &ops, &errors, t_sent,
                           !pingpong, always, &kicks, &suppressed);
        if (got < 0) return got;
        if (pingpong && got) {
            if (b == a) {                       /* loopback: the frame is back: one op */
                if (w.measuring) { record(mb, rdtsc() - t_op); ops++; }
            } else {                            /* pair: send it back the other way */
                *(u32 *)(frame + 14) = (u32)back_sent;
                if (net_send(b, frame, (u32)size)) return -43;
                back_sent++;
                if (net_kick_tx(b, always)) kicks++; else suppressed++;
            }
        }
        if (pingpong && b != a && back_sent != back_received) {
            int g2 = take_all(mb, a, size, &back_received, 0, &ops, &errors, t_sent, 0,
                              always, &kicks, &suppressed);
            if (g2 < 0) return g2;
            if (g2 && w.measuring) { record(mb, rdtsc() - t_op); ops++; }
        }
        if (sleep && !got && !added && (sent != received || back_sent != back_received)) {
            /* CPL0: halt until a frame's interrupt (rx of whichever device waits) */
            struct net *waiting = sent != received ? b : a;
            if (waiting->ve) {
                vbus_sleep(waiting->ve->b, &waiting->ve->rx, ioq_ready);
            } else {
                u64 seen = irq_count;
                ring_interrupts_on(&waiting->rx);
                if (!ring_pending(&waiting->rx)) {
                    irq_wait(seen);
                    ring_ack(&waiting->rx);
                }
            }
        }
        now = rdtsc();
        window_check(&w, now, &kicks, &suppressed);
        if (w.done && received == sent && back_received == back_sent) break;
        if (w.done && now > w.t1 + mb->tsc_khz * 5000) {
            errors += sent - received + back_sent - back_received;
            break;
        }
    }
    net_reclaim(a);
    if (b != a) net_reclaim(b);
    return window_results(mb, &w, ops, errors, kicks, suppressed);
}

/* the limit of pingpong: a round trip through one shared cache line with the host's I/O
   thread (it copies word 0 to word 1), timed like the benchmark. With a doorbell address
   the guest also rings an ioeventfd after each ping and the host answers when the eventfd
   wakes it (the notify modes that are not `poll`). */
int limit_shm(struct mailbox *mb) {
    volatile u32 *w = (volatile u32 *)mb->args[0];
    u64 end = rdtsc() + mb->args[1] * mb->tsc_khz, count = 0, doorbell = mb->args[2];
    u32 seq = w[0];
    mark(MARK_START);
    while (rdtsc() < end) {
        u64 t = rdtsc();
        w[0] = ++seq;
        if (doorbell) { barrier(); mmio_write32(doorbell, 1); }  /* an ioeventfd */
        u64 give_up = t + mb->tsc_khz * 1000;
        while (w[1] != seq)
            if (rdtsc() > give_up) return -50;
        record(mb, rdtsc() - t);
        count++;
    }
    mark(MARK_END);
    mb->results[0] = count;
    return 0;
}

/* bench blk on vblock: the same loop as bench_blk, through an IOQ. A batch of requests is
   posted with one pass and one inject (which crosses only if the device asked, or on every
   inject in `always`). In `always` our own signal stays enabled, so completions travel as
   SHMSIGNAL events we take from the event queue; otherwise we poll. */
int bench_vblock(struct mailbox *mb, struct vbus *b, struct vblock *v) {
    u64 depth = mb->args[0], bs = mb->args[1], write = mb->args[2] & 1, notify = mb->args[3];
    u64 sectors = mb->args[7];
    int always = notify == NOTIFY_ALWAYS;
    if (depth < 1 || depth > 256 || depth > v->q.count || bs > 65536 || !sectors) return -60;
    int sleep = irq_mode && notify != NOTIFY_POLL;
    if (always) ioq_unmute(&v->q);
    struct vblock_req *req = heap_alloc(mb, 64 * depth, 64);
    u8 *data = heap_alloc(mb, bs * depth, 4096);
    u64 *t_sub = heap_alloc(mb, 8 * depth, 8);
    u64 *cookies = heap_alloc(mb, 8 * depth, 8), *ptrs = heap_alloc(mb, 8 * depth, 8);
    u64 *lens = heap_alloc(mb, 8 * depth, 8), *finished = heap_alloc(mb, 8 * depth, 8);
    if (!req || !data || !t_sub || !cookies || !ptrs || !lens || !finished) return -61;
    u64 ops = 0, errors = 0, kicks = 0, suppressed = 0;
    struct picker pk;
    picker_init(&pk, sectors, bs, (mb->args[2] >> 1) & 1);
    u64 next_sector = pick(&pk);
    u32 type = write ? 1 : 0, staged = 0;
    int inflight = 0;
    struct window w;
    window_init(&w, mb);
    u64 now = rdtsc();
    for (u64 s = 0; s < depth; s++) {
        struct vblock_req *r = (struct vblock_req *)((u8 *)req + 64 * s);
        r->type = type; r->status = 0xFF; r->sector = next_sector; r->count = 1;
        r->iov[0].len = (u32)bs; r->iov[0].ptr = (u64)data + bs * s;
        next_sector = pick(&pk);
        cookies[staged] = s; ptrs[staged] = (u64)r; lens[staged] = 40; staged++;
        t_sub[s] = now;
        inflight++;
    }
    if (ioq_post(&v->q, cookies, ptrs, lens, staged)) return -62;
    staged = 0;
    if (ioq_inject(&v->q)) kicks++; else suppressed++;
    for (;;) {
        if (always) vbus_take_events(b);
        u32 n = ioq_reap(&v->q, finished, (u32)depth);
        now = rdtsc();
        if (!n) {
            if (w.done && !inflight) break;
            if (w.measuring && now >= w.t_end) goto window;
            if (sleep) vbus_sleep(b, &v->q, ioq_done);   /* CPL0: until the bus interrupt */
            continue;
        }
        for (u32 k = 0; k < n; k++) {
            u64 s = finished[k];
            if (s >= depth) return -63;
            struct vblock_req *r = (struct vblock_req *)((u8 *)req + 64 * s);
            inflight--;
            if (r->status) errors++;
            if (w.measuring) { record(mb, now - t_sub[s]); ops++; }
            if (!w.done) {
                r->status = 0xFF; r->sector = next_sector;
                next_sector = pick(&pk);
                cookies[staged] = s; ptrs[staged] = (u64)r; lens[staged] = 40; staged++;
                t_sub[s] = now;
                inflight++;
            }
        }
        if (staged) {
            if (ioq_post(&v->q, cookies, ptrs, lens, staged)) return -64;
            staged = 0;
            if (ioq_inject(&v->q)) kicks++; else suppressed++;
        }
    window:
        window_check(&w, now, &kicks, &suppressed);
    }
    return window_results(mb, &w, ops, errors, kicks, suppressed);
}
