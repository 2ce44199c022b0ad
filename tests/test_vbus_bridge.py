"""The vbus bridge through its real windows (bridgecall MMIO, doorbell PIO, eventfds) from
an in-process guest: negotiation, the event queue, hypercalls by SLOWCALL and fastcall,
and every kind of bad request a guest can make. The host keeps running through all of it."""

import os

import pytest

from alacrity.bus import Space
from alacrity.devices.block import BlockCore, NullBackend
from alacrity.guest.drivers.vbus_bridge import VbusBridgeDriver, VbusError, find_bridge
from alacrity.guest.drivers.vblock import VblockDriver
from alacrity.guest.local import LocalGuest
from alacrity.machine import VBUS_MMIO_BASE, VBUS_PIO_BASE, Machine
from alacrity.vbus import abi
from tests.helpers import until
from alacrity.vbus import vblock as V
from alacrity.vbus.ioq import Ioq, init_ring, ring_size
from alacrity.vbus.shm_signal import NORTH

E = abi


@pytest.fixture
def vm():
    m = Machine(16 << 20)
    disk = V.Vblock(BlockCore(NullBackend(1 << 20)))
    bridge = m.add_vbus_bridge([disk, V.Vblock(BlockCore(NullBackend(1 << 20)))])
    g = LocalGuest(m)
    yield m, bridge, disk, g
    m.close()


def raw_call(g, vector, length, datap):
    g.write(Space.MMIO, VBUS_MMIO_BASE, 8, vector | length << 32)
    g.write(Space.MMIO, VBUS_MMIO_BASE + 8, 8, datap)
    return abi.as_int(g.read(Space.MMIO, VBUS_MMIO_BASE, 4))


def scratch(g, data):
    addr = g.alloc.alloc(max(len(data), 64), 64)
    g.mem.view(addr, len(data))[:] = data
    return addr


def test_the_bridge_is_announced_with_its_windows(vm):
    m, bridge, _, g = vm
    d = [d for d in g.devices if d["kind"] == "vbus-bridge"][0]
    assert (d["base"], d["size"], d["pio"], d["pio_size"], d["abi_version"]) == (
        VBUS_MMIO_BASE, 64, VBUS_PIO_BASE, 32, 2)
    b = find_bridge(g)
    assert b.devices == {1: "virtual-block", 2: "virtual-block"}
    # DEVADDs came as events and were counted as one bus interrupt at most
    assert bridge.irq_stats.interrupts <= 1


def test_negotiate_checks_magic_version_and_length(vm):
    _, bridge, _, g = vm
    bad_magic = scratch(g, abi.NEGOTIATE_S.pack(0x12345678, abi.HC_VERSION, 0))
    assert raw_call(g, abi.NEGOTIATE, 16, bad_magic) == -E.EINVAL
    bad_version = scratch(g, abi.NEGOTIATE_S.pack(abi.BRIDGE_MAGIC, 7, 0))
    assert raw_call(g, abi.NEGOTIATE, 16, bad_version) == -E.EINVAL
    good = scratch(g, abi.NEGOTIATE_S.pack(abi.BRIDGE_MAGIC, abi.HC_VERSION, 0))
    assert raw_call(g, abi.NEGOTIATE, 12, good) == -E.EINVAL          # wrong length
    assert raw_call(g, abi.NEGOTIATE, 16, 1 << 40) == -E.EFAULT        # not guest RAM
    assert raw_call(g, abi.QREG, 32, good) == -E.EPERM                 # before NEGOTIATE
    assert raw_call(g, abi.NEGOTIATE, 16, good) == 0
    assert raw_call(g, 99, 0, 0) == -E.EINVAL                          # unknown vector
    assert not bridge.broken


def test_qreg_checks_the_event_queue(vm):
    _, bridge, _, g = vm
    good = scratch(g, abi.NEGOTIATE_S.pack(abi.BRIDGE_MAGIC, abi.HC_VERSION, 0))
    assert raw_call(g, abi.NEGOTIATE, 16, good) == 0
    ring = g.alloc.alloc(ring_size(8), 64)
    pool = g.alloc.alloc(8 * 144, 64)
    init_ring(g.mem, ring, 8)

    def qreg(count, qcount, ring_addr, pool_addr, length=None):
        data = abi.BUSREG_HDR.pack(count) + abi.EVENTQREG.pack(qcount, ring_addr, pool_addr)
        return raw_call(g, abi.QREG, length or len(data), scratch(g, data))

    assert qreg(2, 8, ring, pool, length=8 + 48) == -E.EINVAL          # two queues
    assert qreg(1, 8, ring, pool, length=20) == -E.EINVAL              # short
    assert qreg(1, 16, ring, pool) == -E.EINVAL                        # count differs
    assert qreg(1, 8, ring, (16 << 20) - 512) == -E.EFAULT             # pool past RAM
    assert qreg(1, 8, 1 << 40, pool) == -E.EFAULT                      # ring not RAM
    g.mem.view(ring, 1)[0] ^= 0xFF
    assert qreg(1, 8, ring, pool) == -E.EINVAL                         # bad magic
    init_ring(g.mem, ring, 8)
    assert qreg(1, 8, ring, pool) == 0
    assert qreg(1, 8, ring, pool) == -E.EEXIST
    assert not bridge.broken


