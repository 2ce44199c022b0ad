"""virtio-console (VIRTIO 1.x section 5.3), port 0 only: receiveq (0) and transmitq (1).
Optional VIRTIO_CONSOLE_F_EMERG_WRITE: a byte written to config emerg_wr goes out at once."""

from __future__ import annotations

import struct

from alacrity.devices.console import ConsoleCore
from alacrity.virtio import spec
from alacrity.virtio.chain import Chain
from alacrity.virtio.device import Handler, VirtioDevice, VirtQueue

F_SIZE = 0
F_MULTIPORT = 1
F_EMERG_WRITE = 2

CONFIG = struct.Struct("<HHII")   # cols, rows, max_nr_ports, emerg_wr
RX, TX = 0, 1


class VirtioConsole(VirtioDevice):
    device_id = spec.ID_CONSOLE
    name = "virtio-console"
    num_queues = 2

    def __init__(self, core: ConsoleCore, *, queue_max: int = 64):
        super().__init__()
        self.core = core
        self.queue_max = queue_max
        self.rxq: VirtQueue | None = None
        core.on_rx = lambda: self.schedule(self.pump)

    def device_features(self) -> int:
        return spec.bit(F_EMERG_WRITE)

    def config(self) -> bytes:
        return CONFIG.pack(0, 0, 1, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == 8 and self.features & spec.bit(F_EMERG_WRITE):
            self.core.output(data[:1])

    def handler(self, index: int) -> Handler | None:
        return self.handle_tx if index == TX else None

    def kick(self, index: int) -> bool:
        if index == RX and self.rxq is not None:
            self.rxq.ring.disable_notify()
            return self.pump()
        return False

    def activate(self, queues: list[VirtQueue | None]) -> None:
        self.rxq = queues[RX]
        if self.core.backlog:
            self.schedule(self.pump)

    def reset(self) -> None:
        super().reset()
        self.rxq = None

    def handle_tx(self, c: Chain) -> int:
        for v in c.readable:           # written from guest memory: no copy of the guest's size
            if len(v):
                self.core.output(v)
        return 0

    def pump(self) -> bool:
        """Move waiting input into receive buffers (each filled as far as it goes)."""
        vq = self.rxq
        data = self.core.backlog
        if vq is None or not data:
            return False
        ring = vq.ring
        done: list[Chain] = []
        lens: list[int] = []
        for c in ring.pop(vq.budget):
            n = 0
            for v in c.writable:
                k = min(len(v), len(data) - n)
                v[:k] = data[n:n + k]
                n += k
            del data[:n]
            done.append(c)
            lens.append(n)
            if not data:
                break
        if done:
            ring.push_many(done, lens)
            vq.complete(len(done))
        if data:
            return True if done else ring.enable_notify()
        return False
