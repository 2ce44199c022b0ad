"""virtio-mmio, version 2 (VIRTIO 1.x section 4.2): the register window of one device and
the status/feature state machine behind it.

Doorbells: QueueNotify is registered as one ioeventfd per queue (datamatch = queue index),
so a guest rings it without an exit. A guest that breaks the rules gets
DEVICE_NEEDS_RESET and a config-change interrupt; the host logs one line and goes on.
"""

from __future__ import annotations

import logging
from typing import Callable

from alacrity.bus import IrqLine
from alacrity.errors import GuestError
from alacrity.limits import DEFAULT, Limits
from alacrity.memory import GuestMemory
from alacrity.virtio import spec
from alacrity.virtio.device import Notify, VirtioDevice
from alacrity.virtio.host import QueueHost

log = logging.getLogger("alacrity.virtio.mmio")

MAGIC = 0x74726976  # "virt"
VERSION = 2
WINDOW = 0x200      # registers 0x000-0x0ff, config space from 0x100

R_MAGIC = 0x000
R_VERSION = 0x004
R_DEVICE_ID = 0x008
R_VENDOR_ID = 0x00C
R_DEVICE_FEATURES = 0x010
R_DEVICE_FEATURES_SEL = 0x014
R_DRIVER_FEATURES = 0x020
R_DRIVER_FEATURES_SEL = 0x024
R_QUEUE_SEL = 0x030
R_QUEUE_NUM_MAX = 0x034
R_QUEUE_NUM = 0x038
R_QUEUE_READY = 0x044
R_QUEUE_NOTIFY = 0x050
R_INTERRUPT_STATUS = 0x060
R_INTERRUPT_ACK = 0x064
R_STATUS = 0x070
R_QUEUE_DESC_LOW = 0x080
R_QUEUE_DESC_HIGH = 0x084
R_QUEUE_DRIVER_LOW = 0x090
R_QUEUE_DRIVER_HIGH = 0x094
R_QUEUE_DEVICE_LOW = 0x0A0
R_QUEUE_DEVICE_HIGH = 0x0A4
R_SHM_SEL = 0x0AC
R_SHM_LEN_LOW = 0x0B0
R_SHM_LEN_HIGH = 0x0B4
R_SHM_BASE_LOW = 0x0B8
R_SHM_BASE_HIGH = 0x0BC
R_QUEUE_RESET = 0x0C0
R_CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

INT_VRING = 1
INT_CONFIG = 2

_ADDR_REGS = {
    R_QUEUE_DESC_LOW: ("desc", 0), R_QUEUE_DESC_HIGH: ("desc", 32),
    R_QUEUE_DRIVER_LOW: ("driver", 0), R_QUEUE_DRIVER_HIGH: ("driver", 32),
    R_QUEUE_DEVICE_LOW: ("device", 0), R_QUEUE_DEVICE_HIGH: ("device", 32),
}


class _QueueRegs:
    """Per-queue register state as the driver programs it."""

    __slots__ = ("num", "desc", "driver", "device", "ready")

    def __init__(self) -> None:
        self.num = 0
        self.desc = 0
        self.driver = 0
        self.device = 0
        self.ready = False


