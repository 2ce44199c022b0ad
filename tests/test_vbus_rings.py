"""shm-signal and IOQ: byte-exact layouts (the historical offsets in vbus-abi.md), the
signalling rules and their race, and the ring across its wrap, when full, and when the
other side lies."""

import struct

import pytest

from alacrity.errors import GuestError
from alacrity.memory import GuestMemory
from alacrity.vbus import abi, shm_signal, venet, vblock
from alacrity.vbus.ioq import INUSE, VALID, Ioq, init_ring, ring_size
from alacrity.vbus.shm_signal import NORTH, SOUTH, ShmSignal

RING = 0x1000


@pytest.fixture
def mem():
    m = GuestMemory.create([(0, 1 << 20)])
    yield m
    m.close()


def pair(mem, count=8):
    """Both sides of one ring in the same memory, each with its crossings counted."""
    init_ring(mem, RING, count)
    crossed = {"north": 0, "south": 0}
    north = Ioq(mem, RING, NORTH, cross=lambda: crossed.__setitem__("north", crossed["north"] + 1))
    south = Ioq(mem, RING, SOUTH, cross=lambda: crossed.__setitem__("south", crossed["south"] + 1))
    return north, south, crossed


def raw(mem, off, fmt):
    return struct.unpack_from(fmt, mem.view(RING + off, struct.calcsize(fmt)))


# -- layouts --------------------------------------------------------------------------------
def test_shm_signal_layout(mem):
    view = mem.view(0, 16)
    shm_signal.init_desc(view)
    assert struct.unpack_from("<II", view) == (0x58FA39DF, 1)
    s = ShmSignal(view, SOUTH, lambda: None)
    n = ShmSignal(view, NORTH, lambda: None)
    n.enable()                                      # irq[north].enabled @8
    assert bytes(view[8:14]) == b"\x01\x00\x00\x00\x00\x00"
    s.inject()                                      # south -> north: dirty @10, pending @9
    assert bytes(view[8:14]) == b"\x01\x01\x01\x00\x00\x00"
    s.enable()                                      # irq[south].enabled @11
    n.inject()                                      # dirty @13, pending @12
    assert bytes(view[11:14]) == b"\x01\x01\x01"
    assert shm_signal.SIZE == 16


def test_ioq_layout(mem):
    north, south, _ = pair(mem, count=4)
    assert ring_size(4) == 56 + 32 * 4
    assert raw(mem, 0, "<II") == (0x47FA2FE4, 4)
    assert raw(mem, 8, "<II") == (0x58FA39DF, 1)    # the ring's own shm-signal @8
    assert raw(mem, 48, "<I") == (4,)
    north.post([(0x1111, 0x2222, 0x33), (0x4444, 0x5555, 0x66)], both=True)
    # desc 0 at 56: cookie @0, ptr @8, len @16, valid @24, sown @25
    assert raw(mem, 56, "<QQQBB") == (0x1111, 0x2222, 0x33, 1, 1)
    assert raw(mem, 56 + 32, "<QQQBB") == (0x4444, 0x5555, 0x66, 1, 1)
    # idx[valid] @24 and idx[inuse] @36: head, tail, full
    assert raw(mem, 24, "<IIB") == (0, 2, 0)
    assert raw(mem, 36, "<IIB") == (0, 2, 0)
    got = south.take(8)
    assert [(p, c, a, n) for p, c, a, n in got] == [(0, 0x1111, 0x2222, 0x33), (1, 0x4444, 0x5555, 0x66)]
    south.release(2)
    assert raw(mem, 36, "<IIB") == (2, 2, 0)        # inuse head moved
    assert raw(mem, 56 + 25, "<B") == (0,)          # ownership back to north
    assert north.reap(8) == [0x1111, 0x4444]
    assert raw(mem, 24, "<IIB") == (2, 2, 0)


