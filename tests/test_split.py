"""The split ring against hand-built rings: layout, chains, indirect tables, the rules a
driver can break, notification suppression, and 16-bit index wrap."""

import pytest

from alacrity.errors import DeviceError, GuestError
from alacrity.memory import GuestMemory
from alacrity.virtio.spec import AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY, need_event
from alacrity.virtio.split import SplitDriverQueue, SplitQueue

from tests.helpers import INDIRECT, NEXT, WRITE, RawRing

DATA = 0x100000


@pytest.fixture
def mem():
    m = GuestMemory.create([(0, 4 << 20)])
    yield m
    m.close()


def device(mem, ring, **kw):
    return SplitQueue(mem, ring.size, ring.desc, ring.avail, ring.used, **kw)


def test_chain_readable_then_writable(mem):
    r = RawRing(mem, 8)
    mem.write(DATA, b"H" * 16)
    r.set_desc(3, DATA, 16, NEXT, 5)
    r.set_desc(5, DATA + 100, 512, NEXT | WRITE, 1)
    r.set_desc(1, DATA + 700, 1, WRITE)
    r.make_available(3)
    q = device(mem, r)
    (c,) = q.pop()
    assert c.head == 3
    assert [bytes(v) for v in c.readable] == [b"H" * 16]
    assert [len(v) for v in c.writable] == [512, 1]
    assert (c.read_len, c.write_len) == (16, 513)
    c.writable[1][0] = 0x5A
    assert mem.read_u8(DATA + 700) == 0x5A
    assert q.pop() == []


def test_pop_takes_a_whole_batch_or_a_bounded_one(mem):
    r = RawRing(mem, 16)
    for i in range(10):
        r.set_desc(i, DATA + 64 * i, 64)
    r.make_available(*range(10))
    q = device(mem, r)
    assert [c.head for c in q.pop(4)] == [0, 1, 2, 3]
    assert [c.head for c in q.pop()] == list(range(4, 10))


def test_used_elements_invisible_until_publish(mem):
    r = RawRing(mem, 8)
    r.set_desc(0, DATA, 16)
    r.set_desc(1, DATA, 16)
    r.make_available(0, 1)
    q = device(mem, r)
    chains = q.pop()
    q.push(chains[1].head, 7)
    q.push(chains[0].head, 9)          # out of order completion is allowed
    assert r.used_idx() == 0
    assert q.publish() is True         # flags 0: the driver wants interrupts
    assert r.used_idx() == 2
    assert r.used_elem(0) == (1, 7) and r.used_elem(1) == (0, 9)
    assert q.publish() is False        # nothing new


def test_indirect_table(mem):
    r = RawRing(mem, 8)
    table = 0x80000
    r.set_desc(0, DATA, 16, NEXT, 1, table=table)
    r.set_desc(1, DATA + 16, 4096, NEXT | WRITE, 2, table=table)
    r.set_desc(2, DATA + 8192, 1, WRITE, table=table)
    r.set_desc(4, table, 48, INDIRECT)
    r.make_available(4)
    (c,) = device(mem, r, indirect=True).pop()
    assert c.head == 4
    assert [len(v) for v in c.readable] == [16] and [len(v) for v in c.writable] == [4096, 1]


