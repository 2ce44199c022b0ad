"""venet and vblock through the bridge from an in-process guest: frames of every size over
flat, scatter-gather and PMTD descriptors, the device calls, the event queue, block
requests; and what each does with a guest that lies."""

import os
import time

import pytest

from alacrity.devices.block import BlockCore, FileBackend, NullBackend
from alacrity.devices.net import NetCore, open_backends
from alacrity.guest.drivers.vbus_bridge import VbusError, find_bridge
from alacrity.guest.drivers.vblock import VblockDriver, VblockError
from alacrity.guest.drivers.venet import VenetDriver
from alacrity.guest.local import LocalGuest
from alacrity.machine import Machine
from alacrity.vbus import abi
from tests.helpers import until
from alacrity.vbus import vblock as V
from alacrity.vbus import venet as E


@pytest.fixture
def net():
    m = Machine(32 << 20)
    (backend,) = open_backends("loopback")
    core = NetCore(backend)
    dev = E.Venet(core)
    bridge = m.add_vbus_bridge([dev])
    g = LocalGuest(m)
    yield m, bridge, dev, core, g
    m.close()
    backend.close()


def frame(n, fill=0xAB):
    return b"\x02" * 6 + b"\x02" * 6 + b"\x88\xb5" + bytes([fill]) * (n - 14)


def exchange(drv, frames):
    for f in frames:
        assert drv.send(f)
    drv.kick_tx()
    got = []
    while len(got) < len(frames):
        got += drv.recv()
        drv.kick_rx()
        if len(got) < len(frames):
            drv.wait(timeout=5)
    return got


@pytest.mark.parametrize("mode", ["flat", "sg", "pmtd"])
def test_loopback_frames_of_every_size(net, mode):
    _, bridge, dev, core, g = net
    drv = VenetDriver(find_bridge(g), sg=mode != "flat", pmtd=mode == "pmtd", queue_size=64)
    assert (drv.sg, drv.pmtd) == (mode != "flat", mode == "pmtd")
    sizes = list(range(18, 1515, 97)) + [1514]
    frames = [frame(n, i & 0xFF) for i, n in enumerate(sizes)]
    for _ in range(3):                                   # across the ring's wrap
        assert exchange(drv, frames) == frames
    assert core.counters.tx_malformed == 0 and not dev.broken
    assert drv.reclaim_tx() + len(drv.tx_free) >= 1


def test_device_calls(net):
    _, bridge, dev, core, g = net
    b = find_bridge(g)
    h = b.devopen(1, 1)

    def call(func, data=b"", out_len=0):
        return b.devcall(h, func, data, out_len=out_len)

    assert call(E.FUNC_MACQUERY, out_len=6) == (0, core.mac)
    assert call(E.FUNC_MACQUERY, out_len=8)[0] == -abi.EINVAL
    # NEGCAP answers the intersection: no segmentation offloads here
    r, out = call(E.FUNC_NEGCAP, E.CAPS.pack(E.CAP_GROUP_SG, E.CAP_SG | E.CAP_TSO4 | E.CAP_PMTD))
    assert r == 0 and E.CAPS.unpack(out) == (E.CAP_GROUP_SG, E.CAP_SG | E.CAP_PMTD)
    r, out = call(E.FUNC_NEGCAP, E.CAPS.pack(E.CAP_GROUP_EVENTQ, 0xFF))
    assert E.CAPS.unpack(out) == (E.CAP_GROUP_EVENTQ, E.CAP_EVQ_LINKSTATE | E.CAP_EVQ_TXC)
    r, out = call(E.FUNC_NEGCAP, E.CAPS.pack(E.CAP_GROUP_L4RO, 0xFF))
    assert E.CAPS.unpack(out) == (E.CAP_GROUP_L4RO, 0)
    assert call(E.FUNC_PMTDQUERY)[0] == E.PMTD_POOL_ID
    r, out = call(E.FUNC_EVQQUERY, out_len=32)
    assert r == 0 and E.EVQ_QUERY.unpack(out) == (0, 24, E.EVQ_DPOOL_ID, E.EVQ_QUEUE_ID)
    assert call(E.FUNC_EVQQUERY, E.EVQ_QUERY.pack(1, 0, 0, 0))[0] == -abi.EINVAL
    assert call(E.FUNC_LINKUP)[0] == -abi.EINVAL        # queues not registered yet
    assert call(E.FUNC_LINKDOWN)[0] == -abi.ENOENT
    assert call(E.FUNC_FLUSHRX)[0] == -abi.EINVAL
    assert call(42)[0] == -abi.EINVAL
    assert not dev.broken


