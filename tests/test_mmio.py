"""virtio-mmio version 2: registers, the status/feature handshake, queue setup, reset, and
what a rule-breaking driver gets (DEVICE_NEEDS_RESET and a config-change interrupt)."""

import os

import pytest

from alacrity.bus import IrqLine
from alacrity.devices.block import BlockCore, NullBackend
from alacrity.memory import GuestMemory
from alacrity.virtio import mmio as R
from alacrity.virtio import spec
from alacrity.virtio.blk import F_FLUSH, F_RO, VirtioBlk
from alacrity.virtio.mmio import VirtioMmioDevice

from tests.helpers import mmio_bring_up

V1 = spec.bit(spec.F_VERSION_1)
RING = (8, 0x10000, 0x11000, 0x12000)


@pytest.fixture
def env():
    mem = GuestMemory.create([(0, 1 << 20)])
    irq = IrqLine(5)
    dev = VirtioMmioDevice(VirtioBlk(BlockCore(NullBackend(1 << 20)), queue_max=64), mem, irq)
    yield dev, mem, irq
    irq.close()
    mem.close()


def irq_count(irq):
    try:
        return os.eventfd_read(irq.fd)
    except BlockingIOError:
        return 0


def needs_reset(dev, irq):
    return bool(dev.read(R.R_STATUS, 4) & spec.DEVICE_NEEDS_RESET) and \
        bool(dev.read(R.R_INTERRUPT_STATUS, 4) & R.INT_CONFIG) and irq_count(irq) > 0


def test_identity(env):
    dev, _, _ = env
    assert dev.read(R.R_MAGIC, 4) == 0x74726976
    assert dev.read(R.R_VERSION, 4) == 2
    assert dev.read(R.R_DEVICE_ID, 4) == spec.ID_BLOCK
    assert dev.read(R.R_VENDOR_ID, 4) == spec.VENDOR_ID


def test_feature_words(env):
    dev, _, _ = env
    dev.write(R.R_DEVICE_FEATURES_SEL, 4, 0)
    lo = dev.read(R.R_DEVICE_FEATURES, 4)
    dev.write(R.R_DEVICE_FEATURES_SEL, 4, 1)
    hi = dev.read(R.R_DEVICE_FEATURES, 4)
    dev.write(R.R_DEVICE_FEATURES_SEL, 4, 2)
    assert dev.read(R.R_DEVICE_FEATURES, 4) == 0
    offered = lo | hi << 32
    assert offered & V1 and offered & spec.bit(F_FLUSH) and offered & spec.bit(spec.F_EVENT_IDX)
    assert not offered & spec.bit(F_RO)


