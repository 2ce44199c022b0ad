"""How guest-side drivers touch a machine, whatever kind of guest they run in: RAM
(`mem`, `alloc`), the device list, register accesses (exits) and doorbells (eventfds)."""

from __future__ import annotations

import os
import select
from typing import Any

from alacrity.bus import Space
from alacrity.memory import Allocator, GuestMemory


class GuestAccess:
    """Base of the guest-side machine views. Subclasses implement the two exits."""

    mem: GuestMemory
    alloc: Allocator
    devices: list[dict[str, Any]]

    def __init__(self) -> None:
        self.exits = 0
        self.doorbells = 0
        self._doorbells: dict[tuple[int, int, int], list[tuple[int | None, int]]] = {}

    def add_doorbell(self, space: int, addr: int, size: int, datamatch: int | None, fd: int) -> None:
        self._doorbells.setdefault((space, addr, size), []).append((datamatch, fd))

    def doorbell_fd(self, space: int, addr: int, size: int, value: int) -> int | None:
        """The eventfd a write of `value` at `addr` would signal, if it is a doorbell."""
        for match, fd in self._doorbells.get((space, addr, size), ()):
            if match is None or match == value:
                return fd
        return None

    def _exit_read(self, space: int, addr: int, size: int) -> int:
        raise NotImplementedError

    def _exit_write(self, space: int, addr: int, size: int, value: int) -> None:
        raise NotImplementedError

    def read(self, space: int, addr: int, size: int) -> int:
        self.exits += 1
        return self._exit_read(space, addr, size)

    def write(self, space: int, addr: int, size: int, value: int) -> None:
        """A register write: a doorbell goes straight to its eventfd, anything else exits."""
        fd = self.doorbell_fd(space, addr, size, value)
        if fd is not None:
            self.doorbells += 1
            os.eventfd_write(fd, 1)
            return
        self.exits += 1
        self._exit_write(space, addr, size, value)

    def mmio_read(self, addr: int, size: int = 4) -> int:
        return self.read(Space.MMIO, addr, size)

    def mmio_write(self, addr: int, value: int, size: int = 4) -> None:
        self.write(Space.MMIO, addr, size, value)

    def mark(self, name: str, **data: Any) -> None:
        """A measurement point (process guests tell the host; others ignore it)."""


def wait_fd(fd: int, timeout: float | None = None) -> bool:
    """Block until `fd` is readable (how a guest waits for an interrupt)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else int(timeout * 1000)))
