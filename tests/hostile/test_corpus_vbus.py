"""The hostile-guest corpus for vbus: IOQ rings, the bridge's calls, venet's scatter-gather
and PMTD descriptors and vblock's requests, one test per attack class, on guarded RAM
(tests/hostile/guard.py) with vblock on a real image and venet on a loopback.

vbus's answers (docs/architecture.md): a call with bad arguments returns -errno; a device
whose rings break the rules is marked broken (one log line; its calls return -EINVAL until
the guest closes and reopens it); a malformed request or frame is completed with an error
or dropped and counted. In every case nothing outside RAM is read or written, the work is
bounded, and the host serves the next driver.
"""

from __future__ import annotations

import struct

import pytest

from alacrity.devices.block import BlockCore, FileBackend
from alacrity.devices.net import NetCore, open_backends
from alacrity.guest.drivers.vbus_bridge import VbusError, find_bridge
from alacrity.guest.drivers.vblock import VblockDriver
from alacrity.guest.drivers.venet import VenetDriver
from alacrity.guest.local import LocalGuest
from alacrity.limits import DEFAULT, Limits
from alacrity.machine import Machine
from alacrity.vbus import abi
from alacrity.vbus import ioq as Q
from alacrity.vbus import vblock as V
from alacrity.vbus import venet as E
from tests.helpers import until
from tests.hostile.guard import MiB, GuardedRam, deadline, leaked

U64 = 1 << 64
IMAGE = 1 * MiB


class Rig:
    def __init__(self, tmp_path, limits: Limits = DEFAULT):
        self.ram = GuardedRam(a_size=16 * MiB)
        self.img = tmp_path / "disk.img"
        self.img.write_bytes(bytes(IMAGE))
        self.backend = FileBackend(str(self.img))
        (self.lb,) = open_backends("loopback")
        self.core = NetCore(self.lb)
        self.sent: list[bytes] = []
        transmit = self.core.transmit

        def capture(frames):
            self.sent.extend(frames)
            return transmit(frames)
        self.core.transmit = capture
        self.m = Machine(mem=self.ram.mem, limits=limits)
        self.vblock = V.Vblock(BlockCore(self.backend))
        self.venet = E.Venet(self.core)
        self.bridge = self.m.add_vbus_bridge([self.vblock, self.venet])
        self.g = LocalGuest(self.m)
        self.b = find_bridge(self.g)

    def blk(self, **kw) -> VblockDriver:
        return VblockDriver(find_bridge(self.g), depth=2, max_bytes=8192, queue_size=16, **kw)

    def net(self, **kw) -> VenetDriver:
        kw.setdefault("queue_size", 16)
        return VenetDriver(find_bridge(self.g), **kw)

    def contained(self) -> None:
        assert self.ram.canaries_intact(), "memory outside guest RAM was written"
        assert not leaked(self.img.read_bytes()), "memory outside guest RAM reached the image"
        assert not any(leaked(f) for f in self.sent), "memory outside guest RAM was sent"

    def close(self) -> None:
        self.m.close()
        self.backend.close()
        self.lb.close()
        self.ram.close()