def test_bridge_and_device_structures():
    assert abi.CALL_DESC.size == 16
    assert abi.NEGOTIATE_S.size == 16
    assert abi.BUSREG_HDR.size == 8 and abi.EVENTQREG.size == 24
    assert abi.EVENTQREG.pack(1, 2, 3) == struct.pack("<IIQQ", 1, 0, 2, 3)
    assert abi.DEVOPEN_S.size == 16 and abi.DEVCLOSE_S.size == 8
    # DEVCALL: devh @0, func @8, len @12, flags @16, datap @24
    assert abi.DEVCALL_S.size == 32
    assert abi.DEVCALL_S.pack(1, 2, 3, 4, 5) == struct.pack("<QIII4xQ", 1, 2, 3, 4, 5)
    # DEVSHM: devh @0, id @8, len @12, flags @16, signal {offset @24, prio @28, cookie @32},
    # datap @40
    b = abi.DEVSHM_S.pack(1, 2, 3, 4, 5, 6, 7, 8)
    assert len(b) == 48
    assert struct.unpack_from("<IIQQ", b, 24) == (5, 6, 7, 8)
    # events: 144 bytes, eventid @0, id/handle @8, type @16
    ev = abi.devadd_event(3, "virtual-ethernet")
    assert len(ev) == 144 and struct.unpack_from("<IxxxxQ", ev) == (abi.EV_DEVADD, 3)
    assert ev[16:32] == b"virtual-ethernet"
    assert abi.FASTCALL_DESC.size == 24 and abi.FASTCALL_RESULT == 16
    assert (abi.DEVOPEN, abi.DEVCLOSE, abi.DEVCALL, abi.DEVSHM) == (0, 1, 2, 3)
    assert (abi.NEGOTIATE, abi.QREG, abi.SLOWCALL, abi.FASTCALL_ADD, abi.FASTCALL_DROP) == (0, 1, 2, 3, 4)
    assert (abi.EV_DEVADD, abi.EV_DEVDROP, abi.EV_SHMSIGNAL, abi.EV_SHMCLOSE) == (0, 1, 2, 3)
    assert abi.BRIDGE_MAGIC == 0xBF53EEF5 and abi.ABI_VERSION == 2


