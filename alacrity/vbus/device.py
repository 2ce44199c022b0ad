"""What a vbus device model is: a type string, a version, device calls (DEVCALL) and
shared-memory regions the guest registers (DEVSHM), usually IOQs with a shm-signal each.
A device never sees the bridge's registers; the bridge hands it checked memory and
signals."""

from __future__ import annotations

from typing import Any, Callable

from alacrity.bus import QueueStats
from alacrity.errors import GuestError
from alacrity.limits import DEFAULT, Limits
from alacrity.memory import GuestMemory
from alacrity.vbus import abi
from alacrity.vbus.ioq import Ioq
from alacrity.vbus.shm_signal import SOUTH, ShmSignal


class CallError(Exception):
    """A device call or shm registration failed; the guest gets -errno back."""

    def __init__(self, errno_: int, why: str):
        super().__init__(why)
        self.errno = errno_


class Shm:
    """A region the guest registered with DEVSHM, with its signal if it has one."""

    __slots__ = ("id", "addr", "length", "signal", "handle", "stats", "cookie")

    def __init__(self, id_: int, addr: int, length: int, signal: ShmSignal | None,
                 handle: int, stats: QueueStats, cookie: int = 0):
        self.id = id_
        self.addr = addr
        self.length = length
        self.signal = signal
        self.handle = handle
        self.stats = stats
        self.cookie = cookie          # the guest's token, echoed in SHMSIGNAL/SHMCLOSE


class VbusDevice:
    """Base of vbus device models."""

    type = "unknown"
    version = 1

    def __init__(self) -> None:
        self.mem: GuestMemory | None = None
        self.is_open = False
        self.broken = False
        self.budget = 32                       # descriptors per pass
        self.polling = False                   # the bridge busy-polls us (poll() runs soon)
        # set by the bridge: run fn soon on the I/O thread (fn returns True: again)
        self.schedule: Callable[[Callable[[], bool]], None] = lambda fn: None
        self.fail: Callable[[str], None] = lambda why: None
        self.limits: Limits = DEFAULT          # set by the bridge

    # -- lifecycle -----------------------------------------------------------------------
    def open(self, mem: GuestMemory, version: int) -> None:
        if version != self.version:
            raise CallError(abi.EINVAL, f"{self.type}: version {version}, device is {self.version}")
        if self.is_open:
            raise CallError(abi.EBUSY, f"{self.type}: already open")
        self.mem = mem
        self.is_open = True
        self.broken = False

    def close(self) -> None:
        self.is_open = False

    # -- guest requests ---------------------------------------------------------------------
    def call(self, func: int, datap: int, length: int, flags: int) -> int:
        raise CallError(abi.EINVAL, f"{self.type}: no device call {func}")

    def shm(self, shm: Shm) -> None:
        """A region registered by the guest; attach it (an IOQ: check its layout)."""
        raise CallError(abi.EINVAL, f"{self.type}: no shared memory id {shm.id}")

    def poll(self) -> bool:
        """One busy-poll pass over the device's queues; True if it found work."""
        return False

    def signals(self) -> list[ShmSignal]:
        """The south sides of the device's signals (the bridge masks them to poll)."""
        return []

    def counters(self) -> dict[str, Any]:
        return {}

    # helpers for device calls
    def open_ioq(self, shm: Shm) -> Ioq:
        """The south side of an IOQ the guest registered, checked (magic, version, count
        against the region and the user's queue-size limit)."""
        assert self.mem is not None and shm.signal is not None
        q = Ioq(self.mem, shm.addr, SOUTH, length=shm.length, signal=shm.signal)
        if q.count > self.limits.max_queue_size:
            raise CallError(abi.EINVAL, f"{self.type}: IOQ of {q.count} descriptors "
                                        f"(limit {self.limits.max_queue_size})")
        return q

    def read_guest(self, addr: int, length: int) -> bytes:
        assert self.mem is not None
        try:
            return bytes(self.mem.view(addr, length))
        except GuestError as e:
            raise CallError(abi.EFAULT, str(e)) from None

    def write_guest(self, addr: int, data: bytes) -> None:
        assert self.mem is not None
        try:
            self.mem.view(addr, len(data))[:] = data
        except GuestError as e:
            raise CallError(abi.EFAULT, str(e)) from None
