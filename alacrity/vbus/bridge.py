"""The vbus bus bridge, host side: bridgecalls, hypercalls, the device registry and the
bus event queue.

- The bridgecall window (MMIO, 64 bytes): the guest writes a descriptor {vector, len,
  datap} and reads the first word to run it: NEGOTIATE (which also starts a new session:
  devices a previous driver opened are closed), QREG (register the event queue),
  SLOWCALL (a hypercall described at datap), FASTCALL_ADD/DROP (a per-CPU hypercall
  descriptor, run by writing the CPU number to the fastcall doorbell).
- Hypercalls: DEVOPEN, DEVCLOSE, DEVCALL, DEVSHM. DEVSHM registers a region (usually an
  IOQ) and, if it has a shm-signal, returns a handle; the guest signals it by writing the
  handle to the shmsignal doorbell (an eventfd with that datamatch, like virtio's
  QueueNotify).
- Host to guest: every device signal that crosses becomes a SHMSIGNAL event (with the
  guest's cookie) in the one event queue, an IOQ of 144-byte events; the event queue's own
  shm-signal decides whether the single bus interrupt is raised. Devices announce
  themselves with DEVADD events once the guest registered the queue.
Everything the guest hands over is checked here or in the IOQ/shm-signal code; a bad
call returns -errno, a device that breaks its rings is marked broken, and the host runs on.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

from alacrity.bus import IrqLine, QueueStats
from alacrity.errors import GuestError
from alacrity.limits import DEFAULT, Limits
from alacrity.memory import GuestMemory
from alacrity.vbus import abi, shm_signal
from alacrity.vbus.device import CallError, Shm, VbusDevice
from alacrity.vbus.ioq import Ioq, ring_size
from alacrity.vbus.shm_signal import SOUTH, ShmSignal
from alacrity.virtio.device import Notify

log = logging.getLogger("alacrity.vbus")

MAX_EVENTQ = 4096


class VbusBridge:
    """The bridge's MMIO window (bus.Handler) and everything behind it."""

    def __init__(self, mem: GuestMemory, irq: IrqLine, *, handles: int = 32,
                 notify: Notify = Notify.MITIGATED, name: str = "vbus",
                 defer: Callable[[object, Callable[[], bool]], None] | None = None,
                 limits: Limits = DEFAULT):
        self.mem = mem
        self.limits = limits
        self.irq = irq
        self.name = name
        self.notify_mode = Notify(notify)
        self.handles = handles
        self.defer = defer
        self.devices: dict[int, VbusDevice] = {}
        self.lock = threading.RLock()
        self.irq_stats = QueueStats()          # the bus interrupt (event queue)
        self.eventq_stats = QueueStats()       # eventq doorbells (the guest took events)
        self.bad_doorbells = 0
        self.calls = 0
        self.broken = False
        self.last_error = ""
        self._reset_state()

    def _reset_state(self) -> None:
        self.regs = bytearray(abi.REGS_SIZE)
        self.negotiated = False
        self.eventq: Ioq | None = None
        self.fastcalls: dict[int, int] = {}
        self.opened: dict[int, VbusDevice] = {}      # devh -> device
        self.shms: dict[int, Shm] = {}               # handle -> shm with a signal
        self.dev_shms: dict[int, list[Shm]] = {}     # devh -> every shm of the device
        self.free_handles = list(range(self.handles, 0, -1))
        self.pending: collections.deque[bytes] = collections.deque()
        self._signalled: set[int] = set()            # cookies with a SHMSIGNAL waiting
        self.next_devh = 1
        self.polling = False

    def add_device(self, dev: VbusDevice) -> int:
        """Put a device on the bus; returns its id (announced with DEVADD)."""
        devid = len(self.devices) + 1
        self.devices[devid] = dev
        dev.schedule = lambda fn, dev=dev: self._schedule(dev, fn)
        dev.fail = lambda why, dev=dev: self._device_failed(dev, why)
        dev.limits = self.limits
        return devid

    def reset(self) -> None:
        with self.lock:
            for dev in self.opened.values():
                dev.close()
            self._reset_state()
            self.broken = False

    @property
    def always(self) -> bool:
        return self.notify_mode is Notify.ALWAYS

    # -- MMIO window: the bridgecall descriptor ----------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset == 0 and size == 4:
                self.calls += 1
                return abi.as_u32(self._bridgecall())
            if 0 <= offset and offset + size <= abi.REGS_SIZE:
                return int.from_bytes(self.regs[offset:offset + size], "little")
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if size in (4, 8) and offset % 4 == 0 and 0 <= offset and offset + size <= abi.REGS_SIZE:
                self.regs[offset:offset + size] = value.to_bytes(size, "little")

    def _bridgecall(self) -> int:
        vector, length, datap = abi.CALL_DESC.unpack_from(self.regs)
        try:
            if self.broken:
                raise CallError(abi.EINVAL, "the bus is broken; reset it")
            if vector == abi.NEGOTIATE:
                return self._negotiate(length, datap)
            if not self.negotiated:
                raise CallError(abi.EPERM, f"bridgecall {vector} before NEGOTIATE")
            if vector == abi.QREG:
                return self._qreg(length, datap)
            if vector == abi.SLOWCALL:
                self._need(length, abi.CALL_DESC.size, "SLOWCALL")
                nr, hlen, hdata = abi.CALL_DESC.unpack(self._read(datap, abi.CALL_DESC.size))
                return self._hypercall(nr, hlen, hdata)
            if vector == abi.FASTCALL_ADD:
                self._need(length, abi.CALL_DESC.size, "FASTCALL_ADD")
                cpu, flen, fdata = abi.CALL_DESC.unpack(self._read(datap, abi.CALL_DESC.size))
                self._need(flen, abi.FASTCALL_DESC.size, "fastcall descriptor")
                self._read(fdata, abi.FASTCALL_DESC.size)     # must be guest RAM
                self.fastcalls[cpu] = fdata
                return 0
            if vector == abi.FASTCALL_DROP:
                self._need(length, abi.CALL_DESC.size, "FASTCALL_DROP")
                cpu = abi.CALL_DESC.unpack(self._read(datap, abi.CALL_DESC.size))[0]
                if self.fastcalls.pop(cpu, None) is None:
                    raise CallError(abi.ENOENT, f"no fastcall descriptor for cpu {cpu}")
                return 0
            raise CallError(abi.EINVAL, f"unknown bridgecall vector {vector}")
        except CallError as e:
            log.info("%s: bridgecall %d failed: %s", self.name, vector, e)
            return -e.errno

    @staticmethod
    def _need(length: int, want: int, what: str) -> None:
        if length != want:
            raise CallError(abi.EINVAL, f"{what}: length {length}, expected {want}")

    def _read(self, addr: int, length: int) -> bytes:
        try:
            return bytes(self.mem.view(addr, length))
        except GuestError as e:
            raise CallError(abi.EFAULT, str(e)) from None

    def _write(self, addr: int, data: bytes) -> None:
        try:
            self.mem.view(addr, len(data))[:] = data
        except GuestError as e:
            raise CallError(abi.EFAULT, str(e)) from None

    def _negotiate(self, length: int, datap: int) -> int:
        self._need(length, abi.NEGOTIATE_S.size, "NEGOTIATE")
        magic, version, _caps = abi.NEGOTIATE_S.unpack(self._read(datap, abi.NEGOTIATE_S.size))
        if magic != abi.BRIDGE_MAGIC:
            raise CallError(abi.EINVAL, f"NEGOTIATE: magic {magic:#x}")
        if version != abi.HC_VERSION:
            raise CallError(abi.EINVAL, f"NEGOTIATE: hypercall version {version}, "
                                        f"bridge speaks {abi.HC_VERSION}")
        if self.negotiated or self.opened or self.eventq is not None:
            # a new driver instance: like a virtio status reset, start from nothing
            for dev in self.opened.values():
                dev.close()
            self._reset_state()
        self._write(datap, abi.NEGOTIATE_S.pack(magic, version, 0))   # no capabilities
        self.negotiated = True
        return 0

    def _qreg(self, length: int, datap: int) -> int:
        if self.eventq is not None:
            raise CallError(abi.EEXIST, "QREG: the event queue is already registered")
        count = abi.BUSREG_HDR.unpack(self._read(datap, abi.BUSREG_HDR.size))[0]
        if count != 1:
            raise CallError(abi.EINVAL, f"QREG: {count} event queues (this bridge has 1)")
        self._need(length, abi.BUSREG_HDR.size + abi.EVENTQREG.size * count, "QREG")
        qcount, ring, data = abi.EVENTQREG.unpack(
            self._read(datap + abi.BUSREG_HDR.size, abi.EVENTQREG.size))
        if not 0 < qcount <= MAX_EVENTQ:
            raise CallError(abi.EINVAL, f"QREG: event queue of {qcount} entries")
        self._read(data, qcount * abi.EVENT_SIZE)                 # the event pool is RAM
        self._read(ring, ring_size(qcount))                       # and so is the ring
        try:
            q = Ioq(self.mem, ring, SOUTH, cross=self._interrupt, always=self.always)
        except GuestError as e:
            raise CallError(abi.EINVAL, f"QREG: {e}") from None
        if q.count != qcount:
            raise CallError(abi.EINVAL, f"QREG: ring has {q.count} entries, registered {qcount}")
        q.signal.notifier = self._deliver
        self.eventq = q
        for devid, dev in self.devices.items():
            self.pending.append(abi.devadd_event(devid, dev.type))
        self._deliver()
        return 0

    # -- hypercalls ----------------------------------------------------------------------------
    def _hypercall(self, nr: int, length: int, datap: int) -> int:
        if nr == abi.DEVOPEN:
            self._need(length, abi.DEVOPEN_S.size, "DEVOPEN")
            devid, version, _ = abi.DEVOPEN_S.unpack(self._read(datap, abi.DEVOPEN_S.size))
            dev = self.devices.get(devid)
            if dev is None:
                raise CallError(abi.ENODEV, f"DEVOPEN: no device {devid}")
            dev.open(self.mem, version)
            dev.polling = self.polling
            devh = self.next_devh
            self.next_devh += 1
            self.opened[devh] = dev
            self.dev_shms[devh] = []
            self._write(datap, abi.DEVOPEN_S.pack(devid, version, devh))
            return 0
        if nr == abi.DEVCLOSE:
            self._need(length, abi.DEVCLOSE_S.size, "DEVCLOSE")
            devh = abi.DEVCLOSE_S.unpack(self._read(datap, abi.DEVCLOSE_S.size))[0]
            self._close(devh)
            return 0
        if nr == abi.DEVCALL:
            self._need(length, abi.DEVCALL_S.size, "DEVCALL")
            devh, func, clen, flags, cdata = abi.DEVCALL_S.unpack(self._read(datap, abi.DEVCALL_S.size))
            dev = self._device(devh)
            if dev.broken:
                raise CallError(abi.EINVAL, f"{dev.type} is broken; close and reopen it")
            return dev.call(func, cdata, clen, flags)
        if nr == abi.DEVSHM:
            self._need(length, abi.DEVSHM_S.size, "DEVSHM")
            return self._devshm(*abi.DEVSHM_S.unpack(self._read(datap, abi.DEVSHM_S.size)))
        raise CallError(abi.EINVAL, f"unknown hypercall {nr}")

    def _device(self, devh: int) -> VbusDevice:
        dev = self.opened.get(devh)
        if dev is None:
            raise CallError(abi.ENOENT, f"no open device with handle {devh}")
        return dev

    def _devshm(self, devh: int, id_: int, length: int, flags: int, offset: int, prio: int,
                cookie: int, datap: int) -> int:
        dev = self._device(devh)
        region = self._read(datap, length)               # checks the range, nothing more
        del region
        signal = None
        handle = 0
        stats = QueueStats()
        if offset != abi.NO_SIGNAL:
            if offset + shm_signal.SIZE > length:
                raise CallError(abi.EINVAL, f"DEVSHM: signal at {offset} outside {length} bytes")
            if not self.free_handles:
                raise CallError(abi.ENOSPC, "DEVSHM: no signal handles left")
            try:
                view = self.mem.view(datap + offset, shm_signal.SIZE)
                handle = self.free_handles.pop()
                signal = ShmSignal(view, SOUTH, lambda h=handle: self._shm_cross(h),
                                   always=self.always)
            except GuestError as e:
                if handle:
                    self.free_handles.append(handle)
                raise CallError(abi.EINVAL, f"DEVSHM: {e}") from None
        shm = Shm(id_, datap, length, signal, handle, stats, cookie)
        try:
            dev.shm(shm)
        except (CallError, GuestError) as e:
            if handle:
                self.free_handles.append(handle)
            if isinstance(e, GuestError):
                raise CallError(abi.EINVAL, f"DEVSHM: {e}") from None
            raise
        if handle:
            self.shms[handle] = shm
        self.dev_shms[devh].append(shm)
        return handle

    def _close(self, devh: int) -> None:
        dev = self._device(devh)
        for shm in self.dev_shms.pop(devh, []):
            if shm.handle:
                self.shms.pop(shm.handle, None)
                self.free_handles.append(shm.handle)
                self.pending.append(abi.handle_event(abi.EV_SHMCLOSE, shm.cookie))
        del self.opened[devh]
        dev.close()
        self._deliver()

    # -- host to guest --------------------------------------------------------------------------
    def _shm_cross(self, handle: int) -> None:
        """A device signal crossed: a SHMSIGNAL event carries the guest's cookie."""
        shm = self.shms.get(handle)
        if shm is None:
            return
        shm.stats.interrupts += 1           # a signal to the guest (the bus irq may merge it)
        if shm.cookie in self._signalled:
            return          # a SHMSIGNAL for it is still waiting: one is enough
        self._signalled.add(shm.cookie)
        self.pending.append(abi.handle_event(abi.EV_SHMSIGNAL, shm.cookie))
        self._deliver()

    def _deliver(self) -> None:
        """Write waiting events into the guest's free event slots, then signal once."""
        q = self.eventq
        pending = self.pending
        if q is None or self.broken:
            return
        if not pending:
            q.signal.disable()
            return
        try:
            slots = q.free_slots(len(pending))
            lens = []
            for _pos, _cookie, ptr, length in slots:
                if length < abi.EVENT_SIZE:
                    raise GuestError(f"event slot of {length} bytes (needs {abi.EVENT_SIZE})")
                event = pending.popleft()
                self.mem.view(ptr, abi.EVENT_SIZE)[:] = event
                if event[0] == abi.EV_SHMSIGNAL:
                    self._signalled.discard(int.from_bytes(event[8:16], "little"))
                lens.append(abi.EVENT_SIZE)
            if lens:
                q.fill(lens)
                if not q.signal.inject():
                    self.irq_stats.interrupts_suppressed += 1
            # hear the guest take events only while some wait for a slot (enable re-checks,
            # and runs this again if it took some meanwhile)
            if pending:
                q.signal.enable()
            else:
                q.signal.disable()
        except GuestError as e:
            self._bus_failed(f"event queue: {e}")

    def _interrupt(self) -> None:
        self.irq_stats.interrupts += 1
        self.irq.signal()

    # -- guest to host: doorbells ---------------------------------------------------------------
    def doorbell_eventq(self, count: int = 1) -> None:
        with self.lock:
            self.eventq_stats.doorbells += count
            if self.eventq is not None and not self.broken:
                try:
                    self.eventq.signal.wakeup()
                except GuestError as e:
                    self._bus_failed(f"event queue: {e}")

    def doorbell_shm(self, handle: int, count: int = 1) -> None:
        with self.lock:
            shm = self.shms.get(handle)
            if shm is None:
                self.bad_doorbells += count
                if self.bad_doorbells <= 10:
                    log.warning("%s: doorbell for handle %d, which is not registered",
                                self.name, handle)
                return
            shm.stats.doorbells += count
            if not self.polling:
                self._wakeup(shm)

    def _wakeup(self, shm: Shm) -> None:
        dev = self._owner(shm)
        if dev is None or dev.broken or shm.signal is None:
            return
        try:
            if shm.signal.wakeup(budget=4):
                self._schedule(dev, lambda: self._rewake(shm))
        except GuestError as e:
            self._device_failed(dev, str(e))

    def _rewake(self, shm: Shm) -> bool:
        if self.shms.get(shm.handle) is shm:
            self._wakeup(shm)
        return False

    def fastcall(self, cpu: int) -> None:
        """The fastcall doorbell (an exit: the vCPU waits for the result)."""
        with self.lock:
            self.calls += 1
            desc = self.fastcalls.get(cpu)
            if desc is None:
                self.bad_doorbells += 1
                log.warning("%s: fastcall for cpu %d, which registered no descriptor",
                            self.name, cpu)
                return
            try:
                nr, length, datap = abi.CALL_DESC.unpack(self._read(desc, abi.CALL_DESC.size))
                try:
                    result = self._hypercall(nr, length, datap) if not self.broken else -abi.EINVAL
                except CallError as e:
                    log.info("%s: hypercall %d failed: %s", self.name, nr, e)
                    result = -e.errno
                self._write(desc + abi.FASTCALL_RESULT, abi.as_u32(result).to_bytes(4, "little"))
            except CallError as e:
                log.warning("%s: fastcall descriptor of cpu %d: %s", self.name, cpu, e)

    # -- failures -------------------------------------------------------------------------------
    def _owner(self, shm: Shm) -> VbusDevice | None:
        for devh, shms in self.dev_shms.items():
            if shm in shms:
                return self.opened.get(devh)
        return None

    def _device_failed(self, dev: VbusDevice, why: str) -> None:
        if not dev.broken:
            dev.broken = True
            self.last_error = why
            log.error("%s: %s: guest error: %s; device broken until reopened",
                      self.name, dev.type, why)

    def _bus_failed(self, why: str) -> None:
        if not self.broken:
            self.broken = True
            self.last_error = why
            log.error("%s: guest error: %s; bus broken until reset", self.name, why)

    # -- scheduling and polling -------------------------------------------------------------------
    def _schedule(self, dev: VbusDevice, fn: Callable[[], bool]) -> None:
        def run() -> bool:
            with self.lock:
                if dev.broken or not dev.is_open or self.broken:
                    return False
                try:
                    return bool(fn())
                except GuestError as e:
                    self._device_failed(dev, str(e))
                except Exception as e:
                    log.exception("%s: %s: device work failed", self.name, dev.type)
                    self._device_failed(dev, f"internal error {e!r}")
                return False
        if self.defer is None:
            while run():
                pass
        else:
            self.defer((self, dev, fn), run)

    def poll_start(self) -> None:
        with self.lock:
            self.polling = True
            for dev in self.opened.values():
                dev.polling = True
                for s in dev.signals():
                    s.disable()

    def poll(self) -> bool:
        if not self.opened:
            return False
        worked = False
        with self.lock:
            for dev in self.opened.values():
                if dev.broken:
                    continue
                try:
                    if dev.poll():
                        worked = True
                except GuestError as e:
                    self._device_failed(dev, str(e))
        return worked

    def poll_stop(self) -> bool:
        pending = False
        with self.lock:
            self.polling = False
            for dev in self.opened.values():
                dev.polling = False
                try:
                    for s in dev.signals():
                        if s.enable():
                            pending = True
                    # work that came after the last pass and will not signal (frames a
                    # backend queued while we polled): one more pass finds it
                    if not dev.broken and dev.poll():
                        pending = True
                except GuestError as e:
                    self._device_failed(dev, str(e))
        return pending

    # -- reports ------------------------------------------------------------------------------
    def stats(self) -> list[QueueStats]:
        return [self.irq_stats, self.eventq_stats] + [s.stats for s in self.shms.values()]

    def totals(self) -> dict[str, int]:
        """The bus's signals in QueueStats' terms: doorbells are shm-signal and event-queue
        doorbells; interrupts are bus interrupts (several device signals may share one);
        `signals` counts device signals that crossed to the guest (SHMSIGNAL events)."""
        with self.lock:
            shm = [s.stats for s in self.shms.values()]
            out = self.irq_stats.as_dict()
            out["doorbells"] = self.eventq_stats.doorbells + sum(s.doorbells for s in shm)
            out["signals"] = sum(s.interrupts for s in shm)
            return out


class VbusSignals:
    """The bridge's PIO window: the three doorbells. Doorbells normally arrive as eventfds
    (ioeventfd with datamatch); these are the exits for values nobody registered, and the
    fastcall doorbell, which is always an exit (the guest reads the result right after)."""

    def __init__(self, bridge: VbusBridge):
        self.bridge = bridge

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            return
        if offset == abi.SIG_EVENTQ:
            self.bridge.doorbell_eventq()
        elif offset == abi.SIG_FASTCALL:
            self.bridge.fastcall(value)
        elif offset == abi.SIG_SHMSIGNAL:
            self.bridge.doorbell_shm(value)
