"""Property, for the split and the packed ring: whatever a guest puts in the rings, the
virtio-blk device behind virtio-mmio never lets an exception out, never writes guest
memory outside the ring's device-written parts and the device-writable buffers the guest
named, maps every buffer to exactly the guest-physical range the descriptor gave, and
either completes every available buffer or sets DEVICE_NEEDS_RESET."""

import ctypes
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alacrity.bus import IrqLine
from alacrity.devices.block import BlockCore, FileBackend
from alacrity.memory import GuestMemory
from alacrity.virtio import spec
from alacrity.virtio.blk import VirtioBlk
from alacrity.virtio.mmio import VirtioMmioDevice
from alacrity.virtio.packed import PackedQueue
from alacrity.virtio.split import SplitQueue

from tests.helpers import DESC, mmio_bring_up

KiB = 1024
R0 = (0, 64 * KiB)              # region 0: rings and some data
R1 = (128 * KiB, 64 * KiB)      # region 1, after a hole
RING = 0x1000                   # desc table; avail and used follow
TABLE = 128 * KiB + 32 * KiB    # where an indirect table lives
SIZE = 8

interesting_addr = st.one_of(
    st.integers(0x4000, 64 * KiB - 1),                  # data in region 0
    st.integers(128 * KiB, 192 * KiB - 1),              # region 1
    st.sampled_from([0, 64 * KiB - 16, 64 * KiB, 100 * KiB, 128 * KiB - 1, 192 * KiB - 1,
                     192 * KiB, 2**64 - 1, 2**64 - 16, 2**63, TABLE]),
    st.integers(0, 2**64 - 1),
)
interesting_len = st.one_of(st.integers(0, 4200), st.sampled_from([16, 1, 512, 4096, 2**32 - 1,
                                                                    64 * KiB, 0x10001]))
desc_st = st.tuples(interesting_addr, interesting_len, st.integers(0, 0xFFFF), st.integers(0, 24))
sane_desc = st.tuples(                                   # the shapes a real driver writes
    st.sampled_from([0x4000, 0x5000, 0x6000, 0x7000, 0x8000, 0x9000, 0xA001, 128 * KiB + 512]),
    st.sampled_from([16, 1, 512, 1024, 4096]),
    st.sampled_from([0, 1, 2, 3]),
    st.integers(0, SIZE - 1),
)
flag_heavy = st.tuples(interesting_addr, interesting_len,
                       st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 0x8003]), st.integers(0, 9))


def host_addr(v: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(v))


def check_outcome(mem, before, seen, descs, table, ring_written, dev):
    """The three properties, for either ring."""
    from hypothesis import event
    event(f"broken={dev.broken} chains={min(len(seen), 3)}")
    # 1. every mapped buffer is exactly where the guest said, inside one region
    for c in seen:
        for v in c.readable + c.writable:
            if len(v):
                ha = host_addr(v)
                assert any(host_addr(r.mv) <= ha and ha + len(v) <= host_addr(r.mv) + r.size
                           for r in mem.regions)
    # 2. nothing written outside the ring's device parts and the writable ranges named
    allowed = list(ring_written)
    for a, n, f, _ in list(descs) + list(table):
        if f & spec.DESC_F_WRITE:
            allowed.append((a, a + (n & 0xFFFFFFFF)))
    for r, old in zip(mem.regions, before):
        new = bytes(r.mv)
        if new == old:
            continue
        for off in range(r.size):
            if new[off] != old[off]:
                gpa = r.gpa + off
                assert any(lo <= gpa < hi for lo, hi in allowed), f"stray write at {gpa:#x}"
    # 3. a device that did not complete everything asked for a reset
    status = dev.read(0x70, 4)
    if dev.broken:
        assert status & spec.DEVICE_NEEDS_RESET
        assert dev.read(0x60, 4) & 2          # config-change interrupt pending
    else:
        assert not status & spec.DEVICE_NEEDS_RESET