def test_link_events_flushrx_and_tx_completions(net):
    _, bridge, dev, core, g = net
    drv = VenetDriver(find_bridge(g), sg=True, evq=True, queue_size=32)
    assert drv.linkstate and drv.txc and drv.link_up
    assert (E.EVENT_ID_LINKSTATE, 1) in drv.events
    frames = [frame(60, i) for i in range(5)]
    assert exchange(drv, frames) == frames
    until(lambda: (drv.take_events() or True) and
          sum(1 for e, _ in drv.events if e == E.EVENT_ID_TXC) >= 5)
    assert sorted(c for e, c in drv.events if e == E.EVENT_ID_TXC)[:5] == sorted(
        set(c for e, c in drv.events if e == E.EVENT_ID_TXC))[:5]
    # LINKUP twice, NEGCAP and EVQQUERY while up: refused
    assert drv.b.devcall(drv.devh, E.FUNC_LINKUP)[0] == -abi.EEXIST
    assert drv.b.devcall(drv.devh, E.FUNC_NEGCAP, E.CAPS.pack(0, 1))[0] == -abi.EINVAL
    # FLUSHRX hands every posted buffer back, empty
    drv.flush_rx()
    got = drv.rx_take()
    assert got and all(n == 0 for _, n in got)
    drv.rx_release(len(got))
    drv.link_down()
    assert not dev.link
    assert exchange_nothing(drv)


def exchange_nothing(drv):
    """With the link down the device takes nothing from tx."""
    drv.send(frame(60))
    drv.kick_tx()
    time.sleep(0.05)
    return drv.txq.used(1) == 1


def test_rx_frame_larger_than_the_buffer_is_dropped_and_counted(net):
    _, bridge, dev, core, g = net
    drv = VenetDriver(find_bridge(g), queue_size=16)
    drv.rxq.set_desc(drv.rxq.tail(1), length=64)         # a lying, short buffer
    big = frame(200)
    assert drv.send(big)
    drv.kick_tx()
    until(lambda: core.counters.rx_too_big == 1)
    assert exchange(drv, [frame(60)]) == [frame(60)]     # the short buffer takes a short one
    assert exchange(drv, [frame(100)]) == [frame(100)]   # and the next buffer a longer one
    assert not dev.broken


# -- hostile tx descriptors ---------------------------------------------------------------
def post_raw(drv, ptr, length):
    drv.txq.post([(0, ptr, length)])
    drv.kick_tx()


def test_flat_frame_outside_ram_breaks_the_device_not_the_host(net):
    m, bridge, dev, core, g = net
    drv = VenetDriver(find_bridge(g), queue_size=16)
    post_raw(drv, (32 << 20) - 10, 60)                   # runs past the end of RAM
    until(lambda: dev.broken)
    assert "not inside guest RAM" in bridge.last_error
    # reopened by a new driver, it works again
    drv2 = VenetDriver(find_bridge(g), queue_size=16)
    assert exchange(drv2, [frame(64)]) == [frame(64)]


def test_flat_frames_of_bad_length_are_dropped(net):
    _, bridge, dev, core, g = net
    drv = VenetDriver(find_bridge(g), queue_size=16)
    post_raw(drv, drv.tx_addr[0], 0)
    post_raw(drv, drv.tx_addr[0], 1 << 20)
    until(lambda: core.counters.tx_malformed == 2)
    assert not dev.broken


@pytest.mark.parametrize("case", ["count-overflows", "count-zero", "count-huge", "len-lies",
                                  "iov-outside-ram", "gso"])
def test_bad_sg_descriptors(net, case):
    _, bridge, dev, core, g = net
    drv = VenetDriver(find_bridge(g), sg=True, queue_size=16)
    sgv = drv.sg_view[0]
    data = drv.tx_addr[0]
    count, total, flags, ptr, length = 1, 60, 0, data, E.sg_size(1)
    if case == "count-overflows":
        count = 3                                        # descriptor only holds one iov
    elif case == "count-zero":
        count = 0
    elif case == "count-huge":
        count = 0xFFFFFFFF
    elif case == "len-lies":
        total = 61
    elif case == "iov-outside-ram":
        ptr = (1 << 64) - 16                             # wraps the address space
    elif case == "gso":
        flags = E.SG_FLAG_GSO
    E.SG.pack_into(sgv, 0, 0, flags, total, 0, 0, 0, 0, 0, count)
    E.IOV.pack_into(sgv, E.SG.size, 60, ptr)
    post_raw(drv, drv.sg_ptr[0], length)
    if case == "iov-outside-ram":
        until(lambda: dev.broken)
        assert "wraps" in bridge.last_error
    else:
        until(lambda: core.counters.tx_malformed == 1)
        assert not dev.broken


