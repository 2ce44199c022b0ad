"""A machine as the host builds it: guest RAM, the bus with its devices, the doorbells and
interrupt lines, and the I/O thread that serves them. Any kind of guest (a process guest
now, a KVM VM later) attaches to a Machine; the devices cannot tell which kind it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from alacrity.bus import Bus, IoEventFd, IrqLine, Space
from alacrity.iothread import IoThread
from alacrity.limits import DEFAULT, Limits
from alacrity.memory import GuestMemory
from alacrity.virtio.device import Notify, VirtioDevice
from alacrity.virtio.mmio import R_QUEUE_NOTIFY, WINDOW, VirtioMmioDevice
from alacrity.vbus import abi as vbus_abi
from alacrity.vbus.bridge import VbusBridge, VbusSignals
from alacrity.vbus.device import VbusDevice

RAM_BASE = 0
MMIO_BASE = 0xD000_0000
MMIO_STRIDE = 0x1000
FIRST_GSI = 5
# the vbus bridge's two windows (a PCI device's BAR0 and BAR1 historically)
VBUS_MMIO_BASE = 0xD100_0000
VBUS_PIO_BASE = 0x6000
VBUS_HANDLES = 32
# The I/O thread looks at its fds this long before it sleeps (QEMU's IOThreads poll up to
# 32 us by default). Measured here: an exit on an idle host costs 25-30 us with 0 (a
# wake-up), a few us with 50; bench blk depth 32 went from ~200k to ~270k ops/s.
IDLE_SPIN_US = 50.0


@dataclass
class DeviceSlot:
    kind: str
    name: str
    base: int
    size: int
    irq: IrqLine
    device: Any
    doorbells: list[IoEventFd]
    extra: dict[str, Any] = field(default_factory=dict)


class Machine:
    def __init__(self, ram_size: int = 64 << 20, *, poll_us: float = 0.0,
                 idle_spin_us: float = IDLE_SPIN_US, limits: Limits = DEFAULT,
                 mem: GuestMemory | None = None):
        self.limits = limits          # what guests may ask of every device on this machine
        # RAM: one region of ram_size at RAM_BASE, or memory the caller laid out (the
        # machine closes it either way)
        self.mem = mem if mem is not None else GuestMemory.create([(RAM_BASE, ram_size)])
        self.bus = Bus()
        self.io = IoThread(poll_us, idle_spin_us=idle_spin_us).start()
        self.slots: list[DeviceSlot] = []
        self._owned: list[Any] = []

    def add_virtio_mmio(self, model: VirtioDevice, *, notify: Notify = Notify.MITIGATED,
                        name: str | None = None, **options: Any) -> VirtioMmioDevice:
        """Place a virtio device behind a virtio-mmio window, with a doorbell per queue."""
        i = len(self.slots)
        base = MMIO_BASE + i * MMIO_STRIDE
        name = name or f"{model.name}{i}"
        irq = IrqLine(FIRST_GSI + i)
        options.setdefault("limits", self.limits)
        dev = VirtioMmioDevice(model, self.mem, irq, name=name, notify=notify,
                               defer=self.io.defer, **options)
        self.bus.map(Space.MMIO, base, WINDOW, dev, name)
        doorbells = []
        for qi in range(model.num_queues):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            ev = IoEventFd(Space.MMIO, base + R_QUEUE_NOTIFY, 4, qi, fd,
                           lambda n, qi=qi: dev.doorbell(qi, n))
            self.bus.add_ioeventfd(ev)
            self.io.add_reader(fd, self._reader(ev))
            doorbells.append(ev)
        if Notify(notify) is Notify.POLL:
            self.io.add_poller(dev)
        self.slots.append(DeviceSlot("virtio-mmio", name, base, WINDOW, irq, dev, doorbells))
        return dev

    def add_vbus_bridge(self, devices: list[VbusDevice], *, notify: Notify = Notify.MITIGATED,
                        name: str = "vbus") -> VbusBridge:
        """Place the vbus bridge (one per machine) with `devices` on its bus: the bridgecall
        window in MMIO, the doorbell window in PIO, one interrupt, and a doorbell eventfd
        for the event queue and for each shm-signal handle (datamatch = the handle)."""
        if any(s.kind == "vbus-bridge" for s in self.slots):
            raise ValueError("this machine already has a vbus bridge")
        irq = IrqLine(FIRST_GSI + len(self.slots))
        bridge = VbusBridge(self.mem, irq, handles=VBUS_HANDLES, notify=notify, name=name,
                            defer=self.io.defer, limits=self.limits)
        for dev in devices:
            bridge.add_device(dev)
        self.bus.map(Space.MMIO, VBUS_MMIO_BASE, vbus_abi.REGS_SIZE, bridge, name)
        self.bus.map(Space.PIO, VBUS_PIO_BASE, vbus_abi.SIGNALS_SIZE, VbusSignals(bridge),
                     f"{name}-signals")
        doorbells = []

        def add(offset: int, datamatch: int | None, fn) -> None:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            ev = IoEventFd(Space.PIO, VBUS_PIO_BASE + offset, 4, datamatch, fd, fn)
            self.bus.add_ioeventfd(ev)
            self.io.add_reader(fd, self._reader(ev))
            doorbells.append(ev)

        add(vbus_abi.SIG_EVENTQ, None, bridge.doorbell_eventq)
        for h in range(1, VBUS_HANDLES + 1):
            add(vbus_abi.SIG_SHMSIGNAL, h, lambda n, h=h: bridge.doorbell_shm(h, n))
        if Notify(notify) is Notify.POLL:
            self.io.add_poller(bridge)
        self.slots.append(DeviceSlot("vbus-bridge", name, VBUS_MMIO_BASE, vbus_abi.REGS_SIZE,
                                     irq, bridge, doorbells,
                                     {"pio": VBUS_PIO_BASE, "pio_size": vbus_abi.SIGNALS_SIZE,
                                      "abi_version": vbus_abi.ABI_VERSION}))
        return bridge

    def own(self, resource: Any) -> Any:
        """Close `resource` with the machine."""
        self._owned.append(resource)
        return resource

    def attach(self, backend: Any) -> Any:
        """Start a backend on this machine's I/O thread (its fds are watched there) and close
        it with the machine."""
        backend.start(self.io)
        self._owned.append(backend)
        return backend

    @staticmethod
    def _reader(ev: IoEventFd):
        def on_readable() -> None:
            try:
                n = os.eventfd_read(ev.fd)
            except BlockingIOError:
                return
            ev.on_signal(n)
        return on_readable

    def describe(self) -> tuple[dict[str, Any], list[int]]:
        """What a guest needs to know (like a device tree), and the fds it needs.
        Every `fd` field in the description is an index into the fd list."""
        fds: list[int] = []

        def fd(n: int) -> int:
            fds.append(n)
            return len(fds) - 1

        ram = [{"gpa": r.gpa, "size": r.size, "fd": fd(r.fd), "offset": r.fd_offset}
               for r in self.mem.regions]
        ioeventfds = [{"space": int(ev.space), "addr": ev.addr, "size": ev.size,
                       "datamatch": ev.datamatch, "fd": fd(ev.fd)} for ev in self.bus.ioeventfds]
        devices = [{"kind": s.kind, "name": s.name, "base": s.base, "size": s.size,
                    "gsi": s.irq.gsi, "irq_fd": fd(s.irq.fd), **s.extra} for s in self.slots]
        return {"ram": ram, "ioeventfds": ioeventfds, "devices": devices}, fds

    def reset(self) -> None:
        """Reset every device (after a guest went away)."""
        for s in self.slots:
            self.io.call_sync(s.device.reset)

    def close(self) -> None:
        self.io.close()
        for b in self._owned:
            b.close()
        self._owned.clear()
        for s in self.slots:
            for ev in s.doorbells:
                os.close(ev.fd)
            s.irq.close()
        self.slots.clear()
        self.mem.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
