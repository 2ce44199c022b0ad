"""The packed ring against hand-built rings and against our own driver side: wrap
counters, buffer ids, lists, indirect tables, out-of-order use, event suppression and
every rule a driver can break."""

import pytest

from alacrity.errors import DeviceError, GuestError
from alacrity.memory import GuestMemory
from alacrity.virtio.packed import PackedDriverQueue, PackedQueue
from alacrity.virtio.spec import (RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
                                  RING_EVENT_FLAGS_ENABLE)

from tests.helpers import INDIRECT, NEXT, WRITE, RawPackedRing

DATA = 0x100000
AVAIL, USED = 1 << 7, 1 << 15


@pytest.fixture
def mem():
    m = GuestMemory.create([(0, 4 << 20)])
    yield m
    m.close()


def device(mem, r, **kw):
    return PackedQueue(mem, r.size, r.desc, r.driver, r.device, **kw)


def test_one_buffer_round_trip_and_flag_rules(mem):
    r = RawPackedRing(mem, 4)
    q = device(mem, r)
    assert q.pop() == []                              # zeroed ring: nothing available
    slot = r.offer([(DATA, 16, False), (DATA + 64, 100, True)], bid=3)
    (c,) = q.pop()
    assert (c.head, c.ndesc, c.read_len, c.write_len) == (3, 2, 16, 100)
    q.push_many([c], [42])
    assert r.slot(slot)[3] == AVAIL | NEXT            # not visible as used before publish()
    assert q.publish() is True                        # driver event flags 0 = ENABLE
    addr, length, bid, flags = r.slot(slot)
    assert (length, bid) == (42, 3)
    assert flags & (AVAIL | USED) == AVAIL | USED and flags & WRITE   # used, wrap 1, wrote
    assert q.next_used == 2


def test_a_descriptor_is_available_only_with_matching_bits(mem):
    r = RawPackedRing(mem, 4)
    q = device(mem, r)
    r.put(DATA, 16, 0, AVAIL | USED)                  # looks used: not available
    assert q.pop() == []
    r.put(DATA, 16, 0, 0)                             # neither bit: not available at wrap 1
    assert q.pop() == []
    r.put(DATA, 16, 0, USED)                          # available only at wrap 0
    assert q.pop() == []
    r.put(DATA, 16, 0, AVAIL)
    assert [c.head for c in q.pop()] == [0]


def test_batch_is_exposed_by_its_first_flags(mem):
    r = RawPackedRing(mem, 8)
    q = device(mem, r)
    for b in range(3):
        r.offer([(DATA, 16, False)], bid=b)
    chains = q.pop()
    q.push_many(chains, [0, 0, 0])
    assert r.slot(0)[3] & USED == 0                   # the first is held back...
    assert r.slot(1)[3] & USED and r.slot(2)[3] & USED  # ...the rest are written
    q.publish()
    assert r.slot(0)[3] & USED


def driver_and_device(mem, size, event_idx=False, indirect=0):
    tables = [0x200000 + 256 * i for i in range(size)] if indirect else None
    base = 0x10000
    d = PackedDriverQueue(mem, size, base, base + 16 * size, base + 16 * size + 64,
                          event_idx=event_idx, indirect_tables=tables, indirect_max=indirect)
    q = PackedQueue(mem, size, base, base + 16 * size, base + 16 * size + 64,
                    event_idx=event_idx, indirect=bool(indirect))
    return d, q


def test_out_of_order_completion(mem):
    d, q = driver_and_device(mem, 8)
    d.add([(DATA, 16)], 1, "a")
    d.add([(DATA, 16), (DATA + 64, 8)], 1, "b")
    d.add([(DATA, 16)], 0, "c")
    d.kick_prepare()
    a, b, c = q.pop()
    assert (a.ndesc, b.ndesc, c.ndesc) == (1, 2, 1)
    q.push_many([b, c], [8, 5])
    q.publish()
    assert d.get_used() == [("b", 8), ("c", 5)]
    q.push_many([a], [1])
    q.publish()
    assert d.get_used() == [("a", 1)]
    assert d.num_free == 8 and (d.next_used, d.next_avail) == (4, 4)