def test_hypercalls_refuse_devices_and_handles_that_do_not_exist(vm):
    _, bridge, disk, g = vm
    b = VbusBridgeDriver(g, g.devices[0])
    with pytest.raises(VbusError) as e:
        b.devopen(7, 1)
    assert e.value.errno == E.ENODEV
    with pytest.raises(VbusError) as e:
        b.devopen(1, 2)                                                 # wrong version
    assert e.value.errno == E.EINVAL
    h = b.devopen(1, 1)
    with pytest.raises(VbusError) as e:
        b.devopen(1, 1)
    assert e.value.errno == E.EBUSY
    assert b.devcall(h + 40, 0, out_len=24)[0] == -E.ENOENT
    assert b.devcall(h, 9)[0] == -E.EINVAL                              # no such call
    assert b.devcall(h, V.FUNC_QUERY, out_len=8)[0] == -E.EINVAL        # wrong length
    with pytest.raises(VbusError) as e:
        b.devclose(h + 40)
    assert e.value.errno == E.ENOENT
    with pytest.raises(VbusError) as e:
        b.devshm(h + 40, 0, b.scratch, 64)
    assert e.value.errno == E.ENOENT
    assert b.hypercall(17, b"") == -E.EINVAL                            # unknown hypercall
    # a hypercall block outside RAM
    assert b.hypercall(abi.DEVCALL, abi.DEVCALL_S.pack(h, 0, 24, 0, 1 << 45)) == -E.EFAULT
    assert not bridge.broken and not disk.broken


def test_devshm_checks_regions_signals_and_handle_space(vm):
    m, bridge, _, g = vm
    b = VbusBridgeDriver(g, g.devices[0])
    h = b.devopen(1, 1)
    ring = g.alloc.alloc(ring_size(8), 64)
    init_ring(g.mem, ring, 8)
    q = Ioq(g.mem, ring, NORTH)
    with pytest.raises(VbusError) as e:                                 # region past RAM
        b.devshm(h, 0, (16 << 20) - 64, ring_size(8), signal=q.signal)
    assert e.value.errno == E.EFAULT
    with pytest.raises(VbusError) as e:                                 # signal past region
        b.devshm(h, 0, ring, ring_size(8), signal=q.signal, signal_offset=ring_size(8) - 8)
    assert e.value.errno == E.EINVAL
    with pytest.raises(VbusError) as e:                                 # no such shm id
        b.devshm(h, 5, ring, ring_size(8), signal=q.signal)
    assert e.value.errno == E.EINVAL
    with pytest.raises(VbusError) as e:                                 # region too small
        b.devshm(h, 0, ring, ring_size(8) - 32, signal=q.signal)
    assert e.value.errno == E.EINVAL
    handle = b.devshm(h, 0, ring, ring_size(8), signal=q.signal)
    assert 1 <= handle <= 32
    with pytest.raises(VbusError) as e:
        b.devshm(h, 0, ring, ring_size(8), signal=q.signal)
    assert e.value.errno == E.EEXIST
    # the failed attempts gave their handles back
    assert len(bridge.free_handles) == 31


def test_handles_run_out_cleanly(vm):
    _, bridge, _, g = vm
    bridge.free_handles[:] = []
    b = VbusBridgeDriver(g, g.devices[0])
    h = b.devopen(1, 1)
    ring = g.alloc.alloc(ring_size(8), 64)
    init_ring(g.mem, ring, 8)
    with pytest.raises(VbusError) as e:
        b.devshm(h, 0, ring, ring_size(8), signal=Ioq(g.mem, ring, NORTH).signal)
    assert e.value.errno == E.ENOSPC


