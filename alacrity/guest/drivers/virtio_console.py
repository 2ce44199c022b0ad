"""Guest-side virtio-console driver (port 0): write bytes out, read bytes in."""

from __future__ import annotations

import time
from typing import Any

from alacrity.errors import DeviceError
from alacrity.virtio import console as C
from alacrity.virtio import spec


class VirtioConsoleDriver:
    def __init__(self, transport: Any, *, rx_buffers: int = 16, buf_size: int = 4096,
                 packed: bool = False):
        t = self.t = transport
        if t.device_id != spec.ID_CONSOLE:
            raise DeviceError(f"device id {t.device_id} is not a console")
        t.negotiate(spec.bit(C.F_EMERG_WRITE) | (spec.bit(spec.F_RING_PACKED) if packed else 0))
        self.rxq = t.setup_queue(C.RX, rx_buffers)
        self.txq = t.setup_queue(C.TX, 16)
        mem, alloc = t.m.mem, t.m.alloc.alloc
        self.rx_addr = [alloc(buf_size, 64) for _ in range(min(rx_buffers, self.rxq.size))]
        self.rx_view = [mem.view(a, buf_size) for a in self.rx_addr]
        self.rx_handles = [self.rxq.add([(a, buf_size)], 0, i, pin=True)
                           for i, a in enumerate(self.rx_addr)]
        self.tx_addr = alloc(buf_size, 64)
        self.tx_view = mem.view(self.tx_addr, buf_size)
        self.buf_size = buf_size
        t.driver_ok()
        t.kick(C.RX)

    def write(self, data: bytes) -> None:
        """Send bytes to the host, a buffer at a time, waiting for each to be taken."""
        for off in range(0, len(data), self.buf_size):
            chunk = data[off:off + self.buf_size]
            self.tx_view[:len(chunk)] = chunk
            self.txq.add([(self.tx_addr, len(chunk))], 1, off)
            self.t.kick(C.TX)
            self._wait(self.txq, 10.0)
            self.txq.get_used()

    def emergency_write(self, byte: int) -> None:
        self.t.m.write(0, self.t.base + 0x100 + 8, 4, byte)

    def read(self, n: int, timeout: float = 10.0) -> bytes:
        """At least one and at most n bytes... exactly n unless the timeout passes first."""
        out = bytearray()
        deadline = time.monotonic() + timeout
        while len(out) < n:
            got = self.rxq.get_used()
            for i, k in got:
                out += self.rx_view[i][:k]
                self.rxq.readd(self.rx_handles[i], i)
            if got:
                self.t.kick(C.RX)
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not self._wait(self.rxq, left):
                break
        return bytes(out)

    def _wait(self, q: Any, timeout: float) -> bool:
        if q.has_used():
            return True
        while not q.enable_cb():
            if not self.t.wait_interrupt(timeout):
                return False
            self.t.ack_interrupt()
            if q.has_used():
                break
        return True