@pytest.fixture
def rig(tmp_path):
    made = []

    def make(**kw) -> Rig:
        r = Rig(tmp_path, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def broken(r: Rig, dev, drv) -> None:
    """The device is broken: its calls fail, nothing escaped, and a new driver (close,
    reopen) gets a working device."""
    with deadline():
        until(lambda: dev.broken)
    assert r.bridge.last_error
    r.contained()
    result, _ = drv.b.devcall(drv.devh, 99)
    assert result == -abi.EINVAL                             # a broken device's calls fail
    drv.b.devclose(drv.devh)
    with deadline():
        if dev is r.vblock:
            d = r.blk()
            d.write(8, b"\x77" * 512)
            assert d.read(8, 512) == b"\x77" * 512
        else:
            d = r.net()
            f = b"\x02" * 12 + b"\x88\xb5" + bytes(50)
            assert d.send(f)
            d.kick_tx()
            got: list[bytes] = []
            until(lambda: got.extend(d.recv()) or got)
            assert got == [f]
    assert not dev.broken


def post(drv, q, ptr: int, length: int, kick) -> None:
    q.post([(0, ptr, length)])
    kick()


RANGES = {
    "address outside RAM": lambda ram: (ram.end + 0x1000, 64),
    "length past the end of RAM": lambda ram: (ram.end - 16, 64),
    "spanning two regions": lambda ram: (ram.a_size - 32, 64),
    "wrapping 2^64": lambda ram: (U64 - 32, 64),
    "length 2^64-1": lambda ram: (0x100000, U64 - 1),
}


# -- IOQ descriptors -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(RANGES))
def test_vblock_request_descriptor_outside_ram(rig, case):
    r = rig()
    drv = r.blk()
    ptr, n = RANGES[case](r.ram)
    post(drv, drv.q, ptr, n, drv.q.signal.inject)
    broken(r, r.vblock, drv)


@pytest.mark.parametrize("case", list(RANGES))
def test_venet_flat_frame_outside_ram(rig, case):
    r = rig()
    drv = r.net()
    ptr, n = RANGES[case](r.ram)
    post(drv, drv.txq, ptr, n, drv.kick_tx)
    if n > r.core.max_frame:            # sized before anything is read: dropped, counted
        with deadline():
            until(lambda: r.core.counters.tx_malformed == 1)
        assert not r.venet.broken
        r.contained()
        return
    broken(r, r.venet, drv)


@pytest.mark.parametrize("where", ["inuse head", "inuse tail"])
def test_ioq_index_not_below_count(rig, where):
    """South pops requests at the inuse index, so that is the one it reads and checks
    (the valid index is north's own: south never reads it, see the next test)."""
    r = rig()
    drv = r.blk()
    off = {"inuse head": 36, "inuse tail": 40}[where]
    drv.submit(0, V.T_IN, 0, 512)
    drv.kick()
    r.m.mem.write(drv.q.addr + off, struct.pack("<I", 5000))
    drv.q.signal.inject()
    broken(r, r.vblock, drv)


@pytest.mark.parametrize("where", ["valid head", "valid tail"])
def test_ioq_north_index_garbage_is_not_the_devices_business(rig, where):
    r = rig()
    drv = r.blk()
    off = {"valid head": 24, "valid tail": 28}[where]
    drv.q.post([(0, drv.req[0], 24)])                    # a request with count 0: IOERR
    r.m.mem.write(drv.q.addr + off, struct.pack("<I", 5000))
    with deadline():
        drv.q.signal.inject()
        until(lambda: r.vblock.requests == 1)
    assert not r.vblock.broken
    r.contained()


def test_ioq_full_flag_that_lies_takes_only_what_south_owns(rig):
    """full = 1 with head == tail on an empty ring: the device may believe `count`
    descriptors wait, but takes none it does not own, and stays bounded."""
    r = rig()
    drv = r.blk()
    r.m.mem.write(drv.q.addr + 44, b"\x01")                   # inuse full
    r.m.mem.write(drv.q.addr + 32, b"\x01")                   # valid full
    with deadline():
        drv.q.signal.inject()
        r.m.io.call_sync(lambda: None)                       # the doorbell was served
    assert r.vblock.requests == 0 and not r.vblock.broken
    r.contained()


def test_ioq_descriptors_not_handed_over_are_not_taken(rig):
    """The tail says a request waits, but its descriptor is still north's (sown = 0)."""
    r = rig()
    drv = r.blk()
    r.m.mem.write(drv.q.addr + 40, struct.pack("<I", 1))       # inuse tail moves, no flip
    r.m.mem.write(drv.q.addr + 28, struct.pack("<I", 1))
    with deadline():
        drv.q.signal.inject()
        r.m.io.call_sync(lambda: None)
    assert r.vblock.requests == 0 and not r.vblock.broken
    r.contained()


def test_ioq_ownership_taken_back_while_the_device_holds_it(rig):
    r = rig()
    drv = r.blk()
    serve = r.vblock._serve
    desc = drv.q.addr + Q.HEAD_SIZE

    def serve_while_the_guest_flips(req):
        r.m.mem.write(desc + 25, b"\x00")                    # sown: back to north
        return serve(req)
    r.vblock._serve = serve_while_the_guest_flips
    drv.submit(0, V.T_IN, 0, 512)
    drv.kick()
    with deadline():
        until(lambda: r.vblock.broken)
    del r.vblock._serve
    assert "changed owner" in r.bridge.last_error
    broken(r, r.vblock, drv)


# -- registration: magic, version, count ------------------------------------------------------------
@pytest.mark.parametrize("case", ["bad magic", "bad version", "count 0", "count larger than "
                                  "the region", "count above the limit", "signal bad magic",
                                  "region outside RAM", "region wraps"])
def test_ioq_registration_is_checked(rig, case):
    r = rig(limits=Limits(max_queue_size=64))
    b = r.b
    devh = b.devopen(b.find(V.TYPE), V.VERSION)
    ring = r.g.alloc.alloc(Q.ring_size(128), 64)
    Q.init_ring(r.m.mem, ring, 16)
    length = Q.ring_size(16)
    from alacrity.vbus.shm_signal import ShmSignal
    sig = ShmSignal(r.m.mem.view(ring + Q.SIGNAL_OFFSET, 16), 0, lambda: None)
    if case == "bad magic":
        r.m.mem.write(ring, struct.pack("<I", 0x12345678))
    elif case == "bad version":
        r.m.mem.write(ring + 4, struct.pack("<I", 3))
    elif case == "count 0":
        r.m.mem.write(ring + Q.COUNT_OFFSET, struct.pack("<I", 0))
    elif case == "count larger than the region":
        r.m.mem.write(ring + Q.COUNT_OFFSET, struct.pack("<I", 1000))
    elif case == "count above the limit":
        Q.init_ring(r.m.mem, ring, 128)
        length = Q.ring_size(128)
    elif case == "signal bad magic":
        r.m.mem.write(ring + Q.SIGNAL_OFFSET, struct.pack("<I", 0))
    elif case == "region outside RAM":
        ring = r.ram.end + 4096
    elif case == "region wraps":
        ring = U64 - 64
    with deadline(), pytest.raises(VbusError) as e:
        b.devshm(devh, V.QUEUE_ID, ring, length, signal=sig)
    assert e.value.errno > 0
    assert not r.vblock.broken                               # a failed call, nothing more
    r.contained()


@pytest.mark.parametrize("case", ["bad magic", "bad version", "short"])
def test_negotiate_is_checked(rig, case):
    r = rig()
    magic, version = abi.BRIDGE_MAGIC, abi.HC_VERSION
    if case == "bad magic":
        magic ^= 1
    elif case == "bad version":
        version += 1
    data = abi.NEGOTIATE_S.pack(magic, version, 0)
    if case == "short":
        data = data[:4]
    with deadline():
        assert r.b.bridgecall(abi.NEGOTIATE, data) < 0


def test_handles_and_device_ids_that_do_not_exist(rig):
    r = rig()
    b = r.b
    with deadline():
        with pytest.raises(VbusError):
            b.devopen(77, 1)
        assert b.devcall(12345, 1)[0] < 0
        with pytest.raises(VbusError):
            b.devshm(999, 0, 0x100000, 4096)
        assert b.hypercall(abi.DEVCLOSE, struct.pack("<Q", 4242)) < 0
        assert b.hypercall(250, b"") < 0                       # no such hypercall
    r.m.io.call_sync(lambda: r.bridge.doorbell_shm(31, 1))    # a handle nobody holds
    assert r.bridge.bad_doorbells >= 1
    r.contained()


# -- vblock requests ---------------------------------------------------------------------------------------
def raw_request(r: Rig, drv, iovs, *, count=None, length=None) -> int:
    addr = r.g.alloc.alloc(64 + 16 * len(iovs), 64)
    v = r.m.mem.view(addr, 24 + 16 * len(iovs))
    V.REQ.pack_into(v, 0, V.T_OUT, 0xFF, 0, len(iovs) if count is None else count)
    for i, (n, p) in enumerate(iovs):
        V.IOV.pack_into(v, 24 + 16 * i, n, p)
    post(drv, drv.q, addr, V.request_size(len(iovs)) if length is None else length,
         drv.q.signal.inject)
    with deadline():
        until(lambda: drv.q.reap(1))
    return v[4]


@pytest.mark.parametrize("case", list(RANGES))
def test_vblock_data_outside_ram_fails_the_request(rig, case):
    r = rig()
    drv = r.blk()
    ptr, n = RANGES[case](r.ram)
    assert raw_request(r, drv, [(512 if n < U64 - 1 else 0xFFFFFFFF, ptr)]) == V.S_IOERR
    assert r.img.read_bytes() == bytes(IMAGE) and not r.vblock.broken
    r.contained()


@pytest.mark.parametrize("case", ["count overflows the request", "count 2^32-1",
                                  "more segments than allowed", "length not a request"])
def test_vblock_malformed_request(rig, case):
    r = rig()
    drv = r.blk()
    buf = drv.data[0]
    kw = {}
    iovs = [(512, buf)]
    if case == "count overflows the request":
        kw["count"] = 2
    elif case == "count 2^32-1":
        kw["count"] = 0xFFFFFFFF
    elif case == "more segments than allowed":
        iovs = [(512, buf)] * (V.MAX_SEGMENTS + 1)
    else:
        kw["length"] = 30
    assert raw_request(r, drv, iovs, **kw) == V.S_IOERR
    assert r.img.read_bytes() == bytes(IMAGE) and not r.vblock.broken
    r.contained()


# -- venet scatter-gather and PMTD -------------------------------------------------------------------------
def sg_post(r: Rig, drv, count: int, total: int, iovs, *, length=None, slot: int = 0) -> None:
    sgv = drv.sg_view[slot]
    E.SG.pack_into(sgv, 0, 0, 0, total, 0, 0, 0, 0, 0, count)
    for i, (n, p) in enumerate(iovs):
        E.IOV.pack_into(sgv, E.SG.size + E.IOV.size * i, n, p)
    post(drv, drv.txq, drv.sg_ptr[slot], drv.sg_size if length is None else length, drv.kick_tx)


@pytest.mark.parametrize("pmtd", [False, True])
@pytest.mark.parametrize("case", ["count overflows the descriptor", "count 0", "count 2^32-1",
                                  "total lies", "length shorter than the header"])
def test_venet_sg_counts(rig, pmtd, case):
    r = rig()
    drv = r.net(sg=True, pmtd=pmtd)
    data = drv.tx_addr[0]
    count, total, length = 1, 60, None
    if case == "count overflows the descriptor":
        count = E.MAX_SG + 1          # more iovs than the descriptor (and the device) holds
    elif case == "count 0":
        count = 0
    elif case == "count 2^32-1":
        count = 0xFFFFFFFF
    elif case == "total lies":
        total = 61
    else:
        length = E.SG.size - 1
    sg_post(r, drv, count, total, [(60, data)], length=length)
    with deadline():
        until(lambda: r.core.counters.tx_malformed == 1)
    assert not r.venet.broken and r.core.counters.tx_frames == 0
    r.contained()


@pytest.mark.parametrize("case", list(RANGES))
def test_venet_sg_iov_outside_ram(rig, case):
    r = rig()
    drv = r.net(sg=True)
    ptr, n = RANGES[case](r.ram)
    sg_post(r, drv, 1, 60, [(60, ptr)])
    if case == "length 2^64-1":          # an iov inside RAM: fine; the same, lying total
        with deadline():
            until(lambda: r.core.counters.tx_frames + r.core.counters.tx_malformed >= 1)
        r.contained()
        return
    broken(r, r.venet, drv)


@pytest.mark.parametrize("offset", ["past the pool", "straddling the end", "wrapping 2^64"])
def test_venet_pmtd_offset_outside_the_pool(rig, offset):
    r = rig()
    drv = r.net(sg=True, pmtd=True, tx_slots=4)
    pool = 4 * drv.sg_size
    ptr = {"past the pool": pool + 64, "straddling the end": pool - 8,
           "wrapping 2^64": U64 - 8}[offset]
    post(drv, drv.txq, ptr, drv.sg_size, drv.kick_tx)
    with deadline():
        until(lambda: r.core.counters.tx_malformed == 1)
    assert not r.venet.broken and r.core.counters.tx_frames == 0
    r.contained()


# -- the user's limits ---------------------------------------------------------------------------------------
def test_limit_segments_vblock_and_venet(rig):
    r = rig(limits=Limits(max_segments=2))
    drv = r.blk()
    assert drv.max_segments == 2                                 # QUERY tells the driver
    buf = drv.data[0]
    assert raw_request(r, drv, [(512, buf)] * 3) == V.S_IOERR
    assert raw_request(r, drv, [(512, buf)] * 2) == V.S_OK
    n = r.net(sg=True)
    sg = r.g.alloc.alloc(E.sg_size(3), 64)
    v = r.m.mem.view(sg, E.sg_size(3))
    E.SG.pack_into(v, 0, 0, 0, 60, 0, 0, 0, 0, 0, 3)
    for i in range(3):
        E.IOV.pack_into(v, E.SG.size + E.IOV.size * i, 20, n.tx_addr[0])
    post(n, n.txq, sg, E.sg_size(3), n.kick_tx)
    with deadline():
        until(lambda: r.core.counters.tx_malformed == 1)
    r.contained()


def test_limit_request_bytes_vblock(rig):
    r = rig(limits=Limits(max_request_bytes=1024))
    drv = r.blk()
    buf = drv.data[0]
    assert raw_request(r, drv, [(1024, buf), (512, buf)]) == V.S_IOERR
    assert raw_request(r, drv, [(1024, buf)]) == V.S_OK
    r.contained()