@st.composite
def ring_contents(draw):
    """Mostly well-formed requests (so the device really works), then a few descriptors
    overwritten with anything at all."""
    ids = draw(st.permutations(range(SIZE)))
    descs = [draw(st.one_of(desc_st, flag_heavy)) for _ in range(SIZE)]
    heads = []
    pos = 0
    for r in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["in", "out", "flush", "getid"]))
        data_len = 512 * draw(st.integers(1, 3))
        parts = [(0x4000 + 0x1000 * r, 16, 0)]
        if kind == "in":
            parts.append((0x8000 + 0x800 * r, data_len, spec.DESC_F_WRITE))
        elif kind == "out":
            parts.append((128 * KiB + 0x800 * r, data_len, 0))
        elif kind == "getid":
            parts.append((0x8000 + 0x800 * r, 20, spec.DESC_F_WRITE))
        parts.append((0xC000 + r, 1, spec.DESC_F_WRITE))
        if pos + len(parts) > SIZE:
            break
        chain = ids[pos:pos + len(parts)]
        pos += len(parts)
        for j, (a, n, f) in enumerate(parts):
            last = j == len(parts) - 1
            descs[chain[j]] = (a, n, f | (0 if last else spec.DESC_F_NEXT), 0 if last else chain[j + 1])
        heads.append(chain[0])
    for i, d in draw(st.lists(st.tuples(st.integers(0, SIZE - 1), st.one_of(desc_st, flag_heavy)),
                              max_size=2)):
        descs[i] = d
    n_valid = len(heads)
    heads += [draw(st.integers(0, SIZE + 2)) for _ in range(SIZE - len(heads))]
    avail_idx = draw(st.one_of(st.just(n_valid), st.just(n_valid), st.integers(0, SIZE + 3)))
    return descs, heads, avail_idx


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    contents=ring_contents(),
    table=st.lists(st.one_of(sane_desc, sane_desc, desc_st, flag_heavy), min_size=0, max_size=12),
    headers=st.lists(st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 99]), st.integers(0, 70)),
                     min_size=4, max_size=4),
    event_idx=st.booleans(),
    indirect=st.booleans(),
)
def test_device_survives_any_split_ring(tmp_path_factory, contents, table, headers, event_idx, indirect):
    descs, heads, avail_idx = contents
    img = tmp_path_factory.mktemp("img") / "disk"
    img.write_bytes(os.urandom(32 * KiB))            # 64 sectors
    mem = GuestMemory.create([R0, R1])
    irq = IrqLine(5)
    backend = FileBackend(str(img))
    try:
        # plausible request headers at a few places the descriptors may point at
        for i, (rtype, sector) in enumerate(headers):
            mem.write(0x4000 + 0x1000 * i, struct.pack("<IIQ", rtype, 0, sector))
        for i, (a, n, f, nx) in enumerate(descs):
            DESC.pack_into(mem.view(RING + 16 * i, 16), 0, a, n & 0xFFFFFFFF, f, nx)
        for i, (a, n, f, nx) in enumerate(table):
            DESC.pack_into(mem.view(TABLE + 16 * i, 16), 0, a, n & 0xFFFFFFFF, f, nx)
        avail = RING + 16 * SIZE
        used = avail + 0x100
        for i, h in enumerate(heads):
            mem.write_u16(avail + 4 + 2 * i, h)
        mem.write_u16(avail + 2, avail_idx)
        before = [bytes(r.mv) for r in mem.regions]

        features = spec.bit(spec.F_VERSION_1)
        features |= spec.bit(spec.F_EVENT_IDX) if event_idx else 0
        features |= spec.bit(spec.F_INDIRECT_DESC) if indirect else 0
        dev = VirtioMmioDevice(VirtioBlk(BlockCore(backend), queue_max=SIZE), mem, irq)
        # watch every chain the ring hands to the device
        seen = []
        real_pop = SplitQueue.pop

        def spy(self, limit=1 << 16):
            chains = real_pop(self, limit)
            seen.extend(chains)
            return chains

        SplitQueue.pop = spy
        try:
            mmio_bring_up(dev, features, [(SIZE, RING, avail, used)])  # DRIVER_OK serves the ring
            dev.notify(0)
        finally:
            SplitQueue.pop = real_pop

        check_outcome(mem, before, seen, descs, table, [(used, used + 6 + 8 * SIZE)], dev)
        if not dev.broken:
            assert mem.read_u16(used + 2) == avail_idx
    finally:
        backend.close()
        irq.close()
        del before
        mem.close()


