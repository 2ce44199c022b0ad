/* vbus, north side: shm-signal (v1), IOQ (v4), the bus bridge (ABI 2) and vblock.
   Layouts: ../shared/vbus-abi.md and alacrity/vbus/ (the host side). */
#pragma once
#include "rt.h"

#define NORTH 0
#define SOUTH 1

struct shm_signal { u32 magic, ver; u8 irq[2][3]; u8 pad[2]; };     /* enabled, pending, dirty */
struct ioq_idx { u32 head, tail; u8 full, pad[3]; };
struct ioq_desc { u64 cookie, ptr, len; u8 valid, sown, pad[6]; };
struct ioq_ring {
    u32 magic, ver;
    struct shm_signal signal;
    struct ioq_idx idx[2];                 /* valid, inuse */
    u32 count, pad;
    struct ioq_desc ring[];
};
struct ioq {
    volatile struct ioq_ring *r;
    u32 count;
    u32 doorbell_port, handle;             /* the shmsignal doorbell, rung with our handle */
    int always;                            /* cross on every inject (no mitigation) */
};

struct vbus {
    u64 base;                              /* the bridgecall window (MMIO) */
    u16 pio;                               /* the doorbell window (PIO) */
    u64 next_cookie;                       /* each signal's cookie, unique on the bus */
    u8 *scratch;
    struct ioq eventq;
    u8 *events;                            /* the event pool */
    u32 devids[8], ndev;                   /* vblock devices seen in DEVADD */
    char types[8][32];
};

struct vblock {
    struct vbus *b;
    u64 devh, capacity;
    struct ioq q;
};

/* venet with flat descriptors: rx buffers posted once on the valid index and cycled on
   the inuse index; tx frames pushed on both and reaped at the valid head */
struct venet {
    struct vbus *b;
    u64 devh;
    u8 mac[6];
    struct ioq rx, tx;
    u8 *rx_buf, *tx_buf;
    u16 *tx_free, ntx_free, ntx;
    u32 staged;
    u64 s_cookie[256], s_ptr[256], s_len[256];
};

struct vblock_req { u32 type, status; u64 sector; u32 count, pad; struct { u32 len, pad; u64 ptr; } iov[1]; };

int vbus_open(struct mailbox *mb, struct vbus *b, u64 base, u16 pio);
int vblock_open(struct mailbox *mb, struct vbus *b, struct vblock *v, u32 devid, u32 qsize, int always);
/* post n requests (both indexes); returns 0 or -1 if there is no room */
int ioq_post(struct ioq *q, const u64 *cookie, const u64 *ptr, const u64 *len, u32 n);
/* cookies of finished requests, at most max */
u32 ioq_reap(struct ioq *q, u64 *cookies, u32 max);
/* tell south: crosses (rings the doorbell) only if south asked; returns 1 if it crossed */
int ioq_inject(struct ioq *q);
void ioq_mute(struct ioq *q);              /* our own signal off: we poll */
void ioq_unmute(struct ioq *q);
void vbus_take_events(struct vbus *b);
void vbus_sleep(struct vbus *b, struct ioq *q, int (*ready)(struct ioq *));
int ioq_done(struct ioq *q);      /* a finished request at the valid head */
int ioq_ready(struct ioq *q);     /* a filled buffer at the inuse head */
int venet_open(struct mailbox *mb, struct vbus *b, struct venet *v, u32 devid, u32 qsize,
               int always);
int venet_send(struct venet *v, const u8 *frame, u32 len);     /* staged until the kick */
int venet_kick_tx(struct venet *v);        /* post what is staged; 1 if the signal crossed */
int venet_reclaim(struct venet *v);
int venet_recv(struct venet *v, u8 **frame, u32 *len);        /* 0, -1 none, -2 broken */
void venet_release(struct venet *v);       /* the oldest received buffer goes back */
int venet_kick_rx(struct venet *v);
int vblock_selftest(struct mailbox *mb, struct vblock *v, int slot, int pattern_mode);
