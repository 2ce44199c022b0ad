/* The payload's programs: the self-test (every driver initialises its device and moves
   data), and test-only programs the VMM's tests use (hostile, spin, fault). */
#include "rt.h"
#include "virtio.h"
#include "bench.h"
#include "ring.h"
#include "net.h"
#include "vbus.h"
#include "irq.h"

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define F_EVENT_IDX 29
#define F_RING_PACKED 34


static u64 timeout_cycles(struct mailbox *mb, u64 ms) { return mb->tsc_khz * ms; }

/* one request, polled to completion: returns the status byte, or 0x100 on a timeout */
static u32 blk_io(struct mailbox *mb, struct ring *q, struct blk_req *hdr, u8 *data, u32 len,
                  u8 *status, u32 type, u64 sector) {
    hdr->type = type;
    hdr->reserved = 0;
    hdr->sector = sector;
    *status = 0xFF;
    u64 addr[3] = {(u64)hdr, (u64)data, (u64)status};
    u32 lens[3] = {16, len, 1};
    int n = len ? 3 : 2, out = type == BLK_T_IN ? 1 : (len ? 2 : 1);
    if (!len) { addr[1] = (u64)status; lens[1] = 1; }
    if (ring_add(q, addr, lens, n, out) < 0) return 0x101;
    ring_kick(q, 0);
    u64 deadline = rdtsc() + timeout_cycles(mb, 5000);
    u32 written;
    int id;
    while ((id = ring_get(q, &written)) < 0) {
        if (id == -2 || rdtsc() > deadline) return 0x100;
        if (irq_mode) {                          /* CPL0: sleep until the device says */
            u64 seen = irq_count;
            ring_interrupts_on(q);
            if ((id = ring_get(q, &written)) >= 0) break;
            irq_wait(seen);
            ring_ack(q);
        }
    }
    return *status;
}

static u8 pattern(u64 seed, u64 sector, u32 i) { return (u8)(seed * 7 + sector * 31 + i); }

/* pattern: write a pattern the host can recompute over sectors [first, first+count), flush,
   read it back and compare. Otherwise (the self-test) read, write back unchanged, flush,
   read again and compare: the image is left as it was. */
static int blk_check(struct mailbox *mb, struct vdev *d, int slot, int pattern_mode) {
    struct ring q;
    if (ring_setup(mb, d, &q, 0, 64) < 0) return -10;
    virtio_ready(d);
    if (!irq_mode) ring_no_interrupts(&q);
    struct blk_req *hdr = heap_alloc(mb, 16, 16);
    u8 *status = heap_alloc(mb, 64, 64);
    u8 *data = heap_alloc(mb, 4096, 4096);
    u8 *back = heap_alloc(mb, 4096, 4096);
    if (!hdr || !status || !data || !back) return -11;
    u64 seed = mb->args[0], first = mb->args[1], count = mb->args[2];
    u64 ops = 0, errors = 0;
    for (u64 s = first; s < first + count; s += 8) {            /* 4 KiB at a time */
        if (pattern_mode) {
            for (u32 i = 0; i < 4096; i++) data[i] = pattern(seed, s + i / 512, i % 512);
        } else {
            if (blk_io(mb, &q, hdr, data, 4096, status, BLK_T_IN, s)) errors++;
            ops++;
        }
        if (blk_io(mb, &q, hdr, data, 4096, status, BLK_T_OUT, s)) errors++;
        ops++;
        if (blk_io(mb, &q, hdr, 0, 0, status, BLK_T_FLUSH, 0)) errors++;
        ops++;
        if (blk_io(mb, &q, hdr, back, 4096, status, BLK_T_IN, s)) errors++;
        ops++;
        if (memcmp(data, back, 4096)) errors++;
    }
    mb->results[2 * slot] += ops;            /* several devices may share a slot (a bus) */
    mb->results[2 * slot + 1] += errors;
    return errors ? -12 : 0;
}

static int selftest(struct mailbox *mb, int pattern_mode) {
    int rc = 0;
    for (u32 i = 0; i < mb->ndevices && i < MAX_DEVICES; i++) {
        struct vdev d;
        if (mb->devices[i].kind == DEV_VBUS_BRIDGE) {
            struct vbus b;
            int r = vbus_open(mb, &b, mb->devices[i].base, (u16)mb->devices[i].device_id);
            for (u32 k = 0; !r && k < b.ndev; k++) {
                if (!memcmp(b.types[k], "virtual-block", 14)) {
                    struct vblock v;
                    r = vblock_open(mb, &b, &v, b.devids[k], 64, 0);
                    if (!r) r = vblock_selftest(mb, &v, (int)i, pattern_mode);
                } else if (!memcmp(b.types[k], "virtual-ethernet", 17)) {
                    struct venet ve;
                    struct net n;
                    n.ve = &ve;
                    r = venet_open(mb, &b, &ve, b.devids[k], 256, 0);
                    if (!r) r = net_selftest(mb, &n, (int)i);
                }
            }
            if (!r && !b.ndev) r = -1;
            puts(r ? "vbus: FAILED\n" : "vbus: ok\n");
            if (r) rc = r;
            continue;
        }
        if (mb->devices[i].kind != DEV_VIRTIO_MMIO) continue;
        u64 want = ((mb->flags & 2) ? 1ul << F_EVENT_IDX : 0)
                 | ((mb->flags & 1) ? 1ul << F_RING_PACKED : 0);
        int r = virtio_init(&d, mb->devices[i].base, want);
        if (r < 0) { puts("virtio init failed\n"); rc = -1; continue; }
        if (d.device_id == VIRTIO_ID_BLOCK) {
            r = blk_check(mb, &d, (int)i, pattern_mode);
            puts(r ? "blk: FAILED\n" : "blk: ok\n");
            if (r) rc = r;
        } else if (d.device_id == VIRTIO_ID_NET) {
            struct net n;
            r = net_open(mb, &n, mb->devices[i].base, want, 256);
            if (!r) r = net_selftest(mb, &n, (int)i);
            puts(r ? "net: FAILED\n" : "net: ok\n");
            if (r) rc = r;
        }
    }
    return rc;
}

