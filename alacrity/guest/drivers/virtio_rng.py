"""Guest-side virtio-rng driver."""

from __future__ import annotations

from typing import Any

from alacrity.errors import DeviceError
from alacrity.virtio import spec


class VirtioRngDriver:
    def __init__(self, transport: Any, *, buf_size: int = 4096, packed: bool = False):
        t = self.t = transport
        if t.device_id != spec.ID_RNG:
            raise DeviceError(f"device id {t.device_id} is not an entropy device")
        t.negotiate(spec.bit(spec.F_RING_PACKED) if packed else 0)
        self.q = t.setup_queue(0, 8)
        self.buf = t.m.alloc.alloc(buf_size, 64)
        self.view = t.m.mem.view(self.buf, buf_size)
        self.buf_size = buf_size
        t.driver_ok()

    def read(self, n: int, timeout: float = 10.0) -> bytes:
        """Exactly n random bytes from the device."""
        out = bytearray()
        while len(out) < n:
            want = min(n - len(out), self.buf_size)
            self.q.add([(self.buf, want)], 0, None)
            self.t.kick(0)
            while not self.q.has_used():
                if self.q.enable_cb():
                    break
                if not self.t.wait_interrupt(timeout):
                    raise TimeoutError("the entropy device did not answer")
                self.t.ack_interrupt()
            ((_, got),) = self.q.get_used()
            if got > want:
                raise DeviceError(f"device wrote {got} bytes into a {want}-byte buffer")
            out += self.view[:got]
        return bytes(out)
