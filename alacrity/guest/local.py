"""An in-process guest: the driver runs in the host process (tests, experiments).

Register accesses run on the machine's I/O thread, exactly where a process guest's exits
land; doorbells are the same eventfds. Only the process boundary is missing.
"""

from __future__ import annotations

from typing import Any

from alacrity.bus import Space
from alacrity.guest.access import GuestAccess
from alacrity.memory import Allocator


class LocalGuest(GuestAccess):
    def __init__(self, machine: Any, *, alloc_start: int = 1 << 20):
        super().__init__()
        self.host = machine
        self.extra_fds: list[int] = []
        self.mem = machine.mem
        self.alloc = Allocator(alloc_start, max(r.end for r in machine.mem.regions))
        desc, _ = machine.describe()
        self.devices = [dict(d, irq_fd=s.irq.fd) for d, s in zip(desc["devices"], machine.slots)]
        for ev in machine.bus.ioeventfds:
            self.add_doorbell(ev.space, ev.addr, ev.size, ev.datamatch, ev.fd)

    def _exit_read(self, space: int, addr: int, size: int) -> int:
        return self.host.io.call_sync(lambda: self.host.bus.read(Space(space), addr, size))

    def _exit_write(self, space: int, addr: int, size: int, value: int) -> None:
        self.host.io.call_sync(lambda: self.host.bus.write(Space(space), addr, size, value))
