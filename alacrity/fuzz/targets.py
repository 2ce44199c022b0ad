"""Fuzz targets: every parser of guest- or frontend-written bytes, fed arbitrary bytes.

Each target takes one input (bytes) and runs it through the device side exactly as a
guest's doorbell would, on small guest RAM laid out by `Arena`. The rules a target
enforces, on every input:
- the only exceptions are the ABI's own answers to bad input (GuestError, CallError,
  ProtocolError); anything else is a crash;
- nothing outside guest RAM changes: the arena has canary pages before, between and after
  its two regions, checked after every input;
- the work is bounded (the fuzzer's own timeout catches a loop).

Inputs are interpreted with a small `Input` reader: a few bytes choose the setup (ring
size, features, indexes), the rest is written into guest RAM or read as operations. An
input that runs out of bytes reads zeros.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Callable

from alacrity.errors import GuestError
from alacrity.memory import GuestMemory, RegionInfo

PAGE = mmap.PAGESIZE
RAM_A = 64 * 1024          # region A at guest-physical 0
RAM_B = 16 * 1024          # region B right after it (not after it in the memfd)
CANARY = b"FUZZCANARY!\xa5"[:8] * (PAGE // 8)


class Crash(AssertionError):
    """A rule of the target was broken (not a guest error: a bug)."""


class Arena:
    """Guest RAM of two adjacent regions, with canary pages around them in the memfd."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("alacrity-fuzz", os.MFD_CLOEXEC)
        total = 3 * PAGE + RAM_A + RAM_B
        os.ftruncate(self.fd, total)
        self.file = mmap.mmap(self.fd, total)
        self.guards = (0, PAGE + RAM_A, 2 * PAGE + RAM_A + RAM_B)
        for g in self.guards:
            self.file[g:g + PAGE] = CANARY
        self.mem = GuestMemory.from_fds([RegionInfo(0, RAM_A, self.fd, PAGE),
                                         RegionInfo(RAM_A, RAM_B, self.fd, 2 * PAGE + RAM_A)],
                                        owns_fds=False)
        self.end = RAM_A + RAM_B

    def fill(self, data: bytes, at: int = 0) -> None:
        """Zero RAM, then write `data` at guest-physical `at` (clipped to region A)."""
        a = self.mem.regions[0].mv
        a[:] = bytes(RAM_A)
        self.mem.regions[1].mv[:] = bytes(RAM_B)
        data = data[:RAM_A - at]
        a[at:at + len(data)] = data

    def check(self) -> None:
        for g in self.guards:
            if self.file[g:g + PAGE] != CANARY:
                raise Crash(f"memory outside guest RAM was written (canary page at {g:#x})")