@pytest.mark.parametrize("size", [3, 4, 7])
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [0, 4])
def test_round_trips_across_many_wrap_counter_flips(mem, size, event_idx, indirect):
    """Lists of 1-3 elements, completed in a shuffled order, through a ring whose size need
    not be a power of two: every token comes back once with its length."""
    d, q = driver_and_device(mem, size, event_idx, indirect)
    sent = received = 0
    pending: dict[int, int] = {}
    held = []
    flips = 0
    last_wrap = d.avail_wrap
    while received < 3000:
        while True:
            n = 1 + sent % 3
            need = 1 if (indirect and n > 1) else n
            if need > d.num_free or not d.free_ids:
                break
            d.add([(DATA + 64 * j, 8 + j) for j in range(n)], 1, sent, indirect=bool(indirect))
            pending[sent] = n
            sent += 1
        d.kick_prepare()
        held += q.pop()
        done, held = held[1::2] + held[:1], held[2::2] if len(held) > 2 else []
        if not done:
            done, held = held, []
        q.push_many(done, [len(c.readable) + len(c.writable) for c in done])
        q.publish()
        for token, length in d.get_used():
            assert length == pending.pop(token)
            received += 1
        if d.avail_wrap != last_wrap:
            flips += 1
            last_wrap = d.avail_wrap
    assert flips > 100


def test_indirect_table_is_sequential_and_only_write_counts(mem):
    r = RawPackedRing(mem, 4)
    table = 0x80000
    from tests.helpers import DESC
    DESC.pack_into(mem.view(table, 48), 0, DATA, 16, 99, NEXT | AVAIL)     # flags ignored but WRITE
    DESC.pack_into(mem.view(table, 48), 16, DATA + 16, 32, 7, WRITE | NEXT)
    DESC.pack_into(mem.view(table, 48), 32, DATA + 64, 1, 0, WRITE)
    r.offer([(table, 48, False)], bid=2)
    mem.write_u16(r.desc + 14, r.avail_flags() | INDIRECT)
    (c,) = device(mem, r, indirect=True).pop()
    assert (c.head, c.ndesc) == (2, 1)
    assert [len(v) for v in c.readable] == [16] and [len(v) for v in c.writable] == [32, 1]


@pytest.mark.parametrize("event_idx", [False, True])
def test_doorbell_suppression(mem, event_idx):
    d, q = driver_and_device(mem, 8, event_idx=event_idx)
    d.add([(DATA, 16)], 1, 0)
    assert d.kick_prepare() is True
    q.disable_notify()
    q.pop()
    d.add([(DATA, 16)], 1, 1)
    assert d.kick_prepare() is False
    assert q.enable_notify() is True                 # the re-check sees buffer 1
    q.pop()
    assert q.enable_notify() is False
    d.add([(DATA, 16)], 1, 2)
    assert d.kick_prepare() is True


def test_desc_event_kicks_only_when_crossing(mem):
    d, q = driver_and_device(mem, 8, event_idx=True)
    q._device[0] = (RING_EVENT_FLAGS_DESC << 16) | 3 | (1 << 15)  # "kick when slot 3, wrap 1"
    for i in range(3):
        d.add([(DATA, 16)], 1, i)
    assert d.kick_prepare() is False                 # slots 0..2 do not reach 3
    d.add([(DATA, 16)], 1, 3)
    assert d.kick_prepare() is True                  # slot 3 made available


