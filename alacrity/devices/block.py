"""The block device core and its backends. No ring code here: virtio-blk and vblock frame
requests their own way and call the same `BlockCore`.

Backends move bytes straight between the image and views of guest memory (`os.preadv` /
`os.pwritev` into the views: no bounce buffer). FLUSH is `os.fdatasync`: once a FLUSH
completes, every write completed before it is on stable storage. Writes that were not
followed by a completed FLUSH may be lost if the host dies.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from enum import IntEnum
from typing import Sequence

log = logging.getLogger("alacrity.block")

SECTOR = 512
IOV_MAX = 1024
ID_BYTES = 20

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class Status(IntEnum):
    """Result of a block request (the same values as VIRTIO_BLK_S_*, which vblock reuses)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


def _total(views: Sequence[memoryview]) -> int:
    return sum(len(v) for v in views)


def _advance(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """The views that remain after the first n bytes were transferred."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


class BlockBackend:
    """Where the bytes live. Offsets and lengths arrive already checked by BlockCore."""

    kind = "backend"
    capacity = 0          # bytes, a multiple of SECTOR
    read_only = False

    def readv(self, offset: int, views: Sequence[memoryview]) -> None:
        raise NotImplementedError

    def writev(self, offset: int, views: Sequence[memoryview]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        pass

    def write_zeroes(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NullBackend(BlockBackend):
    """Completes every request at once and moves no data: a benchmark of the ABI alone."""

    kind = "null"

    def __init__(self, capacity: int = 1 << 30, read_only: bool = False):
        self.capacity = capacity - capacity % SECTOR
        self.read_only = read_only

    def readv(self, offset: int, views: Sequence[memoryview]) -> None:
        pass

    def writev(self, offset: int, views: Sequence[memoryview]) -> None:
        pass

    def write_zeroes(self, offset: int, length: int) -> None:
        pass


class FileBackend(BlockBackend):
    """A raw image: a regular file or a block device."""

    kind = "file"

    def __init__(self, path: str, read_only: bool = False):
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(path, flags)
        size = os.lseek(self.fd, 0, os.SEEK_END)
        self.capacity = size - size % SECTOR

    def _iov(self, fn, offset: int, views: Sequence[memoryview], what: str) -> None:
        views = [v for v in views if len(v)]
        while views:
            chunk = views[:IOV_MAX]
            want = _total(chunk)
            n = fn(self.fd, chunk, offset)
            if n <= 0:
                raise OSError(errno.EIO, f"short {what} at offset {offset}")
            offset += n
            views = _advance(chunk, n) + views[IOV_MAX:] if n < want else views[IOV_MAX:]

    def readv(self, offset: int, views: Sequence[memoryview]) -> None:
        self._iov(os.preadv, offset, views, "read")

    def writev(self, offset: int, views: Sequence[memoryview]) -> None:
        self._iov(os.pwritev, offset, views, "write")

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def _falloc(self, mode: int, offset: int, length: int) -> bool:
        if _fallocate(self.fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            return False
        raise OSError(err, os.strerror(err))

    def discard(self, offset: int, length: int) -> None:
        # advisory: where the file system cannot punch holes, discard does nothing
        self._falloc(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self._falloc(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        zeros = bytes(min(length, 1 << 20))
        while length:
            n = os.pwrite(self.fd, zeros[:min(length, len(zeros))], offset)
            offset += n
            length -= n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BlockCore:
    """A block device without a transport: range and permission checks, then the backend.

    Every method returns a Status; backend errors become IOERR with one log line, so no
    exception reaches a device loop from here.
    """

    def __init__(self, backend: BlockBackend, serial: str = "alacrity"):
        self.backend = backend
        self.serial = serial.encode()[:ID_BYTES]
        self.errors = 0
        self.flushes = 0            # completed: every write acknowledged before is on disk

    @property
    def capacity_sectors(self) -> int:
        return self.backend.capacity // SECTOR

    @property
    def read_only(self) -> bool:
        return self.backend.read_only

    def device_id(self) -> bytes:
        return self.serial.ljust(ID_BYTES, b"\0")

    def put_id(self, views: Sequence[memoryview]) -> int:
        """Scatter the 20-byte device id over `views` (GET_ID); returns the bytes written."""
        ident = self.device_id()
        n = 0
        for v in views:
            k = min(len(v), ID_BYTES - n)
            v[:k] = ident[n:n + k]
            n += k
            if n == ID_BYTES:
                break
        return n

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return 0 <= sector and sector * SECTOR + nbytes <= self.backend.capacity

    def _io_error(self, what: str, e: OSError) -> Status:
        self.errors += 1
        if self.errors <= 10:
            log.error("%s backend %s failed: %s", self.backend.kind, what, e)
        return Status.IOERR

    def read(self, sector: int, views: Sequence[memoryview], nbytes: int | None = None) -> Status:
        n = _total(views) if nbytes is None else nbytes
        if n % SECTOR or sector < 0 or sector * SECTOR + n > self.backend.capacity:
            return Status.IOERR
        try:
            self.backend.readv(sector * SECTOR, views)
        except OSError as e:
            return self._io_error("read", e)
        return Status.OK

    def write(self, sector: int, views: Sequence[memoryview], nbytes: int | None = None) -> Status:
        n = _total(views) if nbytes is None else nbytes
        if self.read_only or n % SECTOR or sector < 0 or sector * SECTOR + n > self.backend.capacity:
            return Status.IOERR
        try:
            self.backend.writev(sector * SECTOR, views)
        except OSError as e:
            return self._io_error("write", e)
        return Status.OK

    def flush(self) -> Status:
        try:
            self.backend.flush()
        except OSError as e:
            return self._io_error("flush", e)
        self.flushes += 1
        return Status.OK

    def discard(self, sector: int, count: int) -> Status:
        if self.read_only or not self._in_range(sector, count * SECTOR):
            return Status.IOERR
        try:
            self.backend.discard(sector * SECTOR, count * SECTOR)
        except OSError as e:
            return self._io_error("discard", e)
        return Status.OK

    def write_zeroes(self, sector: int, count: int) -> Status:
        if self.read_only or not self._in_range(sector, count * SECTOR):
            return Status.IOERR
        try:
            self.backend.write_zeroes(sector * SECTOR, count * SECTOR)
        except OSError as e:
            return self._io_error("write-zeroes", e)
        return Status.OK


def open_backend(spec: str, read_only: bool = False, null_size: int = 1 << 30) -> BlockBackend:
    """`null` or a path to an image file."""
    if spec == "null":
        return NullBackend(null_size, read_only)
    return FileBackend(spec, read_only)