class Input:
    """Reads an input front to back; past its end it reads zeros."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b + bytes(n - len(b))

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def rest(self) -> bytes:
        b = self.data[self.pos:]
        self.pos = len(self.data)
        return b


_arena: Arena | None = None


def arena() -> Arena:
    global _arena
    if _arena is None:
        _arena = Arena()
    return _arena


def _check_chains(chains, q) -> None:
    """A ring hands out at most `limit` chains, each no longer than the queue (or the
    segment limit) and no larger than the byte limit, whose views add up to its lengths."""
    for c in chains:
        if sum(map(len, c.readable)) != c.read_len or sum(map(len, c.writable)) != c.write_len:
            raise Crash(f"chain {c.head}: lengths disagree with its views")
        if len(c.readable) + len(c.writable) > q.max_segments:
            raise Crash(f"chain {c.head}: {len(c.readable) + len(c.writable)} segments, "
                        f"more than {q.max_segments}")
        if c.read_len + c.write_len > q.max_bytes:
            raise Crash(f"chain {c.head}: {c.read_len + c.write_len} bytes, more than "
                        f"{q.max_bytes}")


# -- virtio rings ------------------------------------------------------------------------------
def _serve(q, limit: int) -> None:
    """What a device does with a ring, a few passes: pop, write into every writable
    buffer, complete, publish; the copy fast path; re-enable notifications."""
    for _ in range(4):
        chains = q.pop(limit)
        if len(chains) > limit:
            raise Crash(f"pop({limit}) returned {len(chains)} chains")
        _check_chains(chains, q)
        written = []
        for c in chains:
            for v in c.writable:
                v[:] = b"\xee" * len(v)
            written.append(c.write_len)
        q.push_many(chains, written)
        q.publish()
        heads, copies = q.take_copies(limit, 12, 1514)
        q.push_heads(heads)
        q.publish()
        q.enable_notify()


def split_ring(data: bytes) -> None:
    """A split ring (descriptor table, available ring, indirect tables) written by the
    guest; the device pops, completes (writing into every writable buffer) and publishes."""
    from alacrity.virtio.split import SplitQueue, ring_sizes
    inp = Input(data)
    a = arena()
    setup = inp.u8()
    size = 1 << (setup & 7)                          # 1..128
    event_idx, indirect = bool(setup & 8), bool(setup & 16)
    last_avail = inp.u16() if setup & 32 else 0
    max_segments = 1 + inp.u8() if setup & 64 else 1 << 15
    limit = 1 + (inp.u8() & 0x7F)
    dsz, asz, usz = ring_sizes(size)
    desc, avail = 0, dsz
    used = (avail + asz + 3) & ~3
    a.fill(inp.rest())
    mem = a.mem
    try:
        q = SplitQueue(mem, size, desc, avail, used, event_idx=event_idx, indirect=indirect,
                       last_avail=last_avail, max_segments=max_segments,
                       max_bytes=RAM_A)
        _serve(q, limit)
    except GuestError:
        pass
    a.check()


def packed_ring(data: bytes) -> None:
    """A packed ring (descriptors, wrap counters, buffer ids, indirect tables, the driver's
    event suppression) written by the guest; the device pops, completes and publishes."""
    from alacrity.virtio.packed import PackedQueue
    inp = Input(data)
    a = arena()
    setup = inp.u8()
    size = 1 + (inp.u8() & 0x7F) if setup & 1 else 1 << ((setup >> 1) & 7)
    event_idx, indirect = bool(setup & 16), bool(setup & 32)
    start = inp.u16() if setup & 64 else 0
    pos, wrap = (start & 0x7FFF) % size, (start >> 15) & 1 if setup & 64 else 1
    limit = 1 + (inp.u8() & 0x7F)
    desc = 0
    driver = 16 * size
    device = driver + 4
    a.fill(inp.rest())
    mem = a.mem
    try:
        q = PackedQueue(mem, size, desc, driver, device, event_idx=event_idx,
                        indirect=indirect, next_avail=pos, avail_wrap=wrap, next_used=pos,
                        used_wrap=wrap, max_bytes=RAM_A)
        _serve(q, limit)
    except GuestError:
        pass
    a.check()


# -- vbus -----------------------------------------------------------------------------------------
def ioq(data: bytes) -> None:
    """An IOQ (head, indexes, full flags, descriptors with ownership) and its shm-signal,
    south side: take, release, free_slots, fill, signal operations, in the order the
    input says."""
    from alacrity.vbus import ioq as Q
    from alacrity.vbus import shm_signal as S
    inp = Input(data)
    a = arena()
    setup = inp.u8()
    ops = inp.take(8)
    a.fill(inp.rest())
    mem = a.mem
    if not setup & 1:       # usually a valid head, so the fuzzer gets past the magic
        mem.write(0, struct.pack("<II", Q.MAGIC, Q.VERSION))
        mem.write(Q.SIGNAL_OFFSET, struct.pack("<II", S.MAGIC, S.VERSION))
    crossed = []
    try:
        q = Q.Ioq(mem, 0, S.SOUTH, length=RAM_A if setup & 2 else None,
                  cross=lambda: crossed.append(1))
        for op in ops:
            n = 1 + (op >> 3)
            kind = op & 7
            if kind == 0:
                taken = q.take(n)
                q.release(len(taken), None if op & 0x80 else 0)
            elif kind == 1:
                q.fill([64] * len(q.free_slots(n)))
            elif kind == 2:
                q.signal.inject()
            elif kind == 3:
                q.signal.enable()
            elif kind == 4:
                q.signal.disable()
            elif kind == 5:
                q.signal.wakeup()
            elif kind == 6:
                q.full(Q.INUSE)
                q.used(Q.VALID)
            else:
                q.ready()
    except GuestError:
        pass
    a.check()


class _Bus:
    """One bridge with a vblock (null) and a venet (lossy loopback), reused across inputs
    (reset before each)."""

    def __init__(self, mem: GuestMemory):
        from alacrity.bus import IrqLine
        from alacrity.devices.block import BlockCore, NullBackend
        from alacrity.devices.net import LoopbackBackend, NetCore
        from alacrity.vbus.bridge import VbusBridge
        from alacrity.vbus.vblock import Vblock
        from alacrity.vbus.venet import Venet
        self.irq = IrqLine(5)
        self.bridge = VbusBridge(mem, self.irq, handles=8)
        self.bridge.add_device(Vblock(BlockCore(NullBackend(1 << 20))))
        self.net = NetCore(LoopbackBackend(lossy=True))
        self.bridge.add_device(Venet(self.net))


_bus: _Bus | None = None


def vbus_bridge(data: bytes) -> None:
    """Bridge calls: a list of operations (bridgecall with any vector, length and data
    pointer; shm-signal, event-queue and fastcall doorbells) against guest RAM the input
    fills: NEGOTIATE, QREG, SLOWCALL's DEVOPEN/DEVCLOSE/DEVCALL/DEVSHM, FASTCALL_ADD/DROP,
    and through them every vblock and venet device call and queue."""
    global _bus
    a = arena()
    if _bus is None:
        _bus = _Bus(a.mem)
    bridge = _bus.bridge
    inp = Input(data)
    nops = 1 + (inp.u8() & 15)
    ops = [(inp.u8(), inp.u32(), inp.u32(), inp.u64()) for _ in range(nops)]
    a.fill(inp.rest())
    bridge.reset()
    bridge.broken = False
    try:
        for op, vector, length, datap in ops:
            if not op & 0x80:
                datap &= 0xFFFF              # mostly inside RAM: the fuzzer reaches the calls
            kind = op & 3
            if kind == 0:
                bridge.write(0, 8, vector & 7 | length << 32)
                bridge.write(8, 8, datap)
                bridge.read(0, 4)
            elif kind == 1:
                bridge.doorbell_shm(vector & 15)
            elif kind == 2:
                bridge.doorbell_eventq()
            else:
                bridge.fastcall(vector & 3)
    except GuestError:
        pass
    a.check()


_venet = None


def venet_tx(data: bytes) -> None:
    """venet transmit with SG and PMTD: the tx IOQ's descriptors, the `venet_sg`
    descriptors and iovs (flat, in RAM, or by offset in the PMTD pool) written by the
    guest; the device takes, copies, checks and sends."""
    from alacrity.bus import QueueStats
    from alacrity.devices.net import LoopbackBackend, NetCore
    from alacrity.vbus import ioq as Q
    from alacrity.vbus import shm_signal as S
    from alacrity.vbus import venet as E
    from alacrity.vbus.device import Shm
    from alacrity.vbus.shm_signal import ShmSignal
    inp = Input(data)
    a = arena()
    mem = a.mem
    setup = inp.u8()
    count = 1 + (setup & 7)
    n = inp.u8() % (count + 1)
    descs = [(inp.u64(), inp.u32()) for _ in range(n)]
    a.fill(bytes(0x1000) + inp.rest(), 0)
    # layout: tx ring at 0x0, rx ring at 0x400, pool at 0x1000 (4 KiB), the rest is data
    ring_tx, ring_rx, pool, pool_len = 0x0, 0x400, 0x1000, 0x1000
    for ring in (ring_tx, ring_rx):
        Q.init_ring(mem, ring, count)
    dev = E.Venet(NetCore(LoopbackBackend(lossy=True)))
    dev.schedule = lambda fn: None
    dev.open(mem, E.VERSION)
    sg, pmtd = bool(setup & 8), bool(setup & 16)
    if sg or pmtd:
        mem.write(0x800, E.CAPS.pack(E.CAP_GROUP_SG, (E.CAP_SG if sg or pmtd else 0)
                                     | (E.CAP_PMTD if pmtd else 0)))
        dev.call(E.FUNC_NEGCAP, 0x800, E.CAPS.size, 0)
    if pmtd:
        dev.shm(Shm(E.PMTD_POOL_ID, pool, pool_len, None, 0, QueueStats()))
    for sid, ring in ((E.QUEUE_RX, ring_rx), (E.QUEUE_TX, ring_tx)):
        sig = ShmSignal(mem.view(ring + Q.SIGNAL_OFFSET, 16), S.SOUTH, lambda: None)
        dev.shm(Shm(sid, ring, Q.ring_size(count), sig, 1 + sid, QueueStats()))
    dev.call(E.FUNC_LINKUP, 0, 0, 0)
    north = Q.Ioq(mem, ring_tx, S.NORTH)
    try:
        north.post([(i, ptr, length) for i, (ptr, length) in enumerate(descs)])
        for _ in range(3):
            if not dev._tx_pass():
                break
    except GuestError:
        pass
    a.check()


# -- vhost-user ------------------------------------------------------------------------------------
def vhost_user(data: bytes) -> None:
    """A vhost-user message stream (framing, then every request's payload and fd count)
    into a backend session; fds are placeholders the session never uses as fds."""
    from alacrity.vhost_user import protocol as P
    from alacrity.virtio import spec
    inp = Input(data)
    setup = inp.u8()
    session = P.BackendSession(
        features=spec.bit(spec.F_VERSION_1) | spec.bit(spec.F_EVENT_IDX)
        | spec.bit(spec.F_RING_PACKED) | spec.bit(spec.F_INDIRECT_DESC),
        protocol_features=P.bit(P.PF.MQ) | P.bit(P.PF.REPLY_ACK) | P.bit(P.PF.CONFIG),
        num_queues=2, queue_max=256)
    reader = P.Reader()
    stream = inp.rest()
    if setup & 1:     # usually owned already: most requests need SET_OWNER first
        session.receive(P.Message(P.Req.SET_OWNER, P.VERSION, b"", []))
    try:
        # feed in chunks the input decides, with a few placeholder fds on some of them
        pos = 0
        while pos < len(stream):
            ctl = stream[pos]                  # chunk length, and 0-3 fds with it
            step = 1 + (ctl & 0x3F)
            chunk = stream[pos + 1:pos + 1 + step]
            pos += 1 + step
            fds = list(range(1000, 1000 + (ctl >> 6)))
            for msg in reader.feed(chunk, fds):
                session.receive(msg)
    except P.ProtocolError:
        pass
    reader.fds.clear()          # placeholders: nothing to close


TARGETS: dict[str, Callable[[bytes], None]] = {
    "split": split_ring,
    "packed": packed_ring,
    "ioq": ioq,
    "vbus-bridge": vbus_bridge,
    "venet": venet_tx,
    "vhost-user": vhost_user,
}