PSIZE = 6                                    # packed rings need not be a power of two
PDRIVER = RING + 16 * PSIZE                  # driver event suppression
PDEVICE = PDRIVER + 64                       # device event suppression


@st.composite
def packed_contents(draw):
    """Buffers offered the proper way (ids, wrap bits, head last), some already in a second
    lap, then a few slots overwritten with anything at all."""
    slots: list[tuple[int, int, int, int]] = [draw(st.one_of(desc_st, flag_heavy))
                                              for _ in range(PSIZE)]
    pos, wrap = 0, 1
    ids = draw(st.permutations(range(PSIZE)))
    for r in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["in", "out", "flush", "getid"]))
        parts = [(0x4000 + 0x1000 * r, 16, 0)]
        if kind == "in":
            parts.append((0x8000 + 0x800 * r, 512 * draw(st.integers(1, 2)), spec.DESC_F_WRITE))
        elif kind == "out":
            parts.append((128 * KiB + 0x800 * r, 512, 0))
        elif kind == "getid":
            parts.append((0x8000 + 0x800 * r, 20, spec.DESC_F_WRITE))
        parts.append((0xC000 + r, 1, spec.DESC_F_WRITE))
        if pos + len(parts) > PSIZE:
            break
        avail = spec.DESC_F_AVAIL if wrap else spec.DESC_F_USED
        for j, (a, n, f) in enumerate(parts):
            nxt = spec.DESC_F_NEXT if j < len(parts) - 1 else 0
            slots[pos] = (a, n, f | nxt | avail, ids[r])
            pos += 1
    for i, d in draw(st.lists(st.tuples(st.integers(0, PSIZE - 1),
                                        st.one_of(desc_st, flag_heavy)), max_size=2)):
        slots[i] = d
    return slots


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slots=packed_contents(),
       table=st.lists(st.one_of(sane_desc, sane_desc, desc_st, flag_heavy), min_size=0, max_size=12),
       headers=st.lists(st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 99]), st.integers(0, 70)),
                        min_size=4, max_size=4),
       driver_event=st.integers(0, 0xFFFFFFFF),
       event_idx=st.booleans(), indirect=st.booleans())
def test_device_survives_any_packed_ring(tmp_path_factory, slots, table, headers, driver_event,
                                         event_idx, indirect):
    img = tmp_path_factory.mktemp("img") / "disk"
    img.write_bytes(os.urandom(32 * KiB))
    mem = GuestMemory.create([R0, R1])
    irq = IrqLine(5)
    backend = FileBackend(str(img))
    try:
        for i, (rtype, sector) in enumerate(headers):
            mem.write(0x4000 + 0x1000 * i, struct.pack("<IIQ", rtype, 0, sector))
        for i, (a, n, f, bid) in enumerate(slots):
            DESC.pack_into(mem.view(RING + 16 * i, 16), 0, a, n & 0xFFFFFFFF, bid & 0xFFFF, f)
        for i, (a, n, f, nx) in enumerate(table):
            DESC.pack_into(mem.view(TABLE + 16 * i, 16), 0, a, n & 0xFFFFFFFF, nx, f)
        mem.write_u32(PDRIVER, driver_event)
        before = [bytes(r.mv) for r in mem.regions]

        features = spec.bit(spec.F_VERSION_1) | spec.bit(spec.F_RING_PACKED)
        features |= spec.bit(spec.F_EVENT_IDX) if event_idx else 0
        features |= spec.bit(spec.F_INDIRECT_DESC) if indirect else 0
        dev = VirtioMmioDevice(VirtioBlk(BlockCore(backend), queue_max=PSIZE), mem, irq)
        seen = []
        real_pop = PackedQueue.pop

        def spy(self, limit=1 << 16):
            chains = real_pop(self, limit)
            seen.extend(chains)
            return chains

        PackedQueue.pop = spy
        try:
            mmio_bring_up(dev, features, [(PSIZE, RING, PDRIVER, PDEVICE)])
            dev.notify(0)
        finally:
            PackedQueue.pop = real_pop
        # the device writes the descriptor ring (used slots) and its own event structure
        check_outcome(mem, before, seen, [(a, n, f, 0) for a, n, f, _ in slots], table,
                      [(RING, RING + 16 * PSIZE), (PDEVICE, PDEVICE + 4)], dev)
        if not dev.broken:
            ring = dev.queues[0].ring
            assert (ring.next_used, ring.used_wrap) == (ring.next_avail, ring.avail_wrap)
            assert not ring.has_work()
    finally:
        backend.close()
        irq.close()
        del before
        mem.close()


