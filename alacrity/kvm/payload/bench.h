#pragma once
#include "rt.h"
#include "virtio.h"
#define MARK_PORT 0xF5
#define MARK_START 1
#define MARK_END 2
#define NOTIFY_ALWAYS 0
#define NOTIFY_MITIGATED 1
#define NOTIFY_POLL 2
#define HIST ((volatile u32 *)0x80000)
#define HIST_BUCKETS 8192
#define HIST_BUCKET_NS 100
int bench_blk(struct mailbox *mb, struct vdev *d);
struct net;
int bench_net(struct mailbox *mb, struct net *a, struct net *b);
int limit_shm(struct mailbox *mb);
struct vbus;
struct vblock;
int bench_vblock(struct mailbox *mb, struct vbus *b, struct vblock *v);