def handshake(dev, features):
    dev.write(R.R_STATUS, 4, spec.ACKNOWLEDGE | spec.DRIVER)
    for sel in (0, 1):
        dev.write(R.R_DRIVER_FEATURES_SEL, 4, sel)
        dev.write(R.R_DRIVER_FEATURES, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
    dev.write(R.R_STATUS, 4, spec.ACKNOWLEDGE | spec.DRIVER | spec.FEATURES_OK)
    return bool(dev.read(R.R_STATUS, 4) & spec.FEATURES_OK)


@pytest.mark.parametrize("features,ok", [
    (V1, True),
    (V1 | spec.bit(F_FLUSH) | spec.bit(spec.F_EVENT_IDX), True),
    (0, False),                                  # no VERSION_1: a legacy driver
    (V1 | spec.bit(F_RO), False),                # RO is not offered for a writable disk
    (V1 | spec.bit(spec.F_RING_PACKED), True),
    (V1 | spec.bit(spec.F_IN_ORDER), False),     # not offered
    (V1 | spec.bit(50), False),
])
def test_features_ok_handshake(env, features, ok):
    dev, _, _ = env
    assert handshake(dev, features) is ok
    if ok:
        assert dev.negotiated == features
    assert not dev.broken          # refusal is not a rule break


def test_features_after_features_ok_need_reset(env):
    dev, _, irq = env
    assert handshake(dev, V1)
    dev.write(R.R_DRIVER_FEATURES, 4, 0)
    assert needs_reset(dev, irq)


def test_queue_setup_and_read_back(env):
    dev, _, _ = env
    mmio_bring_up(dev, V1, [RING])
    dev.write(R.R_QUEUE_SEL, 4, 0)
    assert dev.read(R.R_QUEUE_READY, 4) == 1
    assert dev.read(R.R_QUEUE_NUM, 4) == 8
    assert dev.read(R.R_QUEUE_DESC_LOW, 4) == 0x10000 and dev.read(R.R_QUEUE_DESC_HIGH, 4) == 0
    assert dev.read(R.R_QUEUE_NUM_MAX, 4) == 64
    dev.write(R.R_QUEUE_SEL, 4, 1)
    assert dev.read(R.R_QUEUE_NUM_MAX, 4) == 0      # no such queue


@pytest.mark.parametrize("bad", ["too-big", "not-pow2", "zero", "outside-ram", "misaligned",
                                 "high-bits", "before-features-ok", "reprogram-ready",
                                 "no-such-queue", "ready-value"])
def test_bad_queue_setup_needs_reset(env, bad):
    dev, _, irq = env
    size, desc, avail, used = RING
    if bad == "before-features-ok":
        dev.write(R.R_STATUS, 4, spec.ACKNOWLEDGE | spec.DRIVER)
    else:
        assert handshake(dev, V1)
    if bad == "too-big":
        size = 128
    elif bad == "not-pow2":
        size = 12
    elif bad == "zero":
        size = 0
    elif bad == "outside-ram":
        used = 0xFFFF0
    elif bad == "misaligned":
        desc = 0x10008
    elif bad == "high-bits":
        desc = 0x1_0001_0000
    dev.write(R.R_QUEUE_SEL, 4, 5 if bad == "no-such-queue" else 0)
    if bad != "no-such-queue":
        dev.write(R.R_QUEUE_NUM, 4, size)
        for reg, addr in ((R.R_QUEUE_DESC_LOW, desc), (R.R_QUEUE_DRIVER_LOW, avail),
                          (R.R_QUEUE_DEVICE_LOW, used)):
            dev.write(reg, 4, addr & 0xFFFFFFFF)
            dev.write(reg + 4, 4, addr >> 32)
    dev.write(R.R_QUEUE_READY, 4, 2 if bad == "ready-value" else 1)
    if bad == "reprogram-ready":
        dev.write(R.R_QUEUE_NUM, 4, 4)
    assert needs_reset(dev, irq), dev.last_error


@pytest.mark.parametrize("bad", ["narrow-register-read", "narrow-register-write",
                                 "unaligned-register", "clear-status-bit",
                                 "driver-ok-without-features-ok", "write-read-only-register",
                                 "notify-no-such-queue", "status-high-bits"])
def test_rule_breaks_need_reset_and_host_survives(env, bad):
    dev, _, irq = env
    if bad == "narrow-register-read":
        dev.read(R.R_STATUS, 2)
    elif bad == "narrow-register-write":
        dev.write(R.R_STATUS, 1, 1)
    elif bad == "unaligned-register":
        dev.read(R.R_STATUS + 2, 4)
    elif bad == "clear-status-bit":
        dev.write(R.R_STATUS, 4, spec.ACKNOWLEDGE | spec.DRIVER)
        dev.write(R.R_STATUS, 4, spec.ACKNOWLEDGE)
    elif bad == "driver-ok-without-features-ok":
        dev.write(R.R_STATUS, 4, spec.ACKNOWLEDGE | spec.DRIVER | spec.DRIVER_OK)
    elif bad == "write-read-only-register":
        dev.write(R.R_MAGIC, 4, 1)
    elif bad == "notify-no-such-queue":
        mmio_bring_up(dev, V1, [RING])
        dev.write(R.R_QUEUE_NOTIFY, 4, 7)
    elif bad == "status-high-bits":
        dev.write(R.R_STATUS, 4, 0x101)
    assert needs_reset(dev, irq), bad
    # NEEDS_RESET sticks until the driver resets; a reset brings the device back
    dev.write(R.R_STATUS, 4, spec.ACKNOWLEDGE)
    assert dev.read(R.R_STATUS, 4) & spec.DEVICE_NEEDS_RESET
    dev.write(R.R_STATUS, 4, 0)
    assert dev.read(R.R_STATUS, 4) == 0 and not dev.broken
    mmio_bring_up(dev, V1, [RING])
    assert dev.read(R.R_STATUS, 4) & spec.DRIVER_OK


def test_interrupt_status_and_ack(env):
    dev, mem, irq = env
    mmio_bring_up(dev, V1, [RING])
    # one request: header (IN) + 512 bytes + status
    from tests.helpers import NEXT, WRITE, RawRing
    r = RawRing(mem, 8, base=0x10000)
    r.avail, r.used = 0x11000, 0x12000
    mem.write(0x20000, bytes(16))
    r.set_desc(0, 0x20000, 16, NEXT, 1)
    r.set_desc(1, 0x21000, 512, NEXT | WRITE, 2)
    r.set_desc(2, 0x22000, 1, WRITE)
    r.make_available(0)
    dev.notify(0)
    assert r.used_idx() == 1 and mem.read_u8(0x22000) == 0
    assert dev.read(R.R_INTERRUPT_STATUS, 4) == R.INT_VRING
    assert irq_count(irq) == 1
    dev.write(R.R_INTERRUPT_ACK, 4, R.INT_VRING)
    assert dev.read(R.R_INTERRUPT_STATUS, 4) == 0
    assert dev.stats[0].interrupts == 1 and dev.stats[0].requests == 1


def test_config_space_and_generation(env):
    dev, _, irq = env
    sectors = (1 << 20) // 512
    assert dev.read(R.CONFIG + 0, 4) == sectors and dev.read(R.CONFIG + 4, 4) == 0
    assert dev.read(R.CONFIG + 0, 8) == sectors
    assert dev.read(R.CONFIG + 20, 4) == 512               # blk_size
    assert dev.read(R.CONFIG + 0, 2) == sectors & 0xFFFF  # narrow config reads are fine
    assert dev.read(R.CONFIG + 4096, 4) == 0               # beyond the config space
    gen = dev.read(R.R_CONFIG_GENERATION, 4)
    mmio_bring_up(dev, V1, [RING])
    dev.model.on_config_change()
    assert dev.read(R.R_CONFIG_GENERATION, 4) == gen + 1
    assert dev.read(R.R_INTERRUPT_STATUS, 4) & R.INT_CONFIG and irq_count(irq) == 1
    assert not dev.read(R.R_STATUS, 4) & spec.DEVICE_NEEDS_RESET


def test_reset_drops_all_queue_state(env):
    dev, mem, _ = env
    mmio_bring_up(dev, V1, [RING])
    dev.write(R.R_STATUS, 4, 0)
    assert dev.read(R.R_STATUS, 4) == 0
    dev.write(R.R_QUEUE_SEL, 4, 0)
    assert dev.read(R.R_QUEUE_READY, 4) == 0
    assert dev.read(R.R_QUEUE_NUM, 4) == 0 and dev.read(R.R_QUEUE_DESC_LOW, 4) == 0
    assert dev.read(R.R_INTERRUPT_STATUS, 4) == 0
    assert dev.queues == [None]
    mem.write_u16(0x11002, 1)               # a buffer "made available" after reset
    dev.notify(0)                           # is ignored: no DRIVER_OK, no queue
    assert mem.read_u16(0x12002) == 0


def test_queue_ready_zero_stops_the_queue(env):
    dev, mem, _ = env
    mmio_bring_up(dev, V1, [RING])
    dev.write(R.R_QUEUE_SEL, 4, 0)
    dev.write(R.R_QUEUE_READY, 4, 0)
    assert dev.read(R.R_QUEUE_READY, 4) == 0
    mem.write_u16(0x11002, 1)
    dev.notify(0)
    assert mem.read_u16(0x12002) == 0 and not dev.broken
