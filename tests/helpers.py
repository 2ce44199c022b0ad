"""Test helpers: hand-built rings (a driver that writes whatever the test tells it to)."""

from __future__ import annotations

import struct
import time
from typing import Callable

from alacrity.memory import GuestMemory
from alacrity.virtio.spec import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT


class RawRing:
    """A split ring laid out by hand at fixed addresses; no checks on what it writes."""

    def __init__(self, mem: GuestMemory, size: int, base: int = 0x10000):
        self.mem = mem
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.avail_idx = 0

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                 table: int | None = None) -> None:
        base = self.desc if table is None else table
        DESC.pack_into(self.mem.view(base + 16 * i, 16), 0, addr, length, flags, nxt)

    def make_available(self, *heads: int) -> None:
        for h in heads:
            self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def used_flags(self) -> int:
        return self.mem.read_u16(self.used)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    def used_elem(self, slot: int) -> tuple[int, int]:
        a = self.used + 4 + 8 * (slot % self.size)
        return self.mem.read_u32(a), self.mem.read_u32(a + 4)


def mmio_bring_up(dev, features: int, queues: list[tuple[int, int, int, int]],
                  driver_ok: bool = True) -> None:
    """Program a VirtioMmioDevice through its registers as a well-behaved driver would:
    reset, ACK, DRIVER, features, FEATURES_OK, each (size, desc, avail, used), DRIVER_OK
    (unless driver_ok=False: a test that watches queue setup stops before it)."""
    from alacrity.virtio import mmio as R
    from alacrity.virtio import spec

    dev.write(R.R_STATUS, 4, 0)
    dev.write(R.R_STATUS, 4, spec.ACKNOWLEDGE)
    dev.write(R.R_STATUS, 4, spec.ACKNOWLEDGE | spec.DRIVER)
    for sel in (0, 1):
        dev.write(R.R_DRIVER_FEATURES_SEL, 4, sel)
        dev.write(R.R_DRIVER_FEATURES, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
    status = spec.ACKNOWLEDGE | spec.DRIVER | spec.FEATURES_OK
    dev.write(R.R_STATUS, 4, status)
    assert dev.read(R.R_STATUS, 4) & spec.FEATURES_OK, "features refused"
    for qi, (size, desc, avail, used) in enumerate(queues):
        dev.write(R.R_QUEUE_SEL, 4, qi)
        dev.write(R.R_QUEUE_NUM, 4, size)
        for reg, addr in ((R.R_QUEUE_DESC_LOW, desc), (R.R_QUEUE_DRIVER_LOW, avail),
                          (R.R_QUEUE_DEVICE_LOW, used)):
            dev.write(reg, 4, addr & 0xFFFFFFFF)
            dev.write(reg + 4, 4, addr >> 32)
        dev.write(R.R_QUEUE_READY, 4, 1)
    if driver_ok:
        dev.write(R.R_STATUS, 4, status | spec.DRIVER_OK)


class RawPackedRing:
    """A packed ring written by hand: the test decides every flag, id and wrap bit."""

    AVAIL, USED = 1 << 7, 1 << 15

    def __init__(self, mem: GuestMemory, size: int, base: int = 0x10000):
        self.mem = mem
        self.size = size
        self.desc = base
        self.driver = base + 16 * size
        self.device = self.driver + 64
        self.pos = 0
        self.wrap = 1

    def avail_flags(self, wrap: int | None = None) -> int:
        w = self.wrap if wrap is None else wrap
        return self.AVAIL if w else self.USED

    def put(self, addr: int, length: int, bid: int, flags: int, slot: int | None = None) -> int:
        """Write one descriptor at `slot` (default: the next position) with `flags` exactly."""
        s = self.pos if slot is None else slot
        DESC.pack_into(self.mem.view(self.desc + 16 * s, 16), 0, addr, length, bid, flags)
        return s

    def offer(self, elems: list[tuple[int, int, bool]], bid: int) -> int:
        """Make one buffer available the proper way (head flags last). Returns its slot."""
        head = self.pos
        head_flags = 0
        for j, (a, n, writable) in enumerate(elems):
            f = self.avail_flags() | (WRITE if writable else 0) | (NEXT if j < len(elems) - 1 else 0)
            if j == 0:
                head_flags = f
                self.put(a, n, bid, 0)
            else:
                self.put(a, n, bid, f)
            self.pos += 1
            if self.pos == self.size:
                self.pos = 0
                self.wrap ^= 1
        self.mem.write_u16(self.desc + 16 * head + 14, head_flags)
        return head

    def slot(self, s: int) -> tuple[int, int, int, int]:
        return DESC.unpack_from(self.mem.view(self.desc + 16 * s, 16))

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        self.mem.write_u32(self.driver, off_wrap | flags << 16)

    def device_event(self) -> tuple[int, int]:
        v = self.mem.read_u32(self.device)
        return v & 0xFFFF, v >> 16


def until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait for work another thread does (the I/O thread) to show."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)
