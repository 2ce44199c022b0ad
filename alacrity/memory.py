"""Guest memory: regions of guest-physical address space backed by memfds.

This module is the only way any code touches guest RAM. A region is a memfd mapped
MAP_SHARED, so a process guest, a KVM VM or a vhost-user peer can map the very same pages.
Every translation of a guest (address, length) pair is checked here: the whole range must
lie inside one region, and nothing may wrap past 2**64.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

from alacrity.errors import GuestError

U64_LIMIT = 1 << 64

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# A full memory barrier (StoreLoad included). x86 keeps stores in order and loads in order,
# but a load may pass an earlier store to another address. The virtio and shm-signal
# "publish, then check whether the peer wants a notification" steps need that order, or
# both sides can miss each other and sleep forever. Python has no fence instruction; an
# uncontended lock acquire/release executes a locked read-modify-write (sem_trywait /
# sem_post in CPython's lock), which is a full barrier on x86.
_FENCE = threading.Lock()


def full_barrier() -> None:
    """Order every earlier load/store before every later one (an mfence, in effect)."""
    _FENCE.acquire()
    _FENCE.release()


@dataclass(frozen=True)
class RegionInfo:
    """What another process needs to map a region: where it is and which fd backs it."""

    gpa: int
    size: int
    fd: int
    fd_offset: int = 0


class Region:
    """One contiguous range of guest-physical memory."""

    __slots__ = ("gpa", "size", "end", "fd", "fd_offset", "mmap", "mv", "owns_fd")

    def __init__(self, gpa: int, size: int, fd: int, fd_offset: int = 0, owns_fd: bool = True):
        if size <= 0:
            raise ValueError(f"region at {gpa:#x} has size {size}")
        if gpa < 0 or gpa + size > U64_LIMIT:
            raise ValueError(f"region {gpa:#x}+{size:#x} is outside the 64-bit address space")
        self.gpa = gpa
        self.size = size
        self.end = gpa + size
        self.fd = fd
        self.fd_offset = fd_offset
        self.owns_fd = owns_fd
        self.mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=fd_offset)
        self.mv = memoryview(self.mmap)

    def info(self) -> RegionInfo:
        return RegionInfo(self.gpa, self.size, self.fd, self.fd_offset)

    def close(self) -> None:
        try:
            self.mv.release()
            self.mmap.close()
        except BufferError:
            # A view is still exported (a ring or a pending I/O holds it); the mapping is
            # released when the last view goes away.
            pass
        if self.owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuestMemory:
    """Guest RAM: a sorted set of non-overlapping regions with checked translation."""

    def __init__(self, regions: Iterable[Region]):
        self.regions: list[Region] = sorted(regions, key=lambda r: r.gpa)
        if not self.regions:
            raise ValueError("guest memory needs at least one region")
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end > b.gpa:
                raise ValueError(f"regions at {a.gpa:#x} and {b.gpa:#x} overlap")
        self._starts = [r.gpa for r in self.regions]
        self._r0 = self.regions[0]

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, layout: Sequence[tuple[int, int]], name: str = "alacrity-ram") -> "GuestMemory":
        """New RAM: one memfd per (gpa, size) region, zero-filled."""
        regions = []
        for gpa, size in layout:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            regions.append(Region(gpa, size, fd))
        return cls(regions)

    @classmethod
    def from_fds(cls, infos: Sequence[RegionInfo], owns_fds: bool = True) -> "GuestMemory":
        """Map RAM that another process created (process guest, vhost-user)."""
        return cls(Region(i.gpa, i.size, i.fd, i.fd_offset, owns_fds) for i in infos)

    def infos(self) -> list[RegionInfo]:
        return [r.info() for r in self.regions]

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def close(self) -> None:
        for r in self.regions:
            r.close()

    # -- translation --------------------------------------------------------------------
    def view(self, addr: int, length: int) -> memoryview:
        """A writable view of guest memory [addr, addr+length), or GuestError.

        The range must lie entirely inside one region. Python integers do not overflow, so
        `addr + length` is exact; a range that would wrap past 2**64 ends beyond every region.
        """
        r = self._r0
        off = addr - r.gpa
        if off >= 0 and length >= 0 and off + length <= r.size:
            return r.mv[off:off + length]
        return self._view_slow(addr, length)

    def _view_slow(self, addr: int, length: int) -> memoryview:
        if addr < 0 or length < 0 or addr >= U64_LIMIT or addr + length > U64_LIMIT:
            raise GuestError(f"guest range {addr:#x}+{length:#x} wraps the 64-bit address space")
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self.regions[i]
            off = addr - r.gpa
            if off + length <= r.size:
                return r.mv[off:off + length]
        raise GuestError(f"guest range {addr:#x}+{length:#x} is not inside guest RAM")

    def contains(self, addr: int, length: int) -> bool:
        try:
            self.view(addr, length)
        except GuestError:
            return False
        return True

    # -- little-endian helpers (slow path: config, setup, tests) --------------------------
    # These use struct.pack_into, which zeroes the target before writing: never use them to
    # publish an index or flag the other side is watching (use a cast memoryview store).
    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.view(addr, len(data))[:] = data

    def read_u8(self, addr: int) -> int:
        return _U8.unpack_from(self.view(addr, 1))[0]

    def read_u16(self, addr: int) -> int:
        return _U16.unpack_from(self.view(addr, 2))[0]

    def read_u32(self, addr: int) -> int:
        return _U32.unpack_from(self.view(addr, 4))[0]

    def read_u64(self, addr: int) -> int:
        return _U64.unpack_from(self.view(addr, 8))[0]

    def write_u8(self, addr: int, value: int) -> None:
        _U8.pack_into(self.view(addr, 1), 0, value)

    def write_u16(self, addr: int, value: int) -> None:
        _U16.pack_into(self.view(addr, 2), 0, value)

    def write_u32(self, addr: int, value: int) -> None:
        _U32.pack_into(self.view(addr, 4), 0, value)

    def write_u64(self, addr: int, value: int) -> None:
        _U64.pack_into(self.view(addr, 8), 0, value)


class Allocator:
    """A bump allocator over a range of guest RAM, for drivers that lay out their rings and
    buffers (guest side only; the host never allocates guest memory)."""

    def __init__(self, start: int, end: int):
        self.start = start
        self.next = start
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError(f"guest allocator exhausted: {size} bytes wanted, "
                              f"{self.end - addr} left")
        self.next = addr + size
        return addr
