import os
import subprocess
import sys

import pytest

from alacrity.errors import GuestError
from alacrity.memory import Allocator, GuestMemory, RegionInfo

MiB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory.create([(0, 4 * MiB), (4 * MiB, 2 * MiB), (16 * MiB, 1 * MiB)])
    yield m
    m.close()


def test_view_inside_each_region(mem):
    mem.view(0, 4 * MiB)[:4] = b"abcd"
    assert mem.read(0, 4) == b"abcd"
    mem.write(4 * MiB + 10, b"xy")
    assert mem.read(4 * MiB + 10, 2) == b"xy"
    assert len(mem.view(16 * MiB, MiB)) == MiB
    assert len(mem.view(17 * MiB, 0)) == 0  # empty range at the very end


@pytest.mark.parametrize("addr,length", [
    (4 * MiB - 2, 4),                 # spans two adjacent regions
    (6 * MiB, 1),                     # in the hole between regions
    (15 * MiB + MiB - 1, 2),          # starts in the hole, ends in a region
    (17 * MiB, 1),                    # just past the end
    (2**64 - 1, 2),                   # wraps past 2**64
    (2**64, 0),                       # not a 64-bit address
    (0, 2**64 + 1),                   # length beyond the address space
    (2**64 - 4096, 8192),             # wrap that lands back at 0 if truncated
    (-1, 1),
    (0, -1),
])
def test_view_rejects(mem, addr, length):
    with pytest.raises(GuestError):
        mem.view(addr, length)
    assert not mem.contains(addr, length)


def test_integer_helpers_little_endian(mem):
    mem.write_u16(100, 0x1234)
    mem.write_u32(104, 0xDEADBEEF)
    mem.write_u64(112, 0x0102030405060708)
    mem.write_u8(120, 0xFE)
    assert mem.read(100, 2) == b"\x34\x12"
    assert mem.read(112, 8) == bytes(range(8, 0, -1))
    assert (mem.read_u16(100), mem.read_u32(104), mem.read_u64(112), mem.read_u8(120)) == \
        (0x1234, 0xDEADBEEF, 0x0102030405060708, 0xFE)
    with pytest.raises(GuestError):
        mem.read_u32(4 * MiB - 2)


def test_overlapping_regions_refused():
    fd = os.memfd_create("t")
    os.ftruncate(fd, 2 * MiB)
    with pytest.raises(ValueError):
        GuestMemory.from_fds([RegionInfo(0, 2 * MiB, fd), RegionInfo(MiB, MiB, fd)])


def test_another_process_sees_the_same_ram(mem):
    """The memfd is the RAM: a second process maps it and sees our writes, and we see its."""
    mem.write(4096, b"from-host")
    r = mem.regions[0]
    code = (
        "import mmap, os, sys\n"
        f"m = mmap.mmap({r.fd}, {r.size}, mmap.MAP_SHARED)\n"
        "assert m[4096:4105] == b'from-host', m[4096:4105]\n"
        "m[8192:8202] = b'from-guest'\n"
    )
    subprocess.run([sys.executable, "-c", code], pass_fds=[r.fd], check=True)
    assert mem.read(8192, 10) == b"from-guest"


def test_allocator_alignment_and_exhaustion():
    a = Allocator(0x1000, 0x3000)
    assert a.alloc(10, 16) == 0x1000
    assert a.alloc(1, 4096) == 0x2000
    with pytest.raises(MemoryError):
        a.alloc(0x2000)