def test_driver_event_suppression(mem):
    d, q = driver_and_device(mem, 4, event_idx=True)
    for i in range(4):
        d.add([(DATA, 16)], 1, i)
    d.kick_prepare()
    chains = q.pop()
    d.disable_cb()
    q.push_many(chains[:1], [0])
    assert q.publish() is False                      # DISABLE
    assert d.get_used() == [(0, 0)]
    assert d.enable_cb(delay=1) is False             # DESC at the second next slot
    q.push_many(chains[1:2], [0])
    assert q.publish() is False                      # slot 1 written: not yet
    q.push_many(chains[2:3], [0])
    assert q.publish() is True                       # slot 2: that is the event
    d._driver[0] = RING_EVENT_FLAGS_ENABLE
    q.push_many(chains[3:], [0])
    assert q.publish() is True


def test_event_across_the_wrap(mem):
    d, q = driver_and_device(mem, 4, event_idx=True)
    for rnd in range(2):
        for i in range(3):
            d.add([(DATA, 16)], 1, i)
        d.kick_prepare()
        q.push_many(q.pop(), [0, 0, 0])
        q.publish()
        d.get_used()
    # six slots used in a ring of four: slot 2, wrap 0; ask for the event 2 slots later,
    # which is slot 0 after the next flip (wrap 1)
    assert (d.next_used, d.used_wrap) == (2, 0)
    d.enable_cb(delay=2)
    assert d._driver[0] == (RING_EVENT_FLAGS_DESC << 16) | 0 | (1 << 15)
    for i in range(3):
        d.add([(DATA, 16)], 1, i)
    d.kick_prepare()
    chains = q.pop()
    q.push_many(chains[:2], [0, 0])                  # slots 2, 3 (wrap 0)
    assert q.publish() is False
    q.push_many(chains[2:], [0])                     # slot 0 (wrap 1): the event
    assert q.publish() is True


@pytest.mark.parametrize("case", [
    "id-too-big", "id-reused", "list-longer-than-queue", "readable-after-writable",
    "indirect-with-next", "indirect-not-negotiated", "indirect-len-0", "indirect-len-17",
    "indirect-second-in-list", "tail-slot-not-available", "addr-outside-ram", "len-wraps",
    "indirect-table-too-long",
])
def test_rule_breaking_buffers_raise_guest_error(mem, case):
    r = RawPackedRing(mem, 4)
    av = r.avail_flags()
    indirect = case != "indirect-not-negotiated"
    q = device(mem, r, indirect=indirect)
    if case == "id-too-big":
        r.put(DATA, 16, 4, av)
    elif case == "id-reused":
        r.offer([(DATA, 16, False)], bid=1)
        q.pop()
        r.offer([(DATA, 16, False)], bid=1)
    elif case == "list-longer-than-queue":
        for s in range(4):
            r.put(DATA, 16, 0, av | NEXT, slot=s)     # every slot says NEXT: wraps forever
    elif case == "readable-after-writable":
        r.put(DATA, 16, 0, av | WRITE | NEXT, slot=0)
        r.put(DATA, 16, 0, av, slot=1)
    elif case == "indirect-with-next":
        r.put(0x80000, 16, 0, av | INDIRECT | NEXT, slot=0)
        r.put(DATA, 16, 0, av, slot=1)
    elif case in ("indirect-not-negotiated", "indirect-len-0", "indirect-len-17"):
        n = {"indirect-len-0": 0, "indirect-len-17": 17}.get(case, 16)
        r.put(0x80000, n, 0, av | INDIRECT)
    elif case == "indirect-second-in-list":
        r.put(DATA, 16, 0, av | NEXT, slot=0)
        r.put(0x80000, 16, 0, av | INDIRECT, slot=1)
    elif case == "tail-slot-not-available":
        r.put(DATA, 16, 0, av | NEXT, slot=0)
        r.put(DATA, 16, 0, AVAIL | USED, slot=1)     # a used-looking slot in the list
    elif case == "addr-outside-ram":
        r.put(4 << 20, 16, 0, av)
    elif case == "len-wraps":
        r.put(2**64 - 8, 16, 0, av)
    elif case == "indirect-table-too-long":
        r.put(0x80000, 16 * 5, 0, av | INDIRECT)
    with pytest.raises(GuestError):
        q.pop()