#ifdef ALACRITY_TEST_PROGRAMS
/* test-only: break every rule of the ring, then watch the device report it */
static int hostile(struct mailbox *mb) {
    struct vdev d;
    if (virtio_init(&d, mb->devices[0].base, 0) < 0) return -1;
    struct split q;
    if (virtio_queue(mb, &d, &q, 0, 8) < 0) return -2;
    virtio_ready(&d);
    for (u16 i = 0; i < 8; i++) {                  /* a loop of chains into nowhere */
        q.desc[i].addr = 0xFFFFFFFFFFFF0000ul - i;
        q.desc[i].len = 0xFFFFFFFFu;
        q.desc[i].flags = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE;
        q.desc[i].next = (u16)((i + 1) % 8);
    }
    for (u16 i = 0; i < 8; i++) q.avail[2 + i] = (u16)(i * 3000);
    q.avail[1] = 40000;                            /* far more than the queue holds */
    split_kick(&q);
    for (u32 off = 0x100; off < 0x200; off += 4) mmio_write32(d.base + off, 0xDEADBEEF);
    mmio_write32(d.base + 0x030, 9999);            /* QueueSel out of range */
    mmio_write32(d.base + 0x050, 77);              /* a doorbell for no queue */
    u64 deadline = rdtsc() + timeout_cycles(mb, 5000);
    while (!(virtio_status(&d) & 64))
        if (rdtsc() > deadline) return -3;
    mb->results[0] = virtio_status(&d);
    return 0;
}
#endif

int main(struct mailbox *mb) {
    if (mb->magic != MAILBOX_MAGIC) return 0xBAD;
    mb->cpl = current_cpl();
    if ((mb->flags & 4) && mb->cpl == 0) irq_setup(mb);
    int rc;
    switch (mb->test) {
    case TEST_SELFTEST: rc = selftest(mb, 0); break;
    case TEST_PATTERN: rc = selftest(mb, 1); break;
    case TEST_BENCH_BLK: {
        if (mb->devices[0].kind == DEV_VBUS_BRIDGE) {
            struct vbus b;
            struct vblock v;
            rc = vbus_open(mb, &b, mb->devices[0].base, (u16)mb->devices[0].device_id);
            if (!rc && !b.ndev) rc = -3;
            if (!rc) rc = vblock_open(mb, &b, &v, b.devids[0], (u32)mb->args[6],
                                      mb->args[3] == NOTIFY_ALWAYS);
            if (!rc) rc = bench_vblock(mb, &b, &v);
            break;
        }
        struct vdev d;
        u64 want = (mb->args[3] == NOTIFY_MITIGATED ? 1ul << F_EVENT_IDX : 0)
                 | ((mb->flags & 1) ? 1ul << F_RING_PACKED : 0);
        if (virtio_init(&d, mb->devices[0].base, want) < 0) { rc = -1; break; }
        if (((d.features >> F_RING_PACKED) & 1) != (mb->flags & 1)) { rc = -2; break; }
        rc = bench_blk(mb, &d);
        break;
    }
    case TEST_BENCH_NET: {
        struct net n[2];
        if (mb->devices[0].kind == DEV_VBUS_BRIDGE) {    /* venet: one or two (pair) */
            static struct venet ve[2];
            struct vbus b;
            rc = vbus_open(mb, &b, mb->devices[0].base, (u16)mb->devices[0].device_id);
            u32 k = b.ndev >= 2 ? 2 : 1;
            if (!rc && !b.ndev) rc = -3;
            for (u32 i = 0; i < k && !rc; i++) {
                n[i].ve = &ve[i];
                rc = venet_open(mb, &b, &ve[i], b.devids[i], (u32)mb->args[6],
                                mb->args[2] == NOTIFY_ALWAYS);
            }
            if (!rc) rc = bench_net(mb, &n[0], &n[k - 1]);
            break;
        }
        u64 want = (mb->args[2] == NOTIFY_MITIGATED ? 1ul << F_EVENT_IDX : 0)
                 | ((mb->flags & 1) ? 1ul << F_RING_PACKED : 0);
        u32 k = mb->ndevices >= 2 ? 2 : 1;      /* two devices: the pair backend */
        rc = 0;
        for (u32 i = 0; i < k && !rc; i++) {
            rc = net_open(mb, &n[i], mb->devices[i].base, want, (u16)mb->args[6]);
            if (!rc && ((n[i].d.features >> F_RING_PACKED) & 1) != (mb->flags & 1)) rc = -2;
        }
        if (!rc) rc = bench_net(mb, &n[0], &n[k - 1]);
        break;
    }
    case TEST_LIMIT_SHM: rc = limit_shm(mb); break;
#ifdef ALACRITY_TEST_PROGRAMS
    case TEST_HOSTILE: rc = hostile(mb); break;
    case TEST_SPIN: for (;;) compiler_barrier();
    case TEST_FAULT: *(volatile u64 *)0x8000000000000000ul = 1; rc = -1; break;
#endif
    default: rc = -100;
    }
    mb->status = (u32)rc;
    mb->results[15] = irq_count;          /* interrupts taken (CPL0 mode) */
    return rc;
}