def test_pmtd_offsets_outside_the_pool_are_dropped(net):
    _, bridge, dev, core, g = net
    drv = VenetDriver(find_bridge(g), sg=True, pmtd=True, queue_size=16, tx_slots=4)
    pool_len = 4 * E.sg_size(1)
    post_raw(drv, pool_len - 8, E.sg_size(1))            # straddles the pool's end
    post_raw(drv, (1 << 64) - 8, E.sg_size(1))           # would wrap
    until(lambda: core.counters.tx_malformed == 2)
    assert not dev.broken
    assert exchange(drv, [frame(80)]) == [frame(80)]


def test_pmtd_descriptor_changed_after_posting_cannot_escape_the_check(net):
    """The host copies a PMTD descriptor before it checks it. The guest rewrites the
    descriptor (an iov pointing outside RAM, a longer length) at the worst moment: right
    after the copy, while the host validates and gathers. The frame that goes out is the
    one that was checked, and nothing outside RAM is touched."""
    m, bridge, dev, core, g = net
    drv = VenetDriver(find_bridge(g), sg=True, pmtd=True, queue_size=16, tx_slots=4)
    f = frame(100, 0x5A)
    drv.tx_view[0][:100] = f
    drv.stage(0, 100)
    sg_addr = None
    real_view = m.mem.view

    def racing_view(addr, length):
        v = real_view(addr, length)
        nonlocal sg_addr
        if dev.pmtd_pool and addr == dev.pmtd_pool[0] and length == E.sg_size(1):
            sg_addr = addr
            return v                                     # the host copies this now
        if sg_addr is not None:
            # the copy is made; the guest now rewrites the descriptor in the pool
            E.SG.pack_into(real_view(sg_addr, 32), 0, 0, 0, 4000, 0, 0, 0, 0, 0, 1)
            E.IOV.pack_into(real_view(sg_addr + 32, 16), 0, 4000, (1 << 40))
        return v

    m.mem.view = racing_view
    try:
        drv.kick_tx()
        until(lambda: core.counters.tx_frames >= 1)
    finally:
        del m.mem.view
    assert sg_addr is not None                           # the race really ran
    got = []
    until(lambda: got.extend(drv.recv()) or got)
    assert got == [f] and not dev.broken and core.counters.tx_malformed == 0