def test_venet_and_vblock_structures():
    # venet_sg: cookie @0, flags @8, len @12, csum {start @16, offset @18},
    # gso {type @20, hdrlen @22, size @24}, count @28, iov[] @32 ({len @0, ptr @8})
    b = venet.SG.pack(1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert len(b) == 32
    assert struct.unpack_from("<QIIHHB", b) == (1, 2, 3, 4, 5, 6)
    assert struct.unpack_from("<HH", b, 22) == (7, 8) and struct.unpack_from("<I", b, 28) == (9,)
    assert venet.IOV.pack(5, 6) == struct.pack("<IIQ", 5, 0, 6) and venet.sg_size(2) == 64
    assert venet.EVQ_QUERY.size == 32 and venet.EVENT_TXC.size == 24
    assert (venet.FUNC_LINKUP, venet.FUNC_LINKDOWN, venet.FUNC_MACQUERY, venet.FUNC_NEGCAP,
            venet.FUNC_FLUSHRX, venet.FUNC_PMTDQUERY, venet.FUNC_EVQQUERY) == tuple(range(7))
    assert vblock.REQ.size == 24 and vblock.request_size(2) == 56
    assert vblock.QUERY.size == 24


# -- shm-signal rules -------------------------------------------------------------------------
def signals(mem):
    view = mem.view(0, 16)
    shm_signal.init_desc(view)
    log = []
    n = ShmSignal(view, NORTH, lambda: log.append("to-south"))
    s = ShmSignal(view, SOUTH, lambda: log.append("to-north"))
    return n, s, log


def test_inject_crosses_once_until_acknowledged(mem):
    n, s, log = signals(mem)
    s.enable()
    assert n.inject() is True
    assert n.inject() is False and n.inject() is False     # pending: absorbed
    assert log == ["to-south"]
    runs = []
    s.notifier = lambda: runs.append(1)
    s.wakeup()
    assert runs == [1] and s.flags(SOUTH) == (1, 0, 0)      # dirty and pending cleared
    assert n.inject() is True and log == ["to-south"] * 2


def test_disabled_side_is_only_marked_dirty_and_enable_runs_the_wakeup(mem):
    n, s, log = signals(mem)
    assert n.inject() is False and log == []                 # south never enabled
    assert s.flags(SOUTH) == (0, 0, 1)
    runs = []
    s.notifier = lambda: runs.append(1)
    assert s.enable() is True and runs == [1]                # ran at once
    s.disable()
    n.inject()
    assert runs == [1] and s.flags(SOUTH) == (0, 0, 1)


class RacyDesc:
    """A 16-byte signal descriptor that runs `hook` just before one chosen store lands:
    the way to put the peer's inject in a window a few instructions wide."""

    def __init__(self):
        self.b = bytearray(16)
        shm_signal.init_desc(memoryview(self.b))
        self.trigger: tuple[int, int] | None = None
        self.hook = lambda: None

    def __len__(self):
        return 16

    def __getitem__(self, k):
        return self.b[k]

    def __setitem__(self, k, v):
        if self.trigger == (k, v):
            self.trigger = None
            self.hook()
        self.b[k] = v


def test_signal_between_clearing_dirty_and_clearing_pending_is_not_lost():
    """The peer injects after the wakeup's notifier ran and found nothing more, but before
    pending is cleared: it sees pending set and does not cross, so the wakeup itself must
    notice the fresh dirty and run the notifier again (the outer loop)."""
    d = RacyDesc()
    crossed = []
    n = ShmSignal(d, NORTH, lambda: crossed.append(1))
    s = ShmSignal(d, SOUTH, lambda: None)
    s.enable()
    assert n.inject() is True and crossed == [1]            # pending = 1
    o = shm_signal.OFF_IRQ[SOUTH]
    absorbed = []
    d.trigger = (o + shm_signal.PENDING, 0)                 # just before pending = 0
    d.hook = lambda: absorbed.append(n.inject())
    runs = []
    s.notifier = lambda: runs.append(d.b[o + shm_signal.DIRTY])
    s.wakeup()
    assert absorbed == [False] and crossed == [1]           # the peer did not cross...
    assert len(runs) == 2                                   # ...and its signal was handled
    assert s.flags(SOUTH) == (1, 0, 0)


def test_wakeup_budget_keeps_pending_so_the_peer_stays_quiet(mem):
    n, s, log = signals(mem)
    s.enable()
    n.inject()
    s.notifier = lambda: n.inject()                         # a peer that never stops
    assert s.wakeup(budget=3) is True                       # ran out with work left
    assert s.flags(SOUTH) == (1, 1, 1)                      # pending kept set
    assert log == ["to-south"]                              # no crossing meanwhile
    s.notifier = lambda: None
    assert s.wakeup() is False and s.flags(SOUTH) == (1, 0, 0)


def test_always_mode_crosses_on_every_inject(mem):
    view = mem.view(0, 16)
    shm_signal.init_desc(view)
    log = []
    n = ShmSignal(view, NORTH, lambda: log.append(1), always=True)
    s = ShmSignal(view, SOUTH, lambda: None)
    s.enable()
    assert [n.inject() for _ in range(3)] == [True] * 3 and len(log) == 3


def test_bad_signal_magic_or_version_is_refused(mem):
    view = mem.view(0, 16)
    shm_signal.init_desc(view)
    view[0] ^= 1
    with pytest.raises(GuestError, match="magic"):
        ShmSignal(view, SOUTH, lambda: None)
    shm_signal.init_desc(view)
    view[4] = 2
    with pytest.raises(GuestError, match="version"):
        ShmSignal(view, SOUTH, lambda: None)


# -- IOQ ----------------------------------------------------------------------------------------
def test_requests_across_many_wraps(mem):
    """North posts requests on both indexes, south takes and completes them, north reaps:
    ten laps of an 8-entry ring in uneven batches, order and cookies kept."""
    north, south, _ = pair(mem, count=8)
    sent = done = 0
    reaped = []
    sizes = [3, 5, 8, 1, 7, 2, 6, 4]
    i = 0
    while done < 80:
        room = north.remain(VALID)
        k = min(sizes[i % len(sizes)], room, 80 - sent)
        i += 1
        north.post([(sent + j, 0x10000 + sent + j, 64) for j in range(k)])
        sent += k
        got = south.take(5)
        assert [c for _, c, _, _ in got] == list(range(done, done + len(got)))
        south.release(len(got))
        done += len(got)
        reaped += north.reap(8)
    reaped += north.reap(8)
    assert reaped == list(range(80))
    assert north.used(VALID) == 0 and north.used(INUSE) == 0


def test_full_ring_and_the_full_flag(mem):
    north, south, _ = pair(mem, count=4)
    north.post([(i, 0, 0) for i in range(4)])
    assert raw(mem, 24 + 8, "<B") == (1,) and raw(mem, 36 + 8, "<B") == (1,)
    assert north.full(VALID) and north.used(VALID) == 4 and north.remain(VALID) == 0
    with pytest.raises(GuestError, match="free"):
        north.post([(9, 0, 0)])
    assert len(south.take(10)) == 4                         # full: all four, not zero
    south.release(4)
    assert not south.full(INUSE) and south.used(INUSE) == 0
    assert north.reap(10) == [0, 1, 2, 3] and not north.full(VALID)


def test_a_lying_full_flag_is_ignored(mem):
    north, south, _ = pair(mem, count=4)
    north.post([(1, 0, 0)])
    mem.view(RING + 36 + 8, 1)[0] = 1                       # "full", with head != tail
    assert not south.full(INUSE) and south.used(INUSE) == 1
    assert len(south.take(10)) == 1
    # head == tail and "full" with nothing owned: the ownership check stops south
    south.release(1)
    mem.view(RING + 36 + 8, 1)[0] = 1
    assert south.used(INUSE) == 4 and south.take(10) == []


@pytest.mark.parametrize("where", [24, 28, 36, 40])
def test_indexes_beyond_count_are_a_guest_error(mem, where):
    north, south, _ = pair(mem, count=4)
    mem.view(RING + where, 4)[:] = (4).to_bytes(4, "little")
    # the inuse head is the popping side's own: any change by the peer is the error
    with pytest.raises(GuestError, match="inuse head is 4" if where == 36 else ">= count"):
        south.take(4) if where >= 36 else south.head(VALID) + south.tail(VALID)


@pytest.mark.parametrize("op", ["take", "release"])
def test_the_popping_side_notices_its_inuse_head_moved_by_the_peer(mem, op):
    """Even to a position that exists: south would otherwise serve or skip descriptors."""
    north, south, _ = pair(mem, count=4)
    north.post([(1, 0x100, 8), (2, 0x200, 8)])
    assert len(south.take(4)) == 2
    mem.view(RING + 36, 4)[:] = (1).to_bytes(4, "little")
    with pytest.raises(GuestError, match="inuse head is 1, not 0"):
        south.take(4) if op == "take" else south.release(2)


def test_descriptors_not_owned_are_not_taken_or_pushed(mem):
    north, south, _ = pair(mem, count=4)
    # the index says two are there, but north never handed them over
    mem.view(RING + 36 + 4, 4)[:] = (2).to_bytes(4, "little")
    assert south.take(4) == []
    # south cannot fill a buffer north never posted
    mem.view(RING + 36 + 4, 4)[:] = (0).to_bytes(4, "little")
    with pytest.raises(GuestError, match="changed owner"):
        south.fill([10])
    # north flips ownership of a held descriptor back while south holds it
    mem.view(RING + 36 + 4, 4)[:] = (0).to_bytes(4, "little")
    north.post([(1, 0, 0)])
    assert len(south.take(1)) == 1
    mem.view(RING + 56 + 25, 1)[0] = NORTH
    with pytest.raises(GuestError, match="changed owner"):
        south.release(1)


def test_ring_magic_version_and_size_are_checked(mem):
    init_ring(mem, RING, 4)
    mem.view(RING, 1)[0] ^= 0xFF
    with pytest.raises(GuestError, match="magic"):
        Ioq(mem, RING, SOUTH)
    init_ring(mem, RING, 4)
    mem.view(RING + 4, 1)[0] = 3
    with pytest.raises(GuestError, match="version"):
        Ioq(mem, RING, SOUTH)
    init_ring(mem, RING, 4)
    with pytest.raises(GuestError, match="need"):
        Ioq(mem, RING, SOUTH, length=ring_size(4) - 1)       # registered region too small
    mem.view(RING + 48, 4)[:] = (1 << 30).to_bytes(4, "little")
    with pytest.raises(GuestError, match="count"):
        Ioq(mem, RING, SOUTH)


def test_buffers_posted_filled_and_reposted(mem):
    """The rx pattern: buffers posted once on the valid index, filled by south at the inuse
    tail, taken by north at the inuse head and handed straight back, lap after lap."""
    north, south, _ = pair(mem, count=4)
    north.post([(i, 0x8000 + 0x100 * i, 0x100) for i in range(4)], both=False)
    got_total = []
    for lap in range(6):
        slots = south.free_slots(3)
        assert len(slots) == 3 or lap > 0
        south.fill([10 + lap] * len(slots))
        got = north.take(8)
        assert [n for *_, n in got] == [10 + lap] * len(slots)
        got_total += [c for _, c, _, _ in got]
        north.release(len(got), length=0x100)
    assert got_total[:4] == [0, 1, 2, 3] and len(got_total) == 18
    # the lengths were reset for the next fill
    assert all(n == 0x100 for *_, n in south.free_slots(4))
