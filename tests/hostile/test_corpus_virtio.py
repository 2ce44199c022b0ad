"""The hostile-guest corpus for virtio rings: one test per attack class, for the split and
the packed layout, against virtio-blk on a real image file behind virtio-mmio.

Each test asserts what SECURITY.md promises: the device reports DEVICE_NEEDS_RESET (or,
where the spec says the device ignores something, ignores it); nothing outside guest RAM
was written (the canary pages around and between the RAM regions are intact) or read (no
canary bytes reached the image); the doorbell's work is bounded (a deadline); and the
host is fine afterwards (after a reset the same device serves a good request).
"""

from __future__ import annotations

import struct
import tracemalloc

import pytest

from alacrity.bus import IrqLine
from alacrity.devices.block import BlockCore, FileBackend
from alacrity.limits import DEFAULT, Limits
from alacrity.virtio import mmio as R
from alacrity.virtio import spec
from alacrity.virtio.blk import T_IN, T_OUT, VirtioBlk
from alacrity.virtio.mmio import VirtioMmioDevice
from tests.helpers import DESC, INDIRECT, NEXT, WRITE, RawPackedRing, RawRing, mmio_bring_up
from tests.hostile.guard import MiB, GuardedRam, deadline, leaked

HDR, STATUS, DATA, TABLE, TABLE2, GOOD = 0x20000, 0x21000, 0x30000, 0x40000, 0x48000, 0x50000
DATA_BYTE = 0x5A
IMAGE = 1 * MiB
U64 = 1 << 64
ABIS = ["split", "packed"]
REQ = struct.Struct("<IIQ")


class Rig:
    """One virtio-blk device on guarded RAM with a ring the test writes by hand."""

    def __init__(self, tmp_path, abi: str, *, size: int = 8, limits: Limits = DEFAULT,
                 indirect: bool = True):
        self.abi = abi
        self.size = size
        self.ram = GuardedRam()
        self.mem = self.ram.mem
        self.img = tmp_path / "disk.img"
        self.img.write_bytes(bytes(IMAGE))
        self.backend = FileBackend(str(self.img))
        self.irq = IrqLine(5)
        self.dev = VirtioMmioDevice(VirtioBlk(BlockCore(self.backend)), self.mem, self.irq,
                                    limits=limits)
        self.features = (spec.bit(spec.F_VERSION_1)
                         | (spec.bit(spec.F_INDIRECT_DESC) if indirect else 0)
                         | (spec.bit(spec.F_RING_PACKED) if abi == "packed" else 0))
        self.bring_up()

    def bring_up(self, size: int | None = None) -> None:
        size = size or self.size
        self.mem.write(0x10000, bytes(0x10000))       # a fresh ring
        if self.abi == "split":
            self.ring = RawRing(self.mem, size)
            q = (size, self.ring.desc, self.ring.avail, self.ring.used)
        else:
            self.ring = RawPackedRing(self.mem, size)
            q = (size, self.ring.desc, self.ring.driver, self.ring.device)
        mmio_bring_up(self.dev, self.features, [q])
        self.next_split = 0

    # -- what a guest writes -----------------------------------------------------------------
    def header(self, rtype: int = T_OUT, sector: int = 0) -> None:
        REQ.pack_into(self.mem.view(HDR, 16), 0, rtype, 0, sector)
        self.mem.write(STATUS, b"\xff")

    def offer(self, elems: list[tuple[int, int, int]], bid: int = 0) -> None:
        """One buffer of (addr, len, flags) elements, linked properly (flags: WRITE or
        INDIRECT; NEXT is added between elements)."""
        if self.abi == "split":
            head = self.next_split
            for j, (a, n, f) in enumerate(elems):
                i = head + j
                last = j == len(elems) - 1
                self.ring.set_desc(i, a, n, f | (0 if last else NEXT), i + 1)
            self.next_split += len(elems)
            self.ring.make_available(head)
        else:
            if any(f & INDIRECT for _, _, f in elems):
                (a, n, f), = elems
                self.ring.put(a, n, bid, f | self.ring.avail_flags())
                self.ring.pos += 1
                return
            self.ring.offer([(a, n, bool(f & WRITE)) for a, n, f in elems], bid)

    def write_request(self, data: tuple[int, int], bid: int = 0) -> None:
        self.header(T_OUT)
        self.offer([(HDR, 16, 0), (data[0], data[1], 0), (STATUS, 1, WRITE)], bid)

    def notify(self) -> None:
        with deadline():
            self.dev.notify(0)

    # -- what we check ------------------------------------------------------------------------
    def needs_reset(self) -> bool:
        return bool(self.dev.read(R.R_STATUS, 4) & spec.DEVICE_NEEDS_RESET)

    def image(self) -> bytes:
        return self.img.read_bytes()

    def check_contained(self) -> None:
        """Nothing outside RAM was written or read; a reset device serves a good request."""
        assert self.ram.canaries_intact(), "memory outside guest RAM was written"
        assert not leaked(self.image()), "memory outside guest RAM reached the image"
        more = self.dev.errors
        self.notify()                                   # a broken device ignores doorbells
        assert self.dev.errors == more
        self.bring_up()
        assert not self.needs_reset()
        # header and data in one descriptor: a good request within any segment limit >= 2
        self.mem.write(GOOD, REQ.pack(T_OUT, 0, 100) + bytes([0xC3]) * 512)
        self.mem.write(STATUS, b"\xff")
        self.offer([(GOOD, 16 + 512, 0), (STATUS, 1, WRITE)])
        self.notify()
        assert not self.needs_reset() and self.mem.read(STATUS, 1) == b"\0"
        assert self.image()[100 * 512:101 * 512] == bytes([0xC3]) * 512

    def close(self) -> None:
        self.irq.close()
        self.backend.close()
        self.mem.close()
        self.ram.close()


