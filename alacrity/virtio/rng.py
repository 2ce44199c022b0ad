"""virtio-rng (VIRTIO 1.x section 5.4): one request queue; each buffer is filled with
bytes from os.getrandom (at most MAX_FILL per request: the guest asks again for more)."""

from __future__ import annotations

import os

from alacrity.virtio import spec
from alacrity.virtio.chain import Chain
from alacrity.virtio.device import Handler, VirtioDevice

MAX_FILL = 64 * 1024


class VirtioRng(VirtioDevice):
    device_id = spec.ID_RNG
    name = "virtio-rng"
    num_queues = 1

    def __init__(self, *, queue_max: int = 64, source=os.getrandom):
        super().__init__()
        self.queue_max = queue_max
        self.source = source
        self.bytes_out = 0

    def handler(self, index: int) -> Handler | None:
        return self.handle if index == 0 else None

    def handle(self, c: Chain) -> int:
        want = min(c.write_len, MAX_FILL)
        if not want:
            return 0
        data = self.source(want)
        n = 0
        for v in c.writable:
            k = min(len(v), want - n)
            v[:k] = data[n:n + k]
            n += k
            if n == want:
                break
        self.bytes_out += n
        return n