def test_driver_rejects_a_lying_device(mem):
    d, q = driver_and_device(mem, 4)
    d.add([(DATA, 16)], 1, "a")
    d.kick_prepare()
    q.pop()
    r = RawPackedRing(mem, 4)
    r.put(0, 0, 3, AVAIL | USED, slot=0)             # used id 3: never offered
    with pytest.raises(DeviceError):
        d.get_used()
    r.put(0, 0, 0, USED, slot=0)                     # USED without AVAIL is not "used"
    assert d.get_used() == []


def test_layout_checks(mem):
    with pytest.raises(GuestError):
        PackedQueue(mem, 0, 0x10000, 0x11000, 0x12000)
    with pytest.raises(GuestError):
        PackedQueue(mem, 4, 0x10008, 0x11000, 0x12000)
    with pytest.raises(GuestError):
        PackedQueue(mem, 4, 0x10000, 0x11002, 0x12000)
    with pytest.raises(GuestError):
        PackedQueue(mem, 4, (4 << 20) - 32, 0x11000, 0x12000)
    PackedQueue(mem, 5, 0x10000, 0x11000, 0x12000)   # any size is fine


def test_disable_flags_values(mem):
    d, q = driver_and_device(mem, 4)
    q.disable_notify()
    assert q._device[0] >> 16 == RING_EVENT_FLAGS_DISABLE
    d.disable_cb()
    assert d._driver[0] >> 16 == RING_EVENT_FLAGS_DISABLE


def test_lone_buffer_cache_by_id_sees_every_change(mem):
    r = RawPackedRing(mem, 4)
    q = device(mem, r)
    for lap in range(3):                              # same id and buffer, new slots
        r.offer([(DATA, 64, True)], bid=1)
        (c,) = q.pop()
        if lap == 0:
            first = c
        assert c is first
        q.push_many([c], [0])
        q.publish()
    r.offer([(DATA + 4096, 64, True)], bid=1)         # same id, another buffer
    (c,) = q.pop()
    assert c is not first and bytes(c.writable[0]) == mem.read(DATA + 4096, 64)
    q.push_many([c], [0])
    q.publish()
    r.offer([(4 << 20, 64, True)], bid=1)             # same id, outside RAM
    with pytest.raises(GuestError):
        q.pop()


def test_pinned_packed_buffers_keep_their_id(mem):
    d, q = driver_and_device(mem, 4)
    h = d.add([(DATA, 64)], 0, "a", pin=True)
    for i in range(10):                               # many laps of a 4-slot ring
        d.kick_prepare()
        (c,) = q.pop()
        assert c.head == h[3]
        q.push_many([c], [8])
        q.publish()
        assert d.get_used() == [("a" if i == 0 else i - 1, 8)]
        d.readd(h, i)
    assert d.num_free == 3 and h[3] not in d.free_ids


def test_readd_many_is_readd_in_a_batch(mem):
    """A batch of pinned buffers offered again with readd_many (or readd, one by one, on
    alternate laps): the device sees the same ids, lengths and directions, in order, across
    many laps; a buffer still in flight is refused."""
    d, q = driver_and_device(mem, 4)
    hs = [d.add([(DATA + 0x100 * i, 64 + i)], i % 2, f"b{i}", pin=True) for i in range(3)]
    for lap in range(8):
        d.kick_prepare()
        chains = q.pop()
        assert [c.head for c in chains] == [h[3] for h in hs]
        assert [(c.read_len, c.write_len) for c in chains] == [(0, 64), (65, 0), (0, 66)]
        q.push_many(chains, [0] * 3)
        q.publish()
        assert len(d.get_used()) == 3
        if lap % 2:
            d.readd_many(hs, [lap] * 3)
        else:                                      # one by one: the same ring contents
            for h in hs:
                d.readd(h, lap)
    with pytest.raises(ValueError):
        d.readd_many(hs[:1], ["again"])
    with pytest.raises(ValueError):
        d.readd(hs[0], "again")