# -- vblock ----------------------------------------------------------------------------------
@pytest.fixture
def disk(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    m = Machine(16 << 20)
    backend = FileBackend(str(img))
    dev = V.Vblock(BlockCore(backend))
    bridge = m.add_vbus_bridge([dev])
    g = LocalGuest(m)
    drv = VblockDriver(find_bridge(g), depth=4, max_bytes=8192)
    yield m, bridge, dev, drv, img
    m.close()
    backend.close()


def test_vblock_reads_writes_flushes(disk, monkeypatch):
    m, bridge, dev, drv, img = disk
    data = img.read_bytes()
    assert drv.capacity == 2048 and drv.blk_size == 512 and not drv.read_only
    assert drv.read(16, 8192) == data[16 * 512:16 * 512 + 8192]
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    drv.write(3, b"\x11" * 1024)
    assert not syncs
    drv.flush()
    assert len(syncs) == 1                               # flush means fdatasync
    assert img.read_bytes()[3 * 512:5 * 512] == b"\x11" * 1024
    assert drv.get_id() == b"alacrity"


def test_vblock_requests_in_flight_complete_in_order(disk):
    m, bridge, dev, drv, img = disk
    data = img.read_bytes()
    for lap in range(40):                                # 160 requests over a 256 ring... and
        for slot in range(4):                            # then some: 4 laps of 40
            drv.submit(slot, V.T_IN, lap * 4 + slot, 512)
        drv.kick()
        done = []
        while len(done) < 4:
            drv.wait()
            done += drv.reap()
        assert [s for s, _ in done] == [0, 1, 2, 3] and all(st == 0 for _, st in done)
        for slot in range(4):
            sector = lap * 4 + slot
            assert bytes(drv.data_v[slot][:512]) == data[sector * 512:(sector + 1) * 512]


def raw_request(drv, rtype, sector, iovs, *, count=None, length=None, slot=0):
    """A request written by hand: header, iovs, and a descriptor that says `length`."""
    m = drv.b.m
    addr = m.alloc.alloc(64 + 16 * len(iovs), 64)
    v = m.mem.view(addr, 24 + 16 * len(iovs))
    V.REQ.pack_into(v, 0, rtype, 0xFF, sector, len(iovs) if count is None else count)
    for i, (n, p) in enumerate(iovs):
        V.IOV.pack_into(v, 24 + 16 * i, n, p)
    drv.q.post([(slot, addr, V.request_size(len(iovs)) if length is None else length)])
    drv.q.signal.inject()
    while True:
        drv.wait()
        done = drv.reap()
        if done:
            return v[4]


@pytest.mark.parametrize("case,expect", [
    ("length-not-a-request", V.S_IOERR),
    ("count-disagrees", V.S_IOERR),
    ("iov-outside-ram", V.S_IOERR),
    ("iov-wraps", V.S_IOERR),
    ("odd-size", V.S_IOERR),
    ("past-the-end", V.S_IOERR),
    ("too-many-segments", V.S_IOERR),
    ("unknown-type", V.S_UNSUPP),
])
def test_vblock_malformed_requests_complete_with_an_error(disk, case, expect):
    m, bridge, dev, drv, img = disk
    before = img.read_bytes()
    buf = drv.data[0]
    kw = {}
    rtype, sector, iovs = V.T_OUT, 0, [(512, buf)]
    if case == "length-not-a-request":
        kw["length"] = 30
    elif case == "count-disagrees":
        kw["count"] = 2
    elif case == "iov-outside-ram":
        iovs = [(512, (16 << 20) - 256)]
    elif case == "iov-wraps":
        iovs = [(512, (1 << 64) - 256)]
    elif case == "odd-size":
        iovs = [(100, buf)]
    elif case == "past-the-end":
        sector = 2047
        iovs = [(1024, buf)]
    elif case == "too-many-segments":
        iovs = [(512, buf)] * (V.MAX_SEGMENTS + 1)
    elif case == "unknown-type":
        rtype = 77
    assert raw_request(drv, rtype, sector, iovs, **kw) == expect
    assert img.read_bytes() == before and not dev.broken
    assert drv.read(0, 512) == before[:512]             # and it keeps working


def test_vblock_request_outside_ram_breaks_the_device(disk):
    m, bridge, dev, drv, img = disk
    drv.q.post([(0, (16 << 20) - 8, 24)])
    drv.q.signal.inject()
    until(lambda: dev.broken)
    assert bridge.last_error
    b = find_bridge(LocalGuest(m))                       # a new driver instance recovers it
    assert VblockDriver(b).read(0, 512) == img.read_bytes()[:512]


def test_vblock_read_only():
    m = Machine(16 << 20)
    try:
        dev = V.Vblock(BlockCore(NullBackend(1 << 20, read_only=True)))
        m.add_vbus_bridge([dev])
        drv = VblockDriver(find_bridge(LocalGuest(m)))
        assert drv.read_only
        with pytest.raises(VblockError) as e:
            drv.write(0, bytes(512))
        assert e.value.status == V.S_IOERR
        assert drv.read(0, 512) == bytes(512)
    finally:
        m.close()


def test_vblock_query_misuse(disk):
    m, bridge, dev, drv, img = disk
    assert drv.b.devcall(drv.devh, V.FUNC_QUERY, out_len=16)[0] == -abi.EINVAL
    assert drv.b.devcall(drv.devh, 3)[0] == -abi.EINVAL
    with pytest.raises(VbusError):
        drv.b.devshm(drv.devh, V.QUEUE_ID, drv.data[0], 4096)      # no signal


def test_vblock_ring_index_beyond_count_breaks_the_device(disk):
    m, bridge, dev, drv, img = disk
    drv.submit(0, V.T_IN, 0, 512)
    drv._staged.clear()
    ring = drv.q.addr
    m.mem.view(ring + 36, 4)[:] = (5000).to_bytes(4, "little")   # inuse head >= count
    drv.q.signal.inject()
    until(lambda: dev.broken)
    assert "inuse head is 5000" in bridge.last_error     # south's own index: any change is caught
    assert VblockDriver(find_bridge(LocalGuest(m))).read(0, 512) == img.read_bytes()[:512]
