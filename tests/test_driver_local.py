"""The guest-side drivers in process (LocalGuest): the virtio-mmio init sequence and the
virtio-blk driver's requests against a host machine, and how a driver notices a device
that needs a reset."""

import os

import pytest

from alacrity.devices.block import BlockCore, FileBackend
from alacrity.errors import DeviceError
from alacrity.guest.drivers.virtio_blk import BlkError, VirtioBlkDriver
from alacrity.guest.local import LocalGuest
from alacrity.guest.programs import find_device
from alacrity.machine import Machine
from alacrity.virtio import spec
from alacrity.virtio.blk import VirtioBlk


@pytest.fixture
def setup(tmp_path):
    img = tmp_path / "disk"
    img.write_bytes(os.urandom(1 << 20))
    m = Machine(16 << 20)
    backend = FileBackend(str(img))
    dev = m.add_virtio_mmio(VirtioBlk(BlockCore(backend, serial="local")))
    g = LocalGuest(m)
    yield m, dev, g, img
    m.close()
    backend.close()


def test_init_sequence_and_requests(setup):
    m, dev, g, img = setup
    t = find_device(g, spec.ID_BLOCK)
    drv = VirtioBlkDriver(t, depth=4, max_bytes=8192, event_idx=True)
    assert t.device_status() == (spec.ACKNOWLEDGE | spec.DRIVER | spec.FEATURES_OK | spec.DRIVER_OK)
    assert t.has(spec.F_EVENT_IDX) and t.has(spec.F_VERSION_1)
    assert drv.capacity == 2048 and drv.blk_size == 512 and not drv.read_only
    assert drv.get_id() == b"local"
    assert drv.read(100, 4096) == img.read_bytes()[100 * 512:100 * 512 + 4096]
    data = os.urandom(8192)
    drv.write(7, data)
    drv.flush()
    assert img.read_bytes()[7 * 512:7 * 512 + 8192] == data
    drv.discard(7, 16, zeroes=True)
    assert img.read_bytes()[7 * 512:7 * 512 + 8192] == bytes(8192)
    with pytest.raises(BlkError):
        drv.read(2048, 512)                       # beyond capacity: IOERR reaches the driver
    assert t.stats[0].doorbells > 0 and dev.stats[0].doorbells == t.stats[0].doorbells
    assert dev.stats[0].requests == 6


def test_driver_sees_needs_reset(setup):
    m, dev, g, _ = setup
    t = find_device(g, spec.ID_BLOCK)
    drv = VirtioBlkDriver(t, depth=1, event_idx=False)
    g.mem.write_u16(drv.q.addrs[1] + 2, 500)     # a corrupt available index (size is 256)
    t.notify(0)
    with pytest.raises(DeviceError, match="needs reset"):
        drv.wait(timeout=5)
        t.ack_interrupt()
    assert dev.broken
    # the driver resets and starts again
    drv2 = VirtioBlkDriver(t, depth=1)
    assert len(drv2.read(0, 512)) == 512


def test_driver_stops_when_features_are_refused(setup, monkeypatch):
    m, dev, g, _ = setup
    t = find_device(g, spec.ID_BLOCK)
    monkeypatch.setattr(dev.model, "accept_features", lambda f: False)
    with pytest.raises(DeviceError, match="refused"):
        VirtioBlkDriver(t, depth=1)
    assert t.device_status() & spec.FAILED


def test_notify_through_an_exit_when_no_doorbell_is_registered(setup):
    m, dev, g, _ = setup
    t = find_device(g, spec.ID_BLOCK)
    drv = VirtioBlkDriver(t, depth=1)
    t._notify_fd[0] = None                        # as if the guest knew no ioeventfd
    exits = g.exits
    assert len(drv.read(0, 512)) == 512
    assert g.exits > exits                        # the QueueNotify write exited...
    assert dev.stats[0].doorbells >= 1            # ...and the bus turned it into the doorbell
