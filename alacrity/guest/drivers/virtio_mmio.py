"""The guest side of virtio-mmio: the spec's initialisation sequence, queue setup,
doorbells and interrupt acknowledgement, over any machine that offers register access
(`read`/`write`), RAM (`mem`, `alloc`) and `doorbell_fd`."""

from __future__ import annotations

import os
from typing import Any

from alacrity.bus import QueueStats, Space
from alacrity.errors import DeviceError
from alacrity.guest.access import wait_fd
from alacrity.virtio import mmio as R
from alacrity.virtio import spec
from alacrity.virtio.packed import PackedDriverQueue
from alacrity.virtio.packed import ring_sizes as packed_sizes
from alacrity.virtio.split import SplitDriverQueue, ring_sizes


class Signals:
    """Doorbells and interrupts as every driver transport does them (virtio-mmio, a
    vhost-user connection): needs `queues`, `stats`, `irq_fd`, `interrupts` and
    `notify(qi)`."""

    queues: dict[int, Any]
    stats: dict[int, Any]
    irq_fd: int
    interrupts: int

    def notify(self, qi: int) -> None:
        raise NotImplementedError

    def kick(self, qi: int, force: bool = False) -> bool:
        """Publish queue qi's new buffers; ring the doorbell if the device asked for it (or
        always, with force). Counts doorbells sent and suppressed. Returns True if rung."""
        q = self.queues[qi]
        stats = self.stats[qi]
        if q.kick_prepare() or force:
            self.notify(qi)
            stats.doorbells += 1
            return True
        stats.doorbells_suppressed += 1
        return False

    def wait_interrupt(self, timeout: float | None = None) -> bool:
        """Sleep until the interrupt eventfd fires. Returns False on timeout."""
        if not wait_fd(self.irq_fd, timeout):
            return False
        try:
            self.interrupts += os.eventfd_read(self.irq_fd)
        except BlockingIOError:
            pass
        return True