def test_slowcall_and_fastcall_reach_the_same_hypercalls(vm):
    _, bridge, _, g = vm
    slow = VbusBridgeDriver(g, g.devices[0], fastcall=False)
    exits = g.exits
    h = slow.devopen(1, 1)
    assert g.exits - exits == 3                     # descriptor (2 writes) + the read
    slow.devclose(h)
    fast = VbusBridgeDriver(g, g.devices[0])
    exits = g.exits
    h = fast.devopen(1, 1)
    assert g.exits - exits == 1                     # one PIO write
    r, out = fast.devcall(h, V.FUNC_QUERY, out_len=24)
    assert r == 0 and V.QUERY.unpack(out)[:2] == (2048, 512)


def test_fastcall_misuse(vm):
    _, bridge, _, g = vm
    b = VbusBridgeDriver(g, g.devices[0], fastcall=False)
    g.write(Space.PIO, VBUS_PIO_BASE + abi.SIG_FASTCALL, 4, 3)         # cpu 3: no descriptor
    assert bridge.bad_doorbells == 1
    assert b.bridgecall(abi.FASTCALL_ADD, abi.CALL_DESC.pack(0, 24, 1 << 44)) == -E.EFAULT
    assert b.bridgecall(abi.FASTCALL_ADD, abi.CALL_DESC.pack(0, 16, b.scratch)) == -E.EINVAL
    assert b.bridgecall(abi.FASTCALL_DROP, abi.CALL_DESC.pack(5, 0, 0)) == -E.ENOENT
    assert b.bridgecall(abi.FASTCALL_ADD, abi.CALL_DESC.pack(0, 24, b.scratch + 1024)) == 0
    assert b.bridgecall(abi.FASTCALL_DROP, abi.CALL_DESC.pack(0, 0, 0)) == 0
    assert not bridge.broken


def test_doorbells_for_handles_that_do_not_exist_are_counted_and_ignored(vm):
    m, bridge, disk, g = vm
    b = VbusBridgeDriver(g, g.devices[0])
    fd = g.doorbell_fd(Space.PIO, VBUS_PIO_BASE + abi.SIG_SHMSIGNAL, 4, 17)
    os.eventfd_write(fd, 1)                                             # eventfd, handle 17
    g.write(Space.PIO, VBUS_PIO_BASE + abi.SIG_SHMSIGNAL, 4, 999)       # exit, handle 999
    until(lambda: bridge.bad_doorbells == 2)
    assert not bridge.broken
    d = VblockDriver(b)                                                 # still fully usable
    assert d.read(0, 512) == bytes(512)


def test_close_sends_shmclose_and_frees_the_handle(vm):
    _, bridge, _, g = vm
    b = VbusBridgeDriver(g, g.devices[0])
    d = VblockDriver(b)
    cookie = next(iter(b.signals))
    handle = d.handle
    d.close()
    until(lambda: b.service() or cookie in b.closed)
    assert cookie not in b.signals and handle not in bridge.shms
    doorbells = bridge.bad_doorbells
    g.write(Space.PIO, VBUS_PIO_BASE + abi.SIG_SHMSIGNAL, 4, handle)
    until(lambda: bridge.bad_doorbells == doorbells + 1)
    d2 = VblockDriver(b)                                                # reopen works
    assert d2.read(8, 4096) == bytes(4096)


def test_events_wait_for_room_in_a_small_event_queue(vm):
    """More signals than event slots: the host keeps the rest, asks (by enabling its side of
    the event queue's signal) to hear when the guest took some, and then delivers them."""
    _, bridge, _, g = vm
    b = VbusBridgeDriver(g, g.devices[0], eventq_size=2)
    assert sorted(b.devices) == [1, 2]                  # two DEVADDs, two slots
    for devid in (1, 2):
        d = VblockDriver(b, devid, depth=1)
        assert d.read(0, 512) == bytes(512)
    assert not bridge.broken and not bridge.pending


def test_an_event_slot_outside_ram_breaks_the_bus_not_the_host(vm):
    m, bridge, _, g = vm
    b = VbusBridgeDriver(g, g.devices[0])
    # the guest rewrites the pointer of a posted event slot
    q = b.eventq
    pos = q.tail(1)
    q.set_desc(pos, ptr=(1 << 50))
    d = VblockDriver(b)
    d.submit(0, V.T_IN, 0, 512)
    d.q.signal.enable()
    d.kick()
    until(lambda: bridge.broken)
    assert "event" in bridge.last_error
    # every call now fails cleanly; a reset brings the bus back
    assert b.devcall(1, V.FUNC_QUERY, out_len=24)[0] == -E.EINVAL
    m.reset()
    b2 = VbusBridgeDriver(g, g.devices[0])
    assert VblockDriver(b2).read(0, 512) == bytes(512)
