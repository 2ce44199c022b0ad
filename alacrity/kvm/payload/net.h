#pragma once
#include "ring.h"
struct net {
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