class MmioTransport(Signals):
    def __init__(self, machine: Any, device: dict[str, Any]):
        self.m = machine
        self.base = device["base"]
        self.irq_fd = device["irq_fd"]
        self.name = device.get("name", "virtio")
        if self.r(R.R_MAGIC) != R.MAGIC:
            raise DeviceError(f"{self.name}: no virtio-mmio magic at {self.base:#x}")
        if self.r(R.R_VERSION) != R.VERSION:
            raise DeviceError(f"{self.name}: virtio-mmio version {self.r(R.R_VERSION)}, need 2")
        self.device_id = self.r(R.R_DEVICE_ID)
        self.features = 0
        self.status = 0
        self.queues: dict[int, SplitDriverQueue | PackedDriverQueue] = {}
        self.stats: dict[int, QueueStats] = {}
        self._notify_fd: dict[int, int | None] = {}
        self.interrupts = 0
        self.acks = 0

    # -- registers -----------------------------------------------------------------------
    def r(self, off: int) -> int:
        return self.m.read(Space.MMIO, self.base + off, 4)

    def w(self, off: int, value: int) -> None:
        self.m.write(Space.MMIO, self.base + off, 4, value)

    def _set_status(self, bits: int) -> None:
        self.status |= bits
        self.w(R.R_STATUS, self.status)

    # -- initialisation (VIRTIO 1.x 3.1.1) ----------------------------------------------------
    def negotiate(self, wanted: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK and re-check. Returns the
        negotiated features (wanted & offered); VERSION_1 is required."""
        self.reset()
        self._set_status(spec.ACKNOWLEDGE)
        self._set_status(spec.DRIVER)
        offered = 0
        for sel in (0, 1):
            self.w(R.R_DEVICE_FEATURES_SEL, sel)
            offered |= self.r(R.R_DEVICE_FEATURES) << (32 * sel)
        if not offered & spec.bit(spec.F_VERSION_1):
            self.fail()
            raise DeviceError(f"{self.name}: device does not offer VIRTIO_F_VERSION_1")
        feats = (wanted & offered) | spec.bit(spec.F_VERSION_1)
        for sel in (0, 1):
            self.w(R.R_DRIVER_FEATURES_SEL, sel)
            self.w(R.R_DRIVER_FEATURES, (feats >> (32 * sel)) & 0xFFFFFFFF)
        self._set_status(spec.FEATURES_OK)
        if not self.r(R.R_STATUS) & spec.FEATURES_OK:
            self.fail()
            raise DeviceError(f"{self.name}: device refused features {feats:#x}")
        self.features = feats
        return feats

    def has(self, feature_bit: int) -> bool:
        return bool(self.features & spec.bit(feature_bit))

    def reset(self) -> None:
        self.w(R.R_STATUS, 0)
        if self.r(R.R_STATUS) != 0:
            raise DeviceError(f"{self.name}: reset did not complete")
        self.status = 0
        self.queues.clear()

    def fail(self) -> None:
        self._set_status(spec.FAILED)

    def driver_ok(self) -> None:
        self._set_status(spec.DRIVER_OK)

    def read_config(self, offset: int, size: int) -> int:
        """A config field, re-read until ConfigGeneration is stable (4.2.2.2)."""
        while True:
            gen = self.r(R.R_CONFIG_GENERATION)
            if size == 8:
                lo = self.m.read(Space.MMIO, self.base + R.CONFIG + offset, 4)
                hi = self.m.read(Space.MMIO, self.base + R.CONFIG + offset + 4, 4)
                value = lo | hi << 32
            else:
                value = self.m.read(Space.MMIO, self.base + R.CONFIG + offset, size)
            if self.r(R.R_CONFIG_GENERATION) == gen:
                return value

    def device_status(self) -> int:
        return self.r(R.R_STATUS)

    # -- queues ----------------------------------------------------------------------------
    def setup_queue(self, qi: int, size: int, *,
                    indirect_max: int = 0) -> SplitDriverQueue | PackedDriverQueue:
        self.w(R.R_QUEUE_SEL, qi)
        if self.r(R.R_QUEUE_READY):
            raise DeviceError(f"{self.name}: queue {qi} is already live")
        qmax = self.r(R.R_QUEUE_NUM_MAX)
        if qmax == 0:
            raise DeviceError(f"{self.name}: queue {qi} does not exist")
        size = min(size, qmax)
        q = make_driver_queue(self.m, size, self.features, indirect_max)
        desc, avail, used = q.addrs
        self.w(R.R_QUEUE_NUM, q.size)
        for reg, addr in ((R.R_QUEUE_DESC_LOW, desc), (R.R_QUEUE_DRIVER_LOW, avail),
                          (R.R_QUEUE_DEVICE_LOW, used)):
            self.w(reg, addr & 0xFFFFFFFF)
            self.w(reg + 4, addr >> 32)
        self.w(R.R_QUEUE_READY, 1)
        if self.r(R.R_QUEUE_READY) != 1:
            raise DeviceError(f"{self.name}: queue {qi} did not become ready")
        self.queues[qi] = q
        self.stats[qi] = QueueStats()
        self._notify_fd[qi] = self.m.doorbell_fd(Space.MMIO, self.base + R.R_QUEUE_NOTIFY, 4, qi)
        return q


    # -- signals ---------------------------------------------------------------------------
    def notify(self, qi: int) -> None:
        """Ring queue qi's doorbell: the eventfd directly, or a register write (an exit)."""
        fd = self._notify_fd.get(qi)
        if fd is not None:
            os.eventfd_write(fd, 1)
        else:
            self.w(R.R_QUEUE_NOTIFY, qi)

    def ack_interrupt(self) -> int:
        """Read InterruptStatus and acknowledge it (two exits, as on real virtio-mmio).
        A config-change interrupt with DEVICE_NEEDS_RESET raises DeviceError."""
        isr = self.r(R.R_INTERRUPT_STATUS)
        if isr:
            self.w(R.R_INTERRUPT_ACK, isr)
            self.acks += 1
        if isr & R.INT_CONFIG and self.device_status() & spec.DEVICE_NEEDS_RESET:
            raise DeviceError(f"{self.name}: device needs reset")
        return isr


def make_driver_queue(m: Any, size: int, features: int,
                      indirect_max: int = 0) -> SplitDriverQueue | PackedDriverQueue:
    """Lay out a driver-side ring of `size` (rounded down to a power of two for split) in
    guest RAM from `m.alloc`, split or packed as `features` say."""
    packed = bool(features & spec.bit(spec.F_RING_PACKED))
    if not packed:
        size = 1 << (size.bit_length() - 1)   # split rings are a power of two
    dsz, asz, usz = (packed_sizes if packed else ring_sizes)(size)
    alloc = m.alloc.alloc
    # each part on its own cache lines: the two sides write different parts
    desc, avail, used = alloc(dsz, 4096), alloc(asz, 64), alloc(usz, 64)
    tables: list[int] = []
    if indirect_max and features & spec.bit(spec.F_INDIRECT_DESC):
        tables = [alloc(16 * indirect_max, 16) for _ in range(size)]
    else:
        indirect_max = 0
    kind = PackedDriverQueue if packed else SplitDriverQueue
    return kind(m.mem, size, desc, avail, used, event_idx=bool(features & spec.bit(spec.F_EVENT_IDX)),
                indirect_tables=tables, indirect_max=indirect_max)
