/* virtio-net in the payload: rx buffers posted up front (one descriptor each, no
   MRG_RXBUF: 2 KiB holds the 12-byte header and a 1514-byte frame), tx frames with the
   header in front, one descriptor each. Polled. */
#include "net.h"
#include "vbus.h"
#include "irq.h"

#define F_MAC 5
#define RX_BUF 2048
#define HDR 12

int net_kick_tx(struct net *n, int always) {
    return n->ve ? venet_kick_tx(n->ve) == 1 : ring_kick(&n->tx, always);
}

int net_kick_rx(struct net *n, int always) {
    return n->ve ? venet_kick_rx(n->ve) == 1 : ring_kick(&n->rx, always);
}

void net_quiet(struct net *n) {
    if (n->ve) return;                     /* venet's signals were muted when it opened */
    ring_no_interrupts(&n->rx);
    ring_no_interrupts(&n->tx);
}

int net_open(struct mailbox *mb, struct net *n, u64 base, u64 want, u16 qsize) {
    n->ve = 0;
    if (virtio_init(&n->d, base, want | (1ul << F_MAC)) < 0) return -1;
    if (n->d.device_id != 1) return -2;
    if (ring_setup(mb, &n->d, &n->rx, 0, qsize) < 0) return -3;
    if (ring_setup(mb, &n->d, &n->tx, 1, qsize) < 0) return -4;
    n->nrx = n->rx.size;
    n->ntx = n->tx.size;
    n->rx_buf = heap_alloc(mb, (u64)RX_BUF * n->nrx, 4096);
    n->tx_buf = heap_alloc(mb, (u64)RX_BUF * n->ntx, 4096);
    n->rx_slot = heap_alloc(mb, 2ul * n->nrx, 8);
    n->tx_slot = heap_alloc(mb, 2ul * n->ntx, 8);
    n->tx_free = heap_alloc(mb, 2ul * n->ntx, 8);
    if (!n->rx_buf || !n->tx_buf || !n->rx_slot || !n->tx_slot || !n->tx_free) return -5;
    for (u16 i = 0; i < n->ntx; i++) n->tx_free[i] = i;
    n->ntx_free = n->ntx;
    virtio_ready(&n->d);
    for (u16 i = 0; i < n->nrx; i++) net_repost(n, i);
    ring_kick(&n->rx, 1);
    return 0;
}

void net_repost(struct net *n, u16 slot) {
    if (n->ve) { venet_release(n->ve); return; }
    u64 a = (u64)n->rx_buf + (u64)RX_BUF * slot;
    u32 len = RX_BUF;
    int id = ring_add(&n->rx, &a, &len, 1, 0);
    if (id >= 0) n->rx_slot[id] = slot;
}

int net_send(struct net *n, const u8 *frame, u32 len) {
    if (n->ve) return venet_send(n->ve, frame, len);
    if (!n->ntx_free) net_reclaim(n);
    if (!n->ntx_free || len + HDR > RX_BUF) return -1;
    u16 slot = n->tx_free[--n->ntx_free];
    u8 *b = n->tx_buf + (u64)RX_BUF * slot;
    memset(b, 0, HDR);
    memcpy(b + HDR, frame, len);
    u64 a = (u64)b;
    u32 l = len + HDR;
    int id = ring_add(&n->tx, &a, &l, 1, 1);
    if (id < 0) { n->ntx_free++; return -1; }
    n->tx_slot[id] = slot;
    return 0;
}

int net_reclaim(struct net *n) {
    if (n->ve) return venet_reclaim(n->ve);
    u32 w;
    int id, k = 0;
    while ((id = ring_get(&n->tx, &w)) >= 0) { n->tx_free[n->ntx_free++] = n->tx_slot[id]; k++; }
    return id == -2 ? -2 : k;
}

int net_recv(struct net *n, u8 **frame, u32 *len, u16 *slot) {
    if (n->ve) { *slot = 0; return venet_recv(n->ve, frame, len); }
    u32 w;
    int id = ring_get(&n->rx, &w);
    if (id < 0) return id;
    u16 s = n->rx_slot[id];
    *slot = s;
    *frame = n->rx_buf + (u64)RX_BUF * s + HDR;
    *len = w >= HDR ? w - HDR : 0;
    return w >= HDR ? 0 : -3;
}

/* the self-test: a burst of distinct frames out, the same frames back (loopback) */
int net_selftest(struct mailbox *mb, struct net *n, int slot) {
    u8 frame[128];
    u64 ops = 0, errors = 0;
    const u32 count = 32;
    for (u32 k = 0; k < count; k++) {
        for (u32 i = 0; i < sizeof(frame); i++) frame[i] = (u8)(k * 13 + i);
        frame[12] = 0x88; frame[13] = 0xB5;
        if (net_send(n, frame, 60 + k)) errors++;
    }
    net_kick_tx(n, 0);
    u64 deadline = rdtsc() + mb->tsc_khz * 5000;
    u32 got = 0;
    while (got < count && rdtsc() < deadline) {
        u8 *f = 0; u32 len = 0; u16 s = 0;
        int r = net_recv(n, &f, &len, &s);
        if (r == -1) {
            if (irq_mode && n->ve) {             /* CPL0: sleep until the bus says */
                vbus_sleep(n->ve->b, &n->ve->rx, ioq_ready);
                continue;
            }
            if (irq_mode) {                      /* CPL0: sleep until a frame arrives */
                u64 seen = irq_count;
                ring_interrupts_on(&n->rx);
                if ((r = net_recv(n, &f, &len, &s)) == -1) {
                    irq_wait(seen);
                    ring_ack(&n->rx);
                    continue;
                }
            } else {
                continue;
            }
        }
        if (r == -2) { errors++; break; }
        if (r < 0 || len != 60 + got) errors++;
        else {
            for (u32 i = 0; i < len; i++) {
                u8 want = (i == 12) ? 0x88 : (i == 13) ? 0xB5 : (u8)(got * 13 + i);
                if (f[i] != want) { errors++; break; }
            }
        }
        got++;
        ops++;
        net_repost(n, s);
    }
    net_kick_rx(n, 0);
    if (got < count) errors += count - got;
    if (net_reclaim(n) < 0) errors++;
    mb->results[2 * slot] += ops;            /* several devices may share a slot (a bus) */
    mb->results[2 * slot + 1] += errors;
    return errors ? -30 : 0;
}