@pytest.mark.parametrize("case", [
    "indirect-not-negotiated", "indirect-with-next", "indirect-len-0", "indirect-len-17",
    "nested-indirect", "loop", "self-loop", "too-long-indirect", "readable-after-writable",
    "head-out-of-range", "next-out-of-range", "next-out-of-indirect-table",
    "addr-outside-ram", "addr-wraps", "avail-idx-too-far", "indirect-table-outside-ram",
])
def test_rule_breaking_chains_raise_guest_error(mem, case):
    r = RawRing(mem, 8)
    table = 0x80000
    head = 0
    indirect = case != "indirect-not-negotiated"
    if case == "indirect-not-negotiated":
        r.set_desc(0, table, 16, INDIRECT)
        r.set_desc(0, DATA, 16, table=table)
    elif case == "indirect-with-next":
        r.set_desc(0, table, 16, INDIRECT | NEXT, 1)
        r.set_desc(1, DATA, 16)
    elif case == "indirect-len-0":
        r.set_desc(0, table, 0, INDIRECT)
    elif case == "indirect-len-17":
        r.set_desc(0, table, 17, INDIRECT)
    elif case == "nested-indirect":
        r.set_desc(0, table, 16, INDIRECT)
        r.set_desc(0, table + 256, 16, INDIRECT, table=table)
    elif case == "loop":
        r.set_desc(0, DATA, 16, NEXT, 1)
        r.set_desc(1, DATA, 16, NEXT, 0)
    elif case == "self-loop":
        r.set_desc(0, DATA, 16, NEXT, 0)
    elif case == "too-long-indirect":      # 9 entries > queue size 8
        for i in range(9):
            r.set_desc(i, DATA, 16, NEXT if i < 8 else 0, i + 1, table=table)
        r.set_desc(0, table, 16 * 9, INDIRECT)
    elif case == "readable-after-writable":
        r.set_desc(0, DATA, 16, NEXT | WRITE, 1)
        r.set_desc(1, DATA, 16)
    elif case == "head-out-of-range":
        head = 8
    elif case == "next-out-of-range":
        r.set_desc(0, DATA, 16, NEXT, 8)
    elif case == "next-out-of-indirect-table":
        r.set_desc(0, DATA, 16, NEXT, 2, table=table)
        r.set_desc(0, table, 32, INDIRECT)
    elif case == "addr-outside-ram":
        r.set_desc(0, 4 << 20, 16)
    elif case == "addr-wraps":
        r.set_desc(0, 2**64 - 8, 16)
    elif case == "indirect-table-outside-ram":
        r.set_desc(0, (4 << 20) - 16, 32, INDIRECT)
    q = device(mem, r, indirect=indirect)
    if case == "avail-idx-too-far":
        r.set_avail_idx(9)
    else:
        r.make_available(head)
    with pytest.raises(GuestError):
        q.pop()


def test_chain_of_exactly_queue_size_is_fine(mem):
    r = RawRing(mem, 4)
    for i in range(4):
        r.set_desc(i, DATA, 16, NEXT if i < 3 else 0, i + 1)
    r.make_available(0)
    (c,) = device(mem, r).pop()
    assert len(c.readable) == 4


@pytest.mark.parametrize("event,new,old,expect", [
    (0, 1, 0, True),            # the first entry after event 0
    (5, 5, 4, False),           # event=5 means "after entry 5 is used", i.e. new > 6
    (5, 6, 5, True),
    (5, 10, 3, True),           # crossed in one batch
    (5, 10, 7, False),          # already past: stale event
    (0xFFFF, 0, 0xFFFF, True),  # wrap: crossing 0xffff -> 0
    (0xFFFE, 2, 0xFFF0, True),  # batch across the wrap that crosses the event
    (3, 2, 0xFFF0, False),      # across the wrap but short of the event
    (0xFFF0, 0xFFF0, 0xFFF0, False),
])
def test_need_event(event, new, old, expect):
    assert need_event(event, new, old) is expect


def test_interrupt_suppression_without_event_idx(mem):
    r = RawRing(mem, 8)
    r.set_desc(0, DATA, 16)
    q = device(mem, r)
    r.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    r.make_available(0)
    q.push(q.pop()[0].head, 0)
    assert q.publish() is False
    r.set_avail_flags(0)
    r.make_available(0)
    q.push(q.pop()[0].head, 0)
    assert q.publish() is True


def test_used_event_across_the_wrap(mem):
    r = RawRing(mem, 8)
    r.set_desc(0, DATA, 16)
    start = 0xFFFD
    q = SplitQueue(mem, 8, r.desc, r.avail, r.used, event_idx=True,
                   last_avail=start, used_idx=start)
    r.set_avail_idx(start)
    r.set_used_event(0xFFFF)            # interrupt once entry 0xffff has been used
    r.make_available(0)                 # idx fffe
    q.push(q.pop()[0].head, 1)
    assert q.publish() is False         # used idx fffd -> fffe: not yet
    r.make_available(0, 0)              # idx 0000
    for c in q.pop():
        q.push(c.head, 1)
    assert q.publish() is True          # fffe -> 0000 crosses ffff
    assert r.used_idx() == 0


