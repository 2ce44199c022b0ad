"""virtio-net on the loopback and pair backends: frames both ways, mergeable buffers,
backpressure, and the malformed traffic that must be dropped and counted, never a crash."""

import os

import pytest

from alacrity.bus import IrqLine
from alacrity.devices.net import LoopbackBackend, NetBackend, NetCore, pair
from alacrity.guest.drivers.virtio_net import VirtioNetDriver
from alacrity.guest.local import LocalGuest
from alacrity.guest.programs import find_device
from alacrity.machine import Machine
from alacrity.memory import GuestMemory
from alacrity.virtio import net as N
from alacrity.virtio import spec
from alacrity.virtio.mmio import VirtioMmioDevice

from tests.helpers import NEXT, WRITE, RawRing, mmio_bring_up


def frame(n, fill=0xAB):
    return b"\x52\x54\x00\x00\x00\x01" * 2 + b"\x88\xb5" + bytes([fill]) * (n - 14)


def exchange(tx, rx, frames):
    got, i = [], 0
    while len(got) < len(frames):
        while i < len(frames) and tx.send(frames[i]):
            i += 1
        tx.kick_tx()
        f = rx.recv()
        if f:
            got += f
            rx.kick_rx()
        else:
            rx.wait(timeout=5)
        tx.reclaim_tx()
    return got


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mergeable", [False, True])
def test_loopback_frames_of_every_size(packed, mergeable):
    m = Machine(32 << 20)
    try:
        core = NetCore(LoopbackBackend())
        m.add_virtio_mmio(N.VirtioNet(core))
        d = VirtioNetDriver(find_device(LocalGuest(m), spec.ID_NET), packed=packed,
                            mrg_rxbuf=mergeable, buf_size=2048 if not mergeable else 512)
        assert d.link_up and d.mtu == 1500 and d.mac == core.mac and d.mergeable == mergeable
        frames = [frame(n, n & 0xFF) for n in (14, 60, 64, 511, 512, 1000, 1514)] * 20
        assert exchange(d, d, frames) == frames
        assert core.counters.rx_frames == core.counters.tx_frames == len(frames)
    finally:
        m.close()


def test_pair_carries_frames_between_two_devices():
    m = Machine(32 << 20)
    try:
        a, b = pair()
        ca, cb = NetCore(a), NetCore(b)
        m.add_virtio_mmio(N.VirtioNet(ca))
        m.add_virtio_mmio(N.VirtioNet(cb))
        g = LocalGuest(m)
        da = VirtioNetDriver(find_device(g, spec.ID_NET, 0))
        db = VirtioNetDriver(find_device(g, spec.ID_NET, 1))
        assert da.mac != db.mac
        fa = [frame(64, i & 0xFF) for i in range(300)]
        fb = [frame(100, i & 0xFF) for i in range(300)]
        assert exchange(da, db, fa) == fa
        assert exchange(db, da, fb) == fb
    finally:
        m.close()


def test_backpressure_instead_of_drops():
    """A backlog of 8 frames, a guest that sends 2000: the wire pushes back, nothing is lost."""
    m = Machine(32 << 20)
    try:
        core = NetCore(LoopbackBackend(), backlog=8)
        m.add_virtio_mmio(N.VirtioNet(core))
        d = VirtioNetDriver(find_device(LocalGuest(m), spec.ID_NET), rx_buffers=16)
        frames = [frame(64, i & 0xFF) for i in range(2000)]
        assert exchange(d, d, frames) == frames
        assert core.counters.rx_dropped == 0
    finally:
        m.close()


class Sink(NetBackend):
    kind = "sink"

    def __init__(self):
        self.sent = []

    def send(self, frames):
        self.sent += frames


class Raw:
    """A virtio-net device driven through hand-written rings."""

    def __init__(self, mergeable=False):
        self.mem = GuestMemory.create([(0, 4 << 20)])
        self.irq = IrqLine(5)
        self.sink = Sink()
        self.core = NetCore(self.sink, backlog=4)
        self.dev = VirtioMmioDevice(N.VirtioNet(self.core), self.mem, self.irq)
        self.rx = RawRing(self.mem, 8, base=0x10000)
        self.tx = RawRing(self.mem, 8, base=0x20000)
        feats = spec.bit(spec.F_VERSION_1) | (spec.bit(N.F_MRG_RXBUF) if mergeable else 0)
        mmio_bring_up(self.dev, feats, [(8, self.rx.desc, self.rx.avail, self.rx.used),
                                        (8, self.tx.desc, self.tx.avail, self.tx.used)])

    def close(self):
        self.irq.close()
        self.mem.close()


