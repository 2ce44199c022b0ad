/* The benchmark loops of `alacrity bench --guest kvm`: the same workloads as the process
   guests' (bench/blk.py guest_main), timed with rdtsc. The VMM snapshots its counters when
   we write MARK_START / MARK_END to the mark port; latencies go into a histogram the VMM
   reads (100 ns buckets). The guest polls for completions (it never takes interrupts:
   at CPL3 on PVM it cannot halt). */
#include "rt.h"
#include "virtio.h"
#include "bench.h"
#include "ring.h"

static void mark(u32 what) { outl(MARK_PORT, what); }

static void record(struct mailbox *mb, u64 cycles) {
    u64 ns = cycles * 1000000ul / mb->tsc_khz;
    u64 b = ns / HIST_BUCKET_NS;
    if (b >= HIST_BUCKETS) b = HIST_BUCKETS - 1;
    HIST[b]++;
}

int bench_blk(struct mailbox *mb, struct vdev *d) {
    u64 depth = mb->args[0], bs = mb->args[1], write = mb->args[2], notify = mb->args[3];
    u64 warmup = mb->args[4] * mb->tsc_khz, seconds = mb->args[5] * mb->tsc_khz; /* ms */
    u64 qsize = mb->args[6], sectors = mb->args[7];
    int always = notify == NOTIFY_ALWAYS;
    struct ring q;
    if (depth < 1 || depth > 256 || bs > 65536 || !sectors) return -20;
    if (ring_setup(mb, d, &q, 0, (u16)qsize) < 0) return -21;
    if (3 * depth > q.size) return -22;
    virtio_ready(d);
    /* we poll: ask for no interrupts (flag without EVENT_IDX; used_event far ahead with
       it), except in `always`, where nothing is suppressed on either side */
    if (!always) ring_no_interrupts(&q);
    struct blk_req *hdr = heap_alloc(mb, 16 * depth, 64);
    u8 *status = heap_alloc(mb, 64 * depth, 64);
    u8 *data = heap_alloc(mb, bs * depth, 4096);
    u64 *t_sub = heap_alloc(mb, 8 * depth, 8);
    u64 *token = heap_alloc(mb, 8 * 1024, 8);      /* head -> slot */
    if (!hdr || !status || !data || !t_sub || !token) return -23;
    u64 span = sectors - bs / 512, ops = 0, errors = 0, kicks = 0, suppressed = 0;
    u64 next_sector = 0;
    u32 type = write ? 1 : 0;
    int measuring = 0, stopping = 0, inflight = 0;
    u64 now = rdtsc(), t_start = now + warmup, t_end = 0, t0 = 0, t1 = 0;
    for (u64 s = 0; s < depth; s++) {
        struct blk_req *h = &hdr[s];
        h->type = type; h->reserved = 0; h->sector = next_sector;
        next_sector = (next_sector + bs / 512) % (span + 1);
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
            if (stopping && !inflight) break;
            now = rdtsc();
            if (measuring && now >= t_end) goto window;
            continue;
        }
        /* take everything that is there before kicking once */
        now = rdtsc();
        do {
            u64 s = token[head];
            inflight--;
            if (status[64 * s]) errors++;
            if (measuring) { record(mb, now - t_sub[s]); ops++; }
            if (!stopping) {
                struct blk_req *h = &hdr[s];
                h->sector = next_sector;
                next_sector = (next_sector + bs / 512) % (span + 1);
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
        if (!measuring && !stopping && now >= t_start) {
            mark(MARK_START);
            measuring = 1;
            t0 = rdtsc();
            t_end = t0 + seconds;
            kicks = suppressed = 0;
        } else if (measuring && now >= t_end) {
            t1 = rdtsc();
            mark(MARK_END);
            measuring = 0;
            stopping = 1;
        }
    }
    mb->results[0] = ops;
    mb->results[1] = t1 - t0;
    mb->results[2] = errors;
    mb->results[3] = kicks;
    mb->results[4] = suppressed;
    return 0;
}