def test_doorbell_suppression_and_recheck(mem):
    r = RawRing(mem, 8)
    r.set_desc(0, DATA, 16)
    q = device(mem, r)
    q.disable_notify()
    assert r.used_flags() == USED_F_NO_NOTIFY
    assert q.enable_notify() is False
    assert r.used_flags() == 0
    r.make_available(0)
    q.disable_notify()
    assert q.enable_notify() is True    # work arrived while muted: the re-check sees it

    e = SplitQueue(mem, 8, r.desc, r.avail, r.used, event_idx=True)
    r.set_avail_idx(0)
    e.disable_notify()                  # with EVENT_IDX: flags untouched
    assert r.used_flags() == 0
    assert e.enable_notify() is False
    assert r.avail_event() == 0


def driver_and_device(mem, size=8, event_idx=False, indirect=0):
    tables = [0x200000 + 256 * i for i in range(size)] if indirect else None
    d = SplitDriverQueue(mem, size, 0x10000, 0x11000, 0x12000, event_idx=event_idx,
                         indirect_tables=tables, indirect_max=indirect)
    q = SplitQueue(mem, size, 0x10000, 0x11000, 0x12000, event_idx=event_idx,
                   indirect=bool(indirect))
    return d, q


@pytest.mark.parametrize("event_idx", [False, True])
def test_driver_kick_decisions(mem, event_idx):
    d, q = driver_and_device(mem, event_idx=event_idx)
    d.add([(DATA, 16)], 1, "a")
    assert d.kick_prepare() is True     # the device starts out wanting doorbells
    q.disable_notify()
    q.pop()
    d.add([(DATA, 16)], 1, "b")
    assert d.kick_prepare() is False    # muted while the device works
    assert q.enable_notify() is True    # ...and the device sees "b" on its re-check
    q.pop()
    assert q.enable_notify() is False
    d.add([(DATA, 16)], 1, "c")
    assert d.kick_prepare() is True


def test_driver_interrupt_requests(mem):
    d, q = driver_and_device(mem, event_idx=True)
    d.add([(DATA, 16)], 1, "a")
    d.add([(DATA, 16)], 1, "b")
    d.kick_prepare()
    a, b = q.pop()
    assert d.enable_cb() is False       # used_event = 0: interrupt on the first used
    q.push(a.head, 1)
    assert q.publish() is True
    assert d.get_used() == [("a", 1)]
    q.push(b.head, 2)
    assert q.publish() is False         # the driver did not re-arm
    assert d.enable_cb() is True        # re-arming sees "b" already there
    assert d.get_used() == [("b", 2)]


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [0, 4])
def test_round_trip_across_the_index_wrap(mem, event_idx, indirect):
    """70,000 chains of 1-3 buffers through both sides: every token comes back once,
    with its length, as the 16-bit indexes wrap (more than once at queue size 8)."""
    d, q = driver_and_device(mem, size=8, event_idx=event_idx, indirect=indirect)
    sent = 0
    received = 0
    pending: dict[int, int] = {}
    while received < 70_000:
        while d.num_free >= 3 and sent - received < 6:
            n = 1 + sent % 3
            bufs = [(DATA + 64 * j, 8 + j) for j in range(n)]
            d.add(bufs, 1, sent, indirect=bool(indirect))
            pending[sent] = n
            sent += 1
        d.kick_prepare()
        chains = q.pop()
        for c in reversed(chains):      # complete in reverse order
            q.push(c.head, len(c.readable) + len(c.writable))
        q.publish()
        for token, length in d.get_used():
            assert length == pending.pop(token)
            received += 1
    assert d.last_used == received & 0xFFFF and q.used_idx == received & 0xFFFF


