"""An in-process guest: the driver runs in the host process (tests, experiments).

Register accesses run on the machine's I/O thread, exactly where a process guest's exits
land; doorbells are the same eventfds. Only the process boundary is missing.
"""

from __future__ import annotations

import os
from typing import Any

from alacrity.bus import Space
from alacrity.memory import Allocator


class LocalGuest:
    def __init__(self, machine: Any, *, alloc_start: int = 1 << 20):
        self.host = machine
        self.mem = machine.mem
        top = max(r.end for r in machine.mem.regions)
        self.alloc = Allocator(alloc_start, top)
        desc, _ = machine.describe()
        self.devices = [dict(d, irq_fd=s.irq.fd) for d, s in zip(desc["devices"], machine.slots)]
        self.exits = 0
        self.doorbells = 0

    def doorbell_fd(self, space: int, addr: int, size: int, value: int) -> int | None:
        for ev in self.host.bus.ioeventfds:
            if ev.matches(space, addr, size, value):
                return ev.fd
        return None

    def read(self, space: int, addr: int, size: int) -> int:
        self.exits += 1
        return self.host.io.call_sync(lambda: self.host.bus.read(Space(space), addr, size))

    def write(self, space: int, addr: int, size: int, value: int) -> None:
        fd = self.doorbell_fd(space, addr, size, value)
        if fd is not None:
            self.doorbells += 1
            os.eventfd_write(fd, 1)
            return
        self.exits += 1
        self.host.io.call_sync(lambda: self.host.bus.write(Space(space), addr, size, value))

    def mark(self, name: str) -> None:
        pass
