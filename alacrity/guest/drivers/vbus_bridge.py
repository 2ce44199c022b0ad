"""The guest side of the vbus bus bridge (drivers/vbus/pci-bridge.c's role): negotiate,
register the event queue, learn devices from DEVADD events, make hypercalls, and turn the
one bus interrupt into wakeups of the right device signal (SHMSIGNAL carries the cookie
the driver chose when it registered the signal).

Hypercalls go through the per-CPU fastcall descriptor (one exit: a PIO write) once it is
registered, through SLOWCALL (bridgecall descriptor writes and a read of BAR0) before.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from alacrity.bus import QueueStats, Space
from alacrity.errors import DeviceError, GuestError
from alacrity.guest.access import wait_fd
from alacrity.vbus import abi
from alacrity.vbus.ioq import SIGNAL_OFFSET, Ioq, init_ring, ring_size
from alacrity.vbus.shm_signal import NORTH, ShmSignal

SCRATCH = 4096
DATA_OFF = 256               # device-call data inside the scratch page
SLOW_OFF = 128               # the SLOWCALL descriptor


class VbusError(DeviceError):
    """A bridgecall or hypercall returned -errno."""

    def __init__(self, what: str, result: int):
        super().__init__(f"{what} failed: {os.strerror(-result) if result < 0 else result}")
        self.errno = -result


def find_bridge(machine: Any) -> "VbusBridgeDriver":
    for d in machine.devices:
        if d["kind"] == "vbus-bridge":
            return VbusBridgeDriver(machine, d)
    raise LookupError("no vbus bridge on this machine")


class VbusBridgeDriver:
    def __init__(self, machine: Any, device: dict[str, Any], *, eventq_size: int = 64,
                 fastcall: bool = True):
        self.m = machine
        self.base = device["base"]
        self.pio = device["pio"]
        self.irq_fd = device["irq_fd"]
        if device.get("abi_version") != abi.ABI_VERSION:
            raise DeviceError(f"vbus bridge ABI version {device.get('abi_version')}, "
                              f"driver speaks {abi.ABI_VERSION}")
        mem = machine.mem
        alloc = machine.alloc.alloc
        self.scratch = alloc(SCRATCH, 64)
        self.sv = mem.view(self.scratch, SCRATCH)
        self.devices: dict[int, str] = {}          # devid -> type, from DEVADD
        self.signals: dict[int, ShmSignal] = {}    # cookie -> the north side of a signal
        self.closed: set[int] = set()              # cookies the host closed
        self.next_cookie = 1
        self.interrupts = 0
        self.stats = QueueStats()                  # the bus interrupt, as the guest saw it
        self._eventq_doorbell = machine.doorbell_fd(Space.PIO, self.pio + abi.SIG_EVENTQ, 4, 0)
        self.negotiate()
        self.fastcall_desc = 0
        if fastcall:
            self.fastcall_desc = alloc(abi.FASTCALL_DESC.size, 64)
            mem.view(self.fastcall_desc, abi.FASTCALL_DESC.size)[:] = bytes(abi.FASTCALL_DESC.size)
            r = self.bridgecall(abi.FASTCALL_ADD,
                                abi.CALL_DESC.pack(0, abi.FASTCALL_DESC.size, self.fastcall_desc))
            if r:
                raise VbusError("FASTCALL_ADD", r)
        self._eventq_setup(eventq_size)

    # -- bridgecalls (slow: three exits) ------------------------------------------------------
    def bridgecall(self, vector: int, data: bytes) -> int:
        """Run one bridgecall with `data` at the scratch page; returns the signed result and
        leaves what the host wrote back in the scratch page."""
        self.sv[DATA_OFF:DATA_OFF + len(data)] = data
        return self.raw_bridgecall(vector, len(data), self.scratch + DATA_OFF)

    def raw_bridgecall(self, vector: int, length: int, datap: int) -> int:
        m = self.m
        m.write(Space.MMIO, self.base, 8, vector | length << 32)
        m.write(Space.MMIO, self.base + 8, 8, datap)
        return abi.as_int(m.read(Space.MMIO, self.base, 4))

    def negotiate(self) -> None:
        r = self.bridgecall(abi.NEGOTIATE, abi.NEGOTIATE_S.pack(abi.BRIDGE_MAGIC, abi.HC_VERSION, 0))
        if r:
            raise VbusError("NEGOTIATE", r)
        magic, version, _caps = abi.NEGOTIATE_S.unpack_from(self.sv, DATA_OFF)
        if magic != abi.BRIDGE_MAGIC or version != abi.HC_VERSION:
            raise DeviceError(f"NEGOTIATE answered magic {magic:#x} version {version}")

    # -- hypercalls ----------------------------------------------------------------------------
    def hypercall(self, nr: int, args: bytes) -> int:
        """A hypercall whose argument block is `args` (copied to scratch+0, read back by
        the callers from there); fastcall if registered, else SLOWCALL."""
        sv = self.sv
        sv[:len(args)] = args
        if self.fastcall_desc:
            fd = self.m.mem.view(self.fastcall_desc, abi.FASTCALL_DESC.size)
            abi.FASTCALL_DESC.pack_into(fd, 0, nr, len(args), self.scratch, 0xFFFFFFFF)
            self.m.write(Space.PIO, self.pio + abi.SIG_FASTCALL, 4, 0)     # cpu 0; an exit
            return abi.as_int(int.from_bytes(fd[abi.FASTCALL_RESULT:abi.FASTCALL_RESULT + 4],
                                             "little"))
        abi.CALL_DESC.pack_into(sv, SLOW_OFF, nr, len(args), self.scratch)
        return self.raw_bridgecall(abi.SLOWCALL, abi.CALL_DESC.size, self.scratch + SLOW_OFF)

    def devopen(self, devid: int, version: int) -> int:
        r = self.hypercall(abi.DEVOPEN, abi.DEVOPEN_S.pack(devid, version, 0))
        if r:
            raise VbusError(f"DEVOPEN of device {devid}", r)
        return abi.DEVOPEN_S.unpack_from(self.sv)[2]

    def devclose(self, devh: int) -> None:
        r = self.hypercall(abi.DEVCLOSE, abi.DEVCLOSE_S.pack(devh))
        if r:
            raise VbusError("DEVCLOSE", r)

    def devcall(self, devh: int, func: int, data: bytes = b"", *, out_len: int = 0) -> tuple[int, bytes]:
        """A device call: `data` (or out_len bytes of zeros) at the call's data pointer.
        Returns (result, the data area afterwards)."""
        n = max(len(data), out_len)
        if n > SCRATCH - DATA_OFF:
            raise ValueError(f"device call data of {n} bytes")
        self.sv[DATA_OFF:DATA_OFF + n] = data.ljust(n, b"\0")
        r = self.hypercall(abi.DEVCALL, abi.DEVCALL_S.pack(devh, func, n, 0, self.scratch + DATA_OFF))
        return r, bytes(self.sv[DATA_OFF:DATA_OFF + n])

    def devshm(self, devh: int, shm_id: int, addr: int, length: int, *,
               signal: ShmSignal | None = None, signal_offset: int = SIGNAL_OFFSET) -> int:
        """Register guest memory with a device. With a signal (the north side of the
        shm-signal at `signal_offset` in the region: an IOQ's own by default), returns the
        handle for the shmsignal doorbell and routes the SHMSIGNAL events of its cookie to
        the signal's wakeup."""
        cookie = 0
        offset = abi.NO_SIGNAL
        if signal is not None:
            cookie = self.next_cookie
            self.next_cookie += 1
            offset = signal_offset
        r = self.hypercall(abi.DEVSHM, abi.DEVSHM_S.pack(devh, shm_id, length, 0, offset, 0,
                                                          cookie, addr))
        if r < 0:
            raise VbusError(f"DEVSHM of id {shm_id}", r)
        if signal is not None:
            if r == 0:
                raise DeviceError(f"DEVSHM of id {shm_id} returned no signal handle")
            self.signals[cookie] = signal
            fd = self.m.doorbell_fd(Space.PIO, self.pio + abi.SIG_SHMSIGNAL, 4, r)
            signal.cross = self._doorbell(fd, r)
        return r

    def _doorbell(self, fd: int | None, handle: int) -> Callable[[], None]:
        if fd is not None:
            return lambda: os.eventfd_write(fd, 1)
        return lambda: self.m.write(Space.PIO, self.pio + abi.SIG_SHMSIGNAL, 4, handle)

    # -- the event queue -----------------------------------------------------------------------
    def _eventq_setup(self, count: int) -> None:
        mem = self.m.mem
        alloc = self.m.alloc.alloc
        ring = alloc(ring_size(count), 64)
        pool = alloc(count * abi.EVENT_SIZE, 64)
        init_ring(mem, ring, count)
        cross = self._doorbell(self._eventq_doorbell, 0)
        if self._eventq_doorbell is None:
            cross = lambda: self.m.write(Space.PIO, self.pio + abi.SIG_EVENTQ, 4, 0)  # noqa: E731
        q = self.eventq = Ioq(mem, ring, NORTH, cross=cross)
        self.event_pool = mem.view(pool, count * abi.EVENT_SIZE)
        self.pool_addr = pool
        q.post([(i, pool + i * abi.EVENT_SIZE, abi.EVENT_SIZE) for i in range(count)], both=False)
        q.signal.notifier = self._events
        q.signal.enable()                                   # the bus interrupt
        busreg = abi.BUSREG_HDR.pack(1) + abi.EVENTQREG.pack(count, ring, pool)
        r = self.bridgecall(abi.QREG, busreg)
        if r:
            raise VbusError("QREG", r)
        try:
            os.eventfd_read(self.irq_fd)                     # DEVADDs arrived right away
        except BlockingIOError:
            pass
        self.service()

    def _events(self) -> None:
        """Take every waiting event, repost the slots, act on them."""
        q = self.eventq
        while True:
            got = q.take(q.count)
            if not got:
                return
            pool = self.event_pool
            base = self.pool_addr
            wake = []
            for _pos, _cookie, ptr, length in got:
                off = ptr - base
                if not 0 <= off <= len(pool) - abi.EVENT_SIZE or length != abi.EVENT_SIZE:
                    raise DeviceError(f"event at {ptr:#x}+{length} is not one of our slots")
                ev = pool[off:off + abi.EVENT_SIZE]
                eid = int.from_bytes(ev[0:4], "little")
                if eid == abi.EV_DEVADD:
                    _, devid, type_ = abi.EVENT_ADD.unpack(ev)
                    self.devices[devid] = type_.rstrip(b"\0").decode()
                elif eid == abi.EV_DEVDROP:
                    self.devices.pop(int.from_bytes(ev[8:16], "little"), None)
                elif eid == abi.EV_SHMSIGNAL:
                    sig = self.signals.get(int.from_bytes(ev[8:16], "little"))
                    if sig is not None:
                        wake.append(sig)
                elif eid == abi.EV_SHMCLOSE:
                    cookie = int.from_bytes(ev[8:16], "little")
                    self.signals.pop(cookie, None)
                    self.closed.add(cookie)
                else:
                    raise DeviceError(f"unknown bus event {eid}")
            q.release(len(got), length=abi.EVENT_SIZE)
            q.signal.inject()            # room again (crosses only if the host asked)
            for sig in wake:
                sig.wakeup()

    def service(self) -> None:
        """Handle the bus interrupt's work: the event queue's wakeup (clears its pending,
        so the next host signal raises the interrupt again)."""
        sig = self.eventq.signal
        try:
            while sig.wakeup():
                pass
        except GuestError as e:
            raise DeviceError(f"event queue: {e}") from None

    def wait_interrupt(self, timeout: float | None = None) -> bool:
        """Sleep until the bus interrupt, then service it (no acknowledge exits: the
        event queue's shm-signal acknowledges in shared memory). False on timeout."""
        if not wait_fd(self.irq_fd, timeout):
            return False
        try:
            n = os.eventfd_read(self.irq_fd)
            self.interrupts += n
            self.stats.interrupts += n
        except BlockingIOError:
            pass
        self.service()
        return True

    def find(self, type_: str, index: int = 0) -> int:
        """The devid of the index-th device of a type (from DEVADD)."""
        ids = sorted(d for d, t in self.devices.items() if t == type_)
        if index >= len(ids):
            raise LookupError(f"no vbus device of type {type_!r} (have {self.devices})")
        return ids[index]