def copies_agree_with_pop(mem, fast, slow, limit: int, longest: int) -> list[int] | None:
    """take_copies() on `fast` against pop() on `slow` (the same ring, two device sides):
    it fails only where pop() fails (None), only reads, and takes exactly the lone readable
    buffers pop() hands over, with their bytes after a 12-byte header. Returns the ids."""
    from alacrity.errors import GuestError
    before = [bytes(r.mv) for r in mem.regions]
    try:
        got, copies = fast.take_copies(limit, 12, longest)
    except GuestError:                    # e.g. a buffer outside RAM: pop() refuses it too
        try:
            slow.pop(limit)
        except GuestError:
            return None
        raise AssertionError("take_copies failed where pop() did not")
    assert [bytes(r.mv) for r in mem.regions] == before          # it only reads
    chains = slow.pop(len(got)) if got else []
    assert [c.head for c in chains] == got
    for c, data in zip(chains, copies):
        assert len(c.readable) == 1 and not c.writable and 12 <= c.read_len <= longest
        assert bytes(c.readable[0])[12:] == data
    return got


@settings(max_examples=300, deadline=None)
@given(
    descs=st.lists(st.one_of(desc_st, flag_heavy, st.tuples(
        st.sampled_from([0x4000, 0x5000, 64 * KiB - 20, 128 * KiB + 512, 192 * KiB - 64]),
        st.sampled_from([0, 11, 12, 13, 60, 64, 1514]), st.just(0), st.just(0))),
        min_size=SIZE, max_size=SIZE),
    heads=st.lists(st.integers(0, SIZE + 2), min_size=SIZE, max_size=SIZE),
    avail_idx=st.integers(0, SIZE + 3),
    limit=st.integers(1, SIZE + 2),
    longest=st.sampled_from([12, 64, 1514, 1 << 20]),
)
def test_split_take_copies_agrees_with_pop(descs, heads, avail_idx, limit, longest):
    """The copy fast path (net tx) takes exactly the lone readable buffers pop() would hand
    to the handler, copies exactly their bytes after the header, stops at the first other
    chain, and fails only where pop() fails too."""
    mem = GuestMemory.create([R0, R1])
    try:
        for i, (a, n, f, nx) in enumerate(descs):
            DESC.pack_into(mem.view(RING + 16 * i, 16), 0, a, n & 0xFFFFFFFF, f, nx)
        avail = RING + 16 * SIZE
        for i, h in enumerate(heads):
            mem.write_u16(avail + 4 + 2 * i, h)
        mem.write_u16(avail + 2, avail_idx)
        fast = SplitQueue(mem, SIZE, RING, avail, avail + 0x100, indirect=True)
        slow = SplitQueue(mem, SIZE, RING, avail, avail + 0x100, indirect=True)
        got_heads = copies_agree_with_pop(mem, fast, slow, limit, longest)
        if got_heads is None:
            return
        assert fast.last_avail == len(got_heads)
        n = min(avail_idx, SIZE, limit) if avail_idx <= SIZE else 0
        if len(got_heads) < n:                                        # it stopped early:
            a, ln, f, _ = descs[heads[len(got_heads)]]                # at something else
            assert f or not 12 <= (ln & 0xFFFFFFFF) <= longest
    finally:
        mem.close()