def test_driver_rejects_a_lying_device(mem):
    d, q = driver_and_device(mem)
    d.add([(DATA, 16)], 1, "a")
    d.kick_prepare()
    q.pop()
    q.push(5, 0)                        # descriptor 5 was never made available
    q.publish()
    with pytest.raises(DeviceError):
        d.get_used()
    d2, q2 = driver_and_device(mem)
    mem.write_u16(0x12002, 3)           # used idx 3 with one buffer outstanding
    with pytest.raises(DeviceError):
        d2.get_used()


def test_split_queue_checks_layout(mem):
    with pytest.raises(GuestError):
        SplitQueue(mem, 6, 0x10000, 0x11000, 0x12000)     # not a power of two
    with pytest.raises(GuestError):
        SplitQueue(mem, 8, 0x10008, 0x11000, 0x12000)     # descriptor table misaligned
    with pytest.raises(GuestError):
        SplitQueue(mem, 8, 0x10000, 0x11001, 0x12000)     # avail misaligned
    with pytest.raises(GuestError):
        SplitQueue(mem, 8, 0x10000, 0x11000, 0x12002)     # used misaligned
    with pytest.raises(GuestError):
        SplitQueue(mem, 256, (4 << 20) - 16, 0x11000, 0x12000)  # table beyond RAM


def test_lone_descriptor_cache_sees_every_change(mem):
    """The device remembers lone descriptors it has walked; a changed descriptor (even one
    byte) is walked and checked again, so a guest cannot smuggle a bad address past it."""
    r = RawRing(mem, 8)
    q = device(mem, r)
    r.set_desc(2, DATA, 64, WRITE)
    r.make_available(2)
    (c1,) = q.pop()
    q.push(2, 0)
    q.publish()
    r.make_available(2)
    (c2,) = q.pop()
    assert c2 is c1                                   # unchanged: served from the cache
    q.push(2, 0)
    q.publish()
    r.set_desc(2, DATA + 4096, 64, WRITE)             # moved
    r.make_available(2)
    (c3,) = q.pop()
    assert c3 is not c1 and bytes(c3.writable[0]) == mem.read(DATA + 4096, 64)
    q.push(2, 0)
    q.publish()
    r.set_desc(2, DATA + 4096, 64, 0)                 # same place, now device-readable
    r.make_available(2)
    (c4,) = q.pop()
    assert c4.readable and not c4.writable
    q.push(2, 0)
    q.publish()
    r.set_desc(2, 4 << 20, 64, 0)                     # now outside RAM
    r.make_available(2)
    with pytest.raises(GuestError):
        q.pop()


def test_pinned_chains_are_offered_again_unchanged(mem):
    d, q = driver_and_device(mem)
    h = d.add([(DATA, 100)], 0, "rx0", pin=True)
    d.kick_prepare()
    (c,) = q.pop()
    q.push(c.head, 10)
    q.publish()
    assert d.get_used() == [("rx0", 10)]
    before = bytes(mem.view(0x10000, 128))
    d.readd(h, "rx0-again")
    assert bytes(mem.view(0x10000, 128)) == before    # no descriptor written
    d.kick_prepare()
    (c2,) = q.pop()
    assert c2.head == c.head and len(c2.writable[0]) == 100
    with pytest.raises(ValueError):
        d.readd(h, "twice")                           # still in flight


def test_readd_many_is_readd_in_a_batch(mem):
    d, q = driver_and_device(mem)
    hs = [d.add([(0x20000 + 0x100 * i, 64)], 0, f"b{i}", pin=True) for i in range(3)]
    for lap in range(5):
        d.kick_prepare()
        chains = q.pop()
        assert [c.head for c in chains] == hs
        for c in chains:
            q.push(c.head, 4)
        q.publish()
        assert [t for t, _ in d.get_used()] == ([f"b{i}" for i in range(3)] if lap == 0
                                                 else [lap - 1] * 3)
        d.readd_many(hs, [lap] * 3)
    with pytest.raises(ValueError):
        d.readd_many(hs[:1], ["again"])
