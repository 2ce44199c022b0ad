#pragma once
#include "ring.h"
struct venet;
/* one NIC as the benchmark sees it: virtio-net on a ring, or venet behind the vbus bridge */
struct net {
    struct venet *ve;                      /* set: every call goes to venet */
    struct vdev d;
    struct ring rx, tx;
    u16 nrx, ntx, ntx_free;
    u8 *rx_buf, *tx_buf;
    u16 *rx_slot, *tx_slot, *tx_free;      /* buffer id -> slot; free tx slots */
};
int net_open(struct mailbox *mb, struct net *n, u64 base, u64 want, u16 qsize);
void net_repost(struct net *n, u16 slot);
int net_send(struct net *n, const u8 *frame, u32 len);   /* not visible until ring_kick */
int net_reclaim(struct net *n);
int net_recv(struct net *n, u8 **frame, u32 *len, u16 *slot);
int net_selftest(struct mailbox *mb, struct net *n, int slot);
int net_kick_tx(struct net *n, int always);     /* 1 if a doorbell was rung */
int net_kick_rx(struct net *n, int always);
void net_quiet(struct net *n);                  /* ask for no interrupts: we poll */