PACKED_FLAGS = st.sampled_from([0x80, 0x8000, 0x8080, 0, 0x81, 0x82, 0x84, 0x8001, 0x80 | 0x100])


@settings(max_examples=300, deadline=None)
@given(
    slots=st.lists(st.tuples(
        st.sampled_from([0x4000, 0x5000, 64 * KiB - 20, 128 * KiB + 512, 192 * KiB - 64]),
        st.sampled_from([0, 11, 12, 13, 60, 64, 1514]),
        st.integers(0, SIZE + 2), PACKED_FLAGS), min_size=SIZE, max_size=SIZE),
    start=st.integers(0, SIZE - 1),
    wrap=st.integers(0, 1),
    limit=st.integers(1, SIZE + 2),
    longest=st.sampled_from([12, 64, 1514, 1 << 20]),
)
def test_packed_take_copies_agrees_with_pop(slots, start, wrap, limit, longest):
    """The packed copy fast path takes exactly the lone readable buffers pop() would hand
    over (same ids, same bytes after the header, same position), stops at anything else,
    never takes what pop() would refuse, and fails only where pop() fails too."""
    from alacrity.errors import GuestError
    mem = GuestMemory.create([R0, R1])
    try:
        for i, (a, n, bid, f) in enumerate(slots):
            DESC.pack_into(mem.view(RING + 16 * i, 16), 0, a, n, bid, f)
        drv = RING + 16 * SIZE

        def queue():
            return PackedQueue(mem, SIZE, RING, drv, drv + 4, indirect=True,
                               next_avail=start, avail_wrap=wrap)
        fast, slow = queue(), queue()
        got = copies_agree_with_pop(mem, fast, slow, limit, longest)
        if got is None:
            return
        assert (fast.next_avail, fast.avail_wrap) == (slow.next_avail, slow.avail_wrap)
        if len(got) < limit:              # it stopped: pop() would not take the next one
            rest = queue()                # as a lone, in-range, new, short-enough buffer
            rest.pop(len(got)) if got else None
            try:
                more = rest.pop(1)
            except GuestError:
                return
            if more:
                c = more[0]
                assert (c.writable or len(c.readable) != 1 or c.ndesc != 1
                        or not 12 <= c.read_len <= longest or c.head in got), (c, got)
    finally:
        mem.close()


def test_packed_copy_fast_path_round_trip_across_wraps():
    """Driver adds lone buffers, the device takes copies and completes them with
    push_heads: the driver gets every token back in order, with 0 bytes written, lap after
    lap."""
    from alacrity.virtio.packed import PackedDriverQueue
    mem = GuestMemory.create([R0, R1])
    try:
        drv_q = PackedDriverQueue(mem, SIZE, RING, RING + 16 * SIZE, RING + 16 * SIZE + 4)
        dev_q = PackedQueue(mem, SIZE, RING, RING + 16 * SIZE, RING + 16 * SIZE + 4)
        token = 0
        for lap in range(5):
            n = 3 + lap % 4
            for i in range(n):
                addr = 0x4000 + 0x100 * i
                mem.write(addr, bytes(12) + bytes([token & 0xFF]) * 50)
                drv_q.add([(addr, 62)], 1, token)
                token += 1
            drv_q.kick_prepare()
            heads, copies = dev_q.take_copies(SIZE, 12, 1514)
            assert len(heads) == n and all(len(c) == 50 for c in copies)
            assert [c[0] for c in copies] == [(token - n + i) & 0xFF for i in range(n)]
            dev_q.push_heads(heads)
            dev_q.publish()
            assert [w for _, w in drv_q.get_used()] == [0] * n
            assert not dev_q.has_work()
    finally:
        mem.close()