def test_malformed_tx_is_dropped_and_counted():
    r = Raw()
    try:
        r.mem.write(0x40000, bytes(12) + frame(64))
        r.tx.set_desc(0, 0x40000, 8)                       # no room for the 12-byte header
        r.tx.set_desc(1, 0x40000, 76, NEXT, 2)             # header + frame, then...
        r.tx.set_desc(2, 0x41000, 10, WRITE)               # ...a device-writable piece
        r.mem.write(0x42000, bytes(12) + frame(1600))
        r.tx.set_desc(3, 0x42000, 12 + 1600)               # larger than the MTU allows
        r.tx.set_desc(4, 0x40000, 76)                      # a good one
        r.tx.make_available(0, 1, 3, 4)
        r.dev.notify(1)
        assert r.tx.used_idx() == 4 and not r.dev.broken
        c = r.core.counters
        assert (c.tx_malformed, c.tx_dropped, c.tx_frames) == (2, 1, 1)
        assert r.sink.sent == [frame(64)]
    finally:
        r.close()


def test_rx_buffers_too_small_or_without_header_room():
    r = Raw()
    try:
        r.rx.set_desc(0, 0x50000, 8, WRITE)                # cannot hold a header
        r.rx.set_desc(1, 0x51000, 40, WRITE)               # header + 28 bytes: too small
        r.rx.set_desc(2, 0x52000, 2048, WRITE)
        r.rx.make_available(0, 1, 2)
        r.dev.notify(0)
        r.core.receive([frame(64)])
        assert not r.dev.broken
        c = r.core.counters
        # the tiny buffer comes back empty; the small one too, with the frame dropped
        assert (c.rx_no_room, c.rx_too_big, c.rx_frames) == (1, 1, 0)
        assert r.rx.used_elem(0) == (0, 0) and r.rx.used_elem(1) == (1, 0)
        r.core.receive([frame(1514)])                      # buffer 2 holds a full frame
        assert r.rx.used_elem(2) == (2, 12 + 1514) and c.rx_frames == 1
        assert r.mem.read(0x52000 + 12, 1514) == frame(1514)
        assert r.mem.read_u16(0x52000 + 10) == 1           # num_buffers is 1 without MRG
    finally:
        r.close()


def test_mergeable_frame_over_three_buffers():
    r = Raw(mergeable=True)
    try:
        for i in range(3):
            r.rx.set_desc(i, 0x50000 + 0x1000 * i, 600, WRITE)
        r.rx.make_available(0, 1, 2)
        r.dev.notify(0)
        f = os.urandom(1500)
        r.core.receive([f])
        lens = [r.rx.used_elem(i)[1] for i in range(3)]
        assert lens == [600, 600, 312]
        assert r.mem.read_u16(0x50000 + 10) == 3              # num_buffers
        data = r.mem.read(0x50000 + 12, 588) + r.mem.read(0x51000, 600) + r.mem.read(0x52000, 312)
        assert data == f
    finally:
        r.close()


def test_transmit_says_when_frames_came_straight_back():
    """Loopback: the frames wait in our own backlog and transmit() returns True instead of
    calling on_rx (the transport places them in the same pass); a pair tells the peer."""
    told = []
    core = NetCore(LoopbackBackend())
    core.on_rx = lambda: told.append("self")
    f = frame(60)
    assert core.transmit([f, f]) is True and list(core.backlog) == [f, f] and told == []
    core.backlog.clear()
    assert core.transmit([b"short"]) is False and told == []      # dropped: nothing came back
    core.receive([f])                                            # from outside: told
    assert told == ["self"]
    a_end, b_end = pair()
    a, b = NetCore(a_end), NetCore(b_end)
    a.on_rx = lambda: told.append("a")
    b.on_rx = lambda: told.append("b")
    assert a.transmit([f]) is False and list(b.backlog) == [f] and told[-1] == "b"
    assert not a.backlog


def test_frames_beyond_the_backlog_are_dropped_and_counted():
    r = Raw()
    try:
        r.core.receive([frame(64)] * 10)                    # no buffers posted, backlog of 4
        c = r.core.counters
        assert c.rx_dropped == 6 and len(r.core.backlog) == 4
        r.core.receive([frame(9000)])                       # a jumbo frame from the outside
        assert c.rx_too_big == 1
    finally:
        r.close()


def test_config_space():
    r = Raw()
    try:
        cfg = r.dev.model.config()
        assert cfg[:6] == r.core.mac and cfg[6] & N.S_LINK_UP and int.from_bytes(cfg[10:12], "little") == 1500
        offered = r.dev.offered
        for f in (N.F_MAC, N.F_STATUS, N.F_MTU, N.F_MRG_RXBUF):
            assert offered & spec.bit(f)
        for f in (N.F_CSUM, N.F_GUEST_CSUM, N.F_CTRL_VQ, N.F_MQ):   # no offloads, no ctrl vq
            assert not offered & spec.bit(f)
    finally:
        r.close()