class VirtioMmioDevice(QueueHost):
    """The virtio-mmio register window of one device model."""

    def __init__(self, model: VirtioDevice, mem: GuestMemory, irq: IrqLine, *,
                 name: str | None = None, notify: Notify = Notify.MITIGATED,
                 offer_event_idx: bool = True, offer_indirect: bool = True,
                 offer_packed: bool = True,
                 budget: int = 8, defer: Callable[[object, Callable[[], bool]], None] | None = None,
                 limits: Limits = DEFAULT):
        super().__init__(model, mem, name=name, notify=notify, budget=budget, defer=defer,
                         limits=limits)
        self.irq = irq
        self.offered = (model.device_features() | spec.bit(spec.F_VERSION_1)
                        | (spec.bit(spec.F_EVENT_IDX) if offer_event_idx else 0)
                        | (spec.bit(spec.F_INDIRECT_DESC) if offer_indirect else 0)
                        | (spec.bit(spec.F_RING_PACKED) if offer_packed else 0))
        self.config_generation = 0
        model.on_config_change = self._config_changed
        self._reset_state()

    # -- state ---------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.isr = 0
        self.broken = False
        self.qregs = [_QueueRegs() for _ in range(self.model.num_queues)]
        self.queues = [None] * self.model.num_queues
        self.active = []

    def reset(self) -> None:
        """Device reset (status 0, or the host resetting a machine)."""
        with self.lock:
            self._reset_state()
            self.model.reset()

    @property
    def negotiated(self) -> int:
        return self.driver_features if self.status & spec.FEATURES_OK else 0

    def fail(self, reason: str) -> None:
        """The guest broke the rules: DEVICE_NEEDS_RESET, a config interrupt, one log line."""
        if self._mark_broken(reason, "device needs reset"):
            self.status |= spec.DEVICE_NEEDS_RESET
            self.isr |= INT_CONFIG
            self.irq.signal()

    def live(self) -> bool:
        return not self.broken and bool(self.status & spec.DRIVER_OK)

    def _config_changed(self) -> None:
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & spec.DRIVER_OK:
                self.isr |= INT_CONFIG
                self.irq.signal()

    # -- register window (bus.Handler) --------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset >= CONFIG:
                return self._read_config(offset - CONFIG, size)
            if size != 4 or offset & 3:
                self.fail(f"{size}-byte read at register {offset:#x} (registers are 32-bit)")
                return 0
            return self._read_reg(offset) & 0xFFFFFFFF

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset >= CONFIG:
                self._write_config(offset - CONFIG, size, value)
                return
            if size != 4 or offset & 3:
                self.fail(f"{size}-byte write at register {offset:#x} (registers are 32-bit)")
                return
            try:
                self._write_reg(offset, value & 0xFFFFFFFF)
            except GuestError as e:
                self.fail(str(e))

    def _read_reg(self, off: int) -> int:
        if off == R_MAGIC:
            return MAGIC
        if off == R_VERSION:
            return VERSION
        if off == R_DEVICE_ID:
            return self.model.device_id
        if off == R_VENDOR_ID:
            return spec.VENDOR_ID
        if off == R_DEVICE_FEATURES:
            sel = self.device_features_sel
            return (self.offered >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        if off == R_QUEUE_NUM_MAX:
            q = self.queue_sel
            return self.queue_max if q < self.model.num_queues else 0
        if off == R_QUEUE_READY:
            q = self._selected()
            return int(q.ready) if q else 0
        if off == R_INTERRUPT_STATUS:
            return self.isr
        if off == R_STATUS:
            return self.status
        if off == R_CONFIG_GENERATION:
            return self.config_generation
        if off in (R_SHM_LEN_LOW, R_SHM_LEN_HIGH, R_SHM_BASE_LOW, R_SHM_BASE_HIGH):
            return 0xFFFFFFFF  # no shared memory regions: length/base all-ones
        if off == R_QUEUE_RESET:
            return 0
        q = self._selected()
        if q is not None:
            if off == R_QUEUE_NUM:
                return q.num
            if off in _ADDR_REGS:
                field, shift = _ADDR_REGS[off]
                return getattr(q, field) >> shift
        return 0

    def _selected(self) -> _QueueRegs | None:
        q = self.queue_sel
        return self.qregs[q] if q < len(self.qregs) else None

    def _write_reg(self, off: int, value: int) -> None:
        if off == R_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif off == R_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif off == R_DRIVER_FEATURES:
            if self.status & spec.FEATURES_OK:
                raise GuestError("driver features written after FEATURES_OK")
            sel = self.driver_features_sel
            if sel >= 2:
                if value:
                    raise GuestError(f"driver features {value:#x} in word {sel} (none exist)")
                return
            shift = 32 * sel
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif off == R_QUEUE_SEL:
            self.queue_sel = value
        elif off == R_QUEUE_NUM:
            self._queue_for_setup().num = value
        elif off in _ADDR_REGS:
            q = self._queue_for_setup()
            field, shift = _ADDR_REGS[off]
            keep = getattr(q, field) & ~(0xFFFFFFFF << shift)
            setattr(q, field, keep | (value << shift))
        elif off == R_QUEUE_READY:
            self._queue_ready(value)
        elif off == R_QUEUE_NOTIFY:
            self.notify(value)  # a notify that came as an exit, not through the ioeventfd
        elif off == R_INTERRUPT_ACK:
            self.isr &= ~value
        elif off == R_STATUS:
            self._write_status(value)
        elif off == R_QUEUE_RESET:
            if value == 1:
                raise GuestError("queue reset without VIRTIO_F_RING_RESET")
        elif off == R_SHM_SEL:
            pass
        else:
            raise GuestError(f"write of {value:#x} to read-only or unknown register {off:#x}")

    def _queue_for_setup(self) -> _QueueRegs:
        q = self._selected()
        if q is None:
            raise GuestError(f"setup of queue {self.queue_sel}, which does not exist")
        if q.ready:
            raise GuestError(f"queue {self.queue_sel} reprogrammed while ready")
        return q

    def _queue_ready(self, value: int) -> None:
        qi = self.queue_sel
        q = self._selected()
        if q is None:
            raise GuestError(f"QueueReady on queue {qi}, which does not exist")
        if value == 0:
            q.ready = False
            self.queues[qi] = None
            self.active = [v for v in self.queues if v is not None]
            return
        if value != 1:
            raise GuestError(f"QueueReady written with {value}")
        if not self.status & spec.FEATURES_OK:
            raise GuestError(f"queue {qi} made ready before FEATURES_OK")
        if q.ready:
            return
        if q.num > self.queue_max:
            raise GuestError(f"queue {qi} size {q.num} exceeds QueueNumMax {self.queue_max}")
        ring = self.make_ring(self.driver_features, q.num, q.desc, q.driver, q.device)
        q.ready = True
        self.queues[qi] = self.make_queue(qi, ring, self._interrupt)
        if self.status & spec.DRIVER_OK:
            self.active = [v for v in self.queues if v is not None]

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset_state()
            self.model.reset()
            return
        old = self.status & ~spec.DEVICE_NEEDS_RESET
        if value & ~0xFF:
            raise GuestError(f"status {value:#x} has bits above 0xff")
        if old & ~value:
            raise GuestError(f"status {value:#x} clears bits of {old:#x} without a reset")
        new_bits = value & ~old
        keep = self.status & spec.DEVICE_NEEDS_RESET
        if new_bits & spec.FEATURES_OK:
            if not self._features_acceptable():
                self.status = (value & ~spec.FEATURES_OK) | keep
                return
        if new_bits & spec.DRIVER_OK:
            if not value & spec.FEATURES_OK:
                raise GuestError("DRIVER_OK without FEATURES_OK")
        self.status = value | keep
        if new_bits & spec.DRIVER_OK:
            self.model.activate(self.queues)
            self.active = [v for v in self.queues if v is not None]
            # buffers made available before DRIVER_OK are served now
            for vq in self.active:
                if vq.ring.has_work():
                    self._service(vq)

    def _features_acceptable(self) -> bool:
        f = self.driver_features
        if f & ~self.offered:
            log.info("%s: refusing features %#x that were not offered", self.name, f & ~self.offered)
            return False
        if not f & spec.bit(spec.F_VERSION_1):
            log.info("%s: refusing features without VIRTIO_F_VERSION_1", self.name)
            return False
        return self.model.accept_features(f)

    # -- config space ----------------------------------------------------------------------
    def _read_config(self, off: int, size: int) -> int:
        cfg = self.model.config()
        if size not in (1, 2, 4, 8) or off + size > len(cfg):
            return 0
        return int.from_bytes(cfg[off:off + size], "little")

    def _write_config(self, off: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8):
            return
        self.model.write_config(off, value.to_bytes(size, "little"))

    # -- signals -----------------------------------------------------------------------------
    def _interrupt(self) -> None:
        self.isr |= INT_VRING
        self.irq.signal()

    def doorbell(self, qi: int, count: int) -> None:
        """A doorbell eventfd fired `count` times for queue qi (host side of ioeventfd)."""
        if qi < len(self.stats):
            self.stats[qi].doorbells += count
        self.notify(qi)

    def notify(self, qi: int) -> None:
        with self.lock:
            if self.broken or not self.status & spec.DRIVER_OK:
                return
            if qi >= len(self.queues):
                self.fail(f"notify for queue {qi}, which does not exist")
                return
            vq = self.queues[qi]
            if vq is None:
                return  # a notify for a queue that is not ready: nothing to do (spec 4.2.3.3)
            if self.polling:
                return  # the poller is looking at this ring anyway
            self._service(vq)