@pytest.fixture
def rig_for(tmp_path):
    made = []

    def make(abi: str, **kw) -> Rig:
        r = Rig(tmp_path, abi, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def broken(r: Rig) -> None:
    """The ABI's answer to a rule-breaking ring: DEVICE_NEEDS_RESET, one error, contained."""
    assert r.needs_reset(), "the device did not ask for a reset"
    assert r.dev.errors >= 1 and r.dev.last_error
    r.check_contained()


# -- descriptor addresses and lengths ----------------------------------------------------------
RANGES = {
    "address outside RAM": lambda ram: (ram.end + 0x1000, 512),
    "length past the end of RAM": lambda ram: (ram.end - 256, 4096),
    "address far above RAM": lambda ram: (0xFFFF_0000_0000, 512),
    "spanning two regions": lambda ram: (ram.a_size - 2048, 4096),
    "wrapping 2^64": lambda ram: (U64 - 2048, 4096),
    "length 2^32-1": lambda ram: (DATA, 0xFFFF_FFFF),
}


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("case", list(RANGES))
def test_readable_buffer_outside_ram(rig_for, abi, case):
    r = rig_for(abi)
    r.write_request(RANGES[case](r.ram))
    r.notify()
    broken(r)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("case", list(RANGES))
def test_writable_buffer_outside_ram(rig_for, abi, case):
    r = rig_for(abi)
    a, n = RANGES[case](r.ram)
    r.header(T_IN)
    r.offer([(HDR, 16, 0), (a, n, WRITE), (STATUS, 1, WRITE)])
    r.notify()
    broken(r)


@pytest.mark.parametrize("abi", ABIS)
def test_readable_after_writable(rig_for, abi):
    r = rig_for(abi)
    r.header(T_OUT)
    r.offer([(HDR, 16, 0), (STATUS, 1, WRITE), (DATA, 512, 0)])
    r.notify()
    broken(r)


# -- chains -------------------------------------------------------------------------------------
@pytest.mark.parametrize("abi", ABIS)
def test_chain_longer_than_the_queue(rig_for, abi):
    r = rig_for(abi)
    if abi == "split":      # an indirect table of 2x the queue, every entry linked to the next
        n = 2 * r.size
        for i in range(n):
            r.ring.set_desc(i, DATA, 16, NEXT, i + 1, table=TABLE)
        r.ring.set_desc(0, TABLE, 16 * n, INDIRECT)
        r.ring.make_available(0)
    else:                   # every slot of the ring available, every one saying NEXT
        for s in range(r.size):
            r.ring.put(DATA, 16, 0, r.ring.avail_flags() | NEXT, slot=s)
    r.notify()
    broken(r)


@pytest.mark.parametrize("abi", ABIS)
def test_chain_that_loops(rig_for, abi):
    r = rig_for(abi)
    if abi == "split":
        r.header(T_OUT)
        r.ring.set_desc(0, HDR, 16, NEXT, 1)
        r.ring.set_desc(1, DATA, 512, NEXT, 2)
        r.ring.set_desc(2, DATA, 512, NEXT, 1)           # back to 1, forever
        r.ring.make_available(0)
    else:                   # a packed list cannot point back; it can only go round the ring
        r.ring.put(HDR, 16, 0, 0, slot=0)
        for s in range(1, r.size):
            r.ring.put(DATA, 512, 0, r.ring.avail_flags() | NEXT, slot=s)
        r.ring.put(HDR, 16, 0, r.ring.avail_flags() | NEXT, slot=0)
    r.notify()
    broken(r)


def test_split_next_outside_the_table(rig_for):
    """(A packed list has no `next`: its equivalent, a list running into a slot of the
    wrong lap, is test_packed_list_with_an_element_of_the_wrong_lap.)"""
    r = rig_for("split")
    r.ring.set_desc(0, HDR, 16, NEXT, r.size + 5)
    r.ring.make_available(0)
    r.notify()
    broken(r)


def test_split_next_outside_an_indirect_table(rig_for):
    r = rig_for("split")
    indirect_table(r)
    r.ring.set_desc(1, DATA, 512, NEXT, 3, table=TABLE)      # the table has 3 entries
    r.offer([(TABLE, 48, INDIRECT)])
    r.notify()
    broken(r)


# -- indirect tables -------------------------------------------------------------------------------
def entry(r: Rig, table: int, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
    """Entry i of an indirect table (split: addr, len, flags, next; packed: addr, len,
    id, flags)."""
    fields = (addr, length, flags, nxt) if r.abi == "split" else (addr, length, 0, flags)
    DESC.pack_into(r.mem.view(table + 16 * i, 16), 0, *fields)


def indirect_table(r: Rig, table: int = TABLE) -> int:
    """A proper OUT request as a 3-entry indirect table; returns its length."""
    r.header(T_OUT)
    r.mem.write(DATA, bytes([DATA_BYTE]) * 512)
    link = NEXT if r.abi == "split" else 0      # a packed table is sequential
    entry(r, table, 0, HDR, 16, link, 1)
    entry(r, table, 1, DATA, 512, link, 2)
    entry(r, table, 2, STATUS, 1, WRITE)
    return 48


@pytest.mark.parametrize("abi", ABIS)
def test_indirect_table_works(rig_for, abi):
    """The control case: the same table, well formed, is served."""
    r = rig_for(abi)
    r.offer([(TABLE, indirect_table(r), INDIRECT)])
    r.notify()
    assert not r.needs_reset() and r.mem.read(STATUS, 1) == b"\0"
    assert r.image()[:512] == bytes([DATA_BYTE]) * 512


@pytest.mark.parametrize("abi", ABIS)
def test_indirect_inside_indirect(rig_for, abi):
    r = rig_for(abi)
    indirect_table(r)
    indirect_table(r, TABLE2)
    inner = 512                                  # a sector's worth: a table of 32 entries
    # entry 1 of the outer table points at another table instead of data
    entry(r, TABLE, 1, TABLE2, inner, INDIRECT | (NEXT if abi == "split" else 0), 2)
    r.offer([(TABLE, 48, INDIRECT)])
    r.notify()
    if abi == "split":
        broken(r)
    else:
        # VIRTIO 1.2 2.8.19: in a packed indirect table only WRITE is valid, the other flags
        # "are reserved and are ignored by the device": entry 1 is 48 bytes of data (the
        # inner table itself), never followed
        assert not r.needs_reset() and r.mem.read(STATUS, 1) == b"\0"
        assert r.image()[:512] == r.mem.read(TABLE2, 512)
        r.check_contained()


@pytest.mark.parametrize("abi", ABIS)
def test_indirect_with_next(rig_for, abi):
    r = rig_for(abi)
    n = indirect_table(r)
    if abi == "split":
        r.ring.set_desc(0, TABLE, n, INDIRECT | NEXT, 1)
        r.ring.set_desc(1, STATUS, 1, WRITE)
        r.ring.make_available(0)
    else:
        r.ring.put(TABLE, n, 0, r.ring.avail_flags() | INDIRECT | NEXT, slot=0)
        r.ring.put(STATUS, 1, 0, r.ring.avail_flags() | WRITE, slot=1)
    r.notify()
    broken(r)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("length", [0, 8, 40, 16 * 1024 + 8])
def test_indirect_table_length(rig_for, abi, length):
    r = rig_for(abi)
    indirect_table(r)
    r.offer([(TABLE, length, INDIRECT)])
    r.notify()
    broken(r)


@pytest.mark.parametrize("abi", ABIS)
def test_indirect_table_outside_ram(rig_for, abi):
    r = rig_for(abi)
    r.offer([(r.ram.end - 16, 48, INDIRECT)])
    r.notify()
    broken(r)


@pytest.mark.parametrize("abi", ABIS)
def test_indirect_without_the_feature(rig_for, abi):
    r = rig_for(abi, indirect=False)
    r.offer([(TABLE, indirect_table(r), INDIRECT)])
    r.notify()
    broken(r)


# -- indexes and ids ---------------------------------------------------------------------------------
def test_split_available_index_more_than_a_queue_ahead(rig_for):
    r = rig_for("split")
    r.write_request((DATA, 512))
    r.ring.set_avail_idx(r.size + 1)
    r.notify()
    broken(r)


def test_split_available_index_far_ahead(rig_for):
    r = rig_for("split")
    r.ring.set_avail_idx(0x8000)
    r.notify()
    broken(r)


def test_split_head_outside_the_table(rig_for):
    r = rig_for("split")
    r.ring.make_available(r.size + 3)
    r.notify()
    broken(r)


def test_split_same_head_twice_in_one_batch_is_served_twice(rig_for):
    """A split ring has no ids to reuse: a driver that offers the same head twice gets
    the request done twice (as in QEMU); nothing escapes and nothing breaks."""
    r = rig_for("split")
    r.mem.write(DATA, bytes([DATA_BYTE]) * 512)
    r.write_request((DATA, 512))
    r.ring.make_available(0)
    r.notify()
    assert not r.needs_reset() and r.ring.used_idx() == 2
    r.check_contained()


@pytest.mark.parametrize("bid", [8, 0x7FFF, 0xFFFF])
def test_packed_buffer_id_not_below_the_queue_size(rig_for, bid):
    r = rig_for("packed")
    r.write_request((DATA, 512), bid=bid)
    r.notify()
    broken(r)


def test_packed_buffer_id_reused_while_in_flight(rig_for):
    r = rig_for("packed")
    r.write_request((DATA, 512), bid=3)
    r.offer([(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)], bid=3)
    r.notify()
    broken(r)


def test_packed_lone_buffer_id_reused_while_in_flight(rig_for):
    r = rig_for("packed")
    r.offer([(HDR, 16, 0)], bid=2)
    r.offer([(HDR, 16, 0)], bid=2)
    r.notify()
    broken(r)


def test_packed_wrap_counter_that_lies_makes_nothing_available(rig_for):
    """AVAIL and USED both set (or both clear) in the first lap: not available (2.8.1); the
    device takes nothing, and is still fine."""
    r = rig_for("packed")
    for s, f in enumerate((r.ring.AVAIL | r.ring.USED, 0)):
        r.header(T_OUT)
        r.ring.put(HDR, 16, 0, f, slot=s)
    r.notify()
    assert not r.needs_reset() and r.dev.errors == 0
    assert r.image() == bytes(IMAGE)
    r.check_contained()


def test_packed_list_with_an_element_of_the_wrong_lap(rig_for):
    r = rig_for("packed")
    r.header(T_OUT)
    r.ring.put(DATA, 512, 0, r.ring.avail_flags(wrap=0), slot=1)        # old lap
    r.ring.put(STATUS, 1, 0, r.ring.avail_flags() | WRITE, slot=2)
    r.ring.put(HDR, 16, 0, r.ring.avail_flags() | NEXT, slot=0)
    r.notify()
    broken(r)


def test_packed_more_descriptors_in_flight_than_the_queue(rig_for):
    """The driver offers again slots the device has not given back (it claims a second
    lap while the first is in flight): the device counts what it holds."""
    r = rig_for("packed", size=4)
    dev = r.dev
    model = dev.model
    model.handle = lambda c: (_ for _ in ()).throw(AssertionError("never served"))
    # hold every buffer: serve nothing, so ids and slots stay in flight
    q = dev.queues[0]
    ring = q.ring
    for bid in range(4):
        r.offer([(DATA, 16, 0)], bid=bid)
    with deadline():
        assert len(ring.pop(4)) == 4
    for bid in range(4):                  # the driver pretends the first lap came back
        r.offer([(DATA, 16, 0)], bid=bid)
    from alacrity.errors import GuestError
    with deadline(), pytest.raises(GuestError):
        ring.pop(4)
    assert r.ram.canaries_intact()


# -- queue setup -------------------------------------------------------------------------------------
def setup_queue(r: Rig, size: int, desc: int = 0x10000, drv: int = 0x18000, dev: int = 0x1C000):
    mmio_bring_up(r.dev, r.features, [(size, desc, drv, dev)], driver_ok=False)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("case", ["size 0", "size above QueueNumMax", "ring outside RAM",
                                  "ring across the end of RAM", "misaligned ring",
                                  "split size not a power of two"])
def test_queue_setup(rig_for, abi, case):
    r = rig_for(abi)
    qmax = r.dev.read(R.R_QUEUE_NUM_MAX, 4)
    args = {"size 0": (0,), "size above QueueNumMax": (qmax * 2,),
            "ring outside RAM": (8, r.ram.end + 0x10000),
            "ring across the end of RAM": (8, r.ram.end - 64),
            "misaligned ring": (8, 0x10008),
            "split size not a power of two": (6,)}[case]
    setup_queue(r, *args)
    if case == "split size not a power of two" and abi == "packed":
        assert not r.needs_reset()         # packed rings may have any size up to the max
        r.check_contained()
        return
    broken(r)


@pytest.mark.parametrize("abi", ABIS)
def test_doorbell_for_a_queue_that_does_not_exist(rig_for, abi):
    r = rig_for(abi)
    with deadline():
        r.dev.notify(5)
    broken(r)


# -- the user's limits -----------------------------------------------------------------------------------
@pytest.mark.parametrize("abi", ABIS)
def test_limit_segments(rig_for, abi):
    r = rig_for(abi, limits=Limits(max_segments=4))
    assert r.dev.model.seg_max == 2                    # what virtio-blk tells the driver
    r.header(T_OUT)
    r.offer([(HDR, 16, 0)] + [(DATA, 512, 0)] * 3 + [(STATUS, 1, WRITE)])
    r.notify()
    broken(r)


@pytest.mark.parametrize("abi", ABIS)
def test_limit_segments_in_an_indirect_table(rig_for, abi):
    r = rig_for(abi, limits=Limits(max_segments=2))
    r.offer([(TABLE, indirect_table(r), INDIRECT)])
    r.notify()
    broken(r)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("lone", [False, True])
def test_limit_request_bytes(rig_for, abi, lone):
    r = rig_for(abi, limits=Limits(max_request_bytes=64 * 1024))
    assert r.dev.model.size_max == 64 * 1024
    r.header(T_OUT)
    tracemalloc.start()
    try:
        if lone:
            r.offer([(DATA, 4 * MiB, 0)])
        else:
            r.offer([(HDR, 16, 0), (DATA, 32 * 1024, 0), (DATA, 32 * 1024, 0), (STATUS, 1, WRITE)])
        r.notify()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 * MiB, f"the host allocated {peak} bytes for a refused request"
    broken(r)


@pytest.mark.parametrize("abi", ABIS)
def test_limit_queue_size(rig_for, abi):
    r = rig_for(abi, limits=Limits(max_queue_size=16))
    assert r.dev.read(R.R_QUEUE_NUM_MAX, 4) == 16
    setup_queue(r, 32)
    broken(r)
