"""The address space and the two kinds of signal.

`Bus` maps MMIO and PIO ranges to handlers; a vCPU exit (KVM) or a register access on a
process guest's control socket lands in `Bus.read`/`Bus.write`. Doorbells are eventfds
registered for an address (and optionally a value), exactly as KVM_IOEVENTFD does: the guest
writes them without an exit. Interrupts are eventfds too (KVM_IRQFD's role). Every doorbell
and interrupt, sent or suppressed, is counted per queue in a `QueueStats`.
"""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Protocol

log = logging.getLogger("alacrity.bus")


class Space(IntEnum):
    MMIO = 0
    PIO = 1


class Handler(Protocol):
    """A device's register window. Offsets are relative to the window's base."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class QueueStats:
    """Signal counters of one queue, kept by whichever side owns the object.

    The device side counts doorbells it received and interrupts it sent or suppressed; the
    driver side counts doorbells it sent or suppressed and interrupts it received.
    """

    __slots__ = ("doorbells", "doorbells_suppressed", "interrupts", "interrupts_suppressed",
                 "requests", "batches")

    def __init__(self) -> None:
        self.doorbells = 0
        self.doorbells_suppressed = 0
        self.interrupts = 0
        self.interrupts_suppressed = 0
        self.requests = 0
        self.batches = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}

    def reset(self) -> None:
        for k in self.__slots__:
            setattr(self, k, 0)


@dataclass
class IoEventFd:
    """A doorbell: a write of `size` bytes (equal to `datamatch` unless None) at `addr`
    in `space` increments `fd` instead of exiting."""

    space: Space
    addr: int
    size: int
    datamatch: int | None
    fd: int
    on_signal: Callable[[int], None]  # called on the host with the eventfd count

    def matches(self, space: int, addr: int, size: int, value: int) -> bool:
        return (space == self.space and addr == self.addr and size == self.size
                and (self.datamatch is None or value == self.datamatch))


class IrqLine:
    """An interrupt as an eventfd: the host writes it, the guest (or KVM's irqfd) consumes it."""

    def __init__(self, gsi: int) -> None:
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def signal(self) -> None:
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Range:
    base: int
    size: int
    handler: Handler
    name: str
    exits: int = 0


@dataclass
class Bus:
    """MMIO and PIO address spaces, plus the doorbells registered on them."""

    _ranges: dict[Space, list[_Range]] = field(default_factory=lambda: {Space.MMIO: [], Space.PIO: []})
    ioeventfds: list[IoEventFd] = field(default_factory=list)
    unhandled: int = 0

    def map(self, space: Space, base: int, size: int, handler: Handler, name: str) -> None:
        ranges = self._ranges[space]
        for r in ranges:
            if base < r.base + r.size and r.base < base + size:
                raise ValueError(f"{name} at {base:#x}+{size:#x} overlaps {r.name}")
        ranges.append(_Range(base, size, handler, name))
        ranges.sort(key=lambda r: r.base)

    def _find(self, space: Space, addr: int, size: int) -> _Range | None:
        ranges = self._ranges[space]
        i = bisect.bisect_right([r.base for r in ranges], addr) - 1
        if i >= 0:
            r = ranges[i]
            if addr + size <= r.base + r.size:
                return r
        return None

    def read(self, space: Space, addr: int, size: int) -> int:
        """One guest read exit. Unmapped addresses read as all-ones, like an empty bus."""
        r = self._find(space, addr, size)
        if r is None:
            self._unhandled("read", space, addr, size)
            return (1 << (8 * size)) - 1
        r.exits += 1
        return r.handler.read(addr - r.base, size)

    def write(self, space: Space, addr: int, size: int, value: int) -> None:
        """One guest write exit. A write matching a registered doorbell signals it (this is
        the slow path of a doorbell: a process guest normally writes the eventfd itself)."""
        for ev in self.ioeventfds:
            if ev.matches(space, addr, size, value):
                os.eventfd_write(ev.fd, 1)
                return
        r = self._find(space, addr, size)
        if r is None:
            self._unhandled("write", space, addr, size)
            return
        r.exits += 1
        r.handler.write(addr - r.base, size, value)

    def _unhandled(self, what: str, space: Space, addr: int, size: int) -> None:
        self.unhandled += 1
        if self.unhandled <= 10:
            log.warning("guest %s of %d bytes at unmapped %s address %#x", what, size,
                        space.name, addr)

    def add_ioeventfd(self, ev: IoEventFd) -> None:
        self.ioeventfds.append(ev)

    def remove_ioeventfd(self, ev: IoEventFd) -> None:
        self.ioeventfds.remove(ev)

    def exits(self) -> dict[str, int]:
        """Register-access exits per mapped window (a KVM or process-guest exit each)."""
        return {r.name: r.exits for rs in self._ranges.values() for r in rs}
