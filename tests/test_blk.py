"""virtio-blk on a real image file: every request type, and every malformed request the
issue lists. Malformed requests complete with IOERR or UNSUPP; the device keeps going."""

import os
import struct

import pytest

from alacrity.bus import IrqLine
from alacrity.devices.block import BlockCore, FileBackend, NullBackend
from alacrity.memory import GuestMemory
from alacrity.virtio import blk as B
from alacrity.virtio import spec
from alacrity.virtio.mmio import VirtioMmioDevice

from tests.helpers import NEXT, WRITE, RawRing, mmio_bring_up

SECTORS = 64
HDR, DATA, STATUS = 0x20000, 0x30000, 0x40000
V1 = spec.bit(spec.F_VERSION_1)


class Disk:
    def __init__(self, path, read_only=False, null=False):
        self.mem = GuestMemory.create([(0, 1 << 20)])
        self.irq = IrqLine(5)
        backend = NullBackend(SECTORS * 512) if null else FileBackend(str(path), read_only)
        self.backend = backend
        self.dev = VirtioMmioDevice(B.VirtioBlk(BlockCore(backend, serial="disk-42")),
                                    self.mem, self.irq)
        self.ring = RawRing(self.mem, 16, base=0x10000)
        self.ring.avail, self.ring.used = 0x11000, 0x12000
        mmio_bring_up(self.dev, V1, [(16, 0x10000, 0x11000, 0x12000)])
        self.n = 0

    def request(self, parts):
        """parts: (addr, len, writable) in order. Returns (status byte, used length)."""
        self.mem.write_u8(STATUS, 0xEE)
        for i, (a, n, w) in enumerate(parts):
            last = i == len(parts) - 1
            self.ring.set_desc(i, a, n, (WRITE if w else 0) | (0 if last else NEXT), i + 1)
        self.ring.make_available(0)
        self.dev.notify(0)
        self.n += 1
        assert self.ring.used_idx() == self.n, "request was not completed"
        head, length = self.ring.used_elem(self.n - 1)
        assert head == 0
        assert not self.dev.broken, self.dev.last_error
        return self.mem.read_u8(STATUS), length

    def header(self, rtype, sector=0):
        self.mem.write(HDR, struct.pack("<IIQ", rtype, 0, sector))

    def simple(self, rtype, sector=0, nbytes=512, data_writable=None):
        self.header(rtype, sector)
        parts = [(HDR, 16, False)]
        if nbytes:
            w = (rtype != B.T_OUT) if data_writable is None else data_writable
            parts.append((DATA, nbytes, w))
        parts.append((STATUS, 1, True))
        return self.request(parts)

    def close(self):
        self.backend.close()
        self.irq.close()
        self.mem.close()


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SECTORS * 512))
    return p


@pytest.fixture
def disk(image):
    d = Disk(image)
    yield d
    d.close()


def test_read(disk, image):
    st, n = disk.simple(B.T_IN, 3, 1024)
    assert (st, n) == (B.S_OK, 1025)
    assert disk.mem.read(DATA, 1024) == image.read_bytes()[3 * 512:5 * 512]


def test_write_and_flush(disk, image, monkeypatch):
    payload = os.urandom(1536)
    disk.mem.write(DATA, payload)
    assert disk.simple(B.T_OUT, 10, 1536) == (B.S_OK, 1)
    assert image.read_bytes()[10 * 512:13 * 512] == payload
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    assert disk.simple(B.T_FLUSH, 0, 0) == (B.S_OK, 1)
    assert synced == [disk.backend.fd]


def test_header_split_across_descriptors_and_status_sharing_data(disk, image):
    disk.header(B.T_IN, 1)
    st, n = disk.request([(HDR, 5, False), (HDR + 5, 11, False), (DATA, 300, True),
                          (DATA + 300, 212, True), (STATUS - 512, 513, True)])
    assert st == B.S_OK and n == 1025
    got = disk.mem.read(DATA, 512) + disk.mem.read(STATUS - 512, 512)
    assert got == image.read_bytes()[512:1536]


def test_get_id(disk):
    st, n = disk.simple(B.T_GET_ID, 0, 20)
    assert st == B.S_OK and n == 21
    assert disk.mem.read(DATA, 20) == b"disk-42".ljust(20, b"\0")


def test_write_zeroes_and_discard(disk, image):
    seg = struct.pack("<QII", 4, 3, 0)
    disk.mem.write(DATA, seg)
    assert disk.simple(B.T_WRITE_ZEROES, 0, 16, data_writable=False) == (B.S_OK, 1)
    assert image.read_bytes()[4 * 512:7 * 512] == bytes(3 * 512)
    disk.mem.write(DATA, struct.pack("<QII", 8, 2, 0))
    assert disk.simple(B.T_DISCARD, 0, 16, data_writable=False)[0] == B.S_OK
    disk.mem.write(DATA, struct.pack("<QII", 8, 2, 1))       # discard takes no flags
    assert disk.simple(B.T_DISCARD, 0, 16, data_writable=False)[0] == B.S_UNSUPP
    disk.mem.write(DATA, struct.pack("<QII", SECTORS - 1, 2, 0))
    assert disk.simple(B.T_WRITE_ZEROES, 0, 16, data_writable=False)[0] == B.S_IOERR


@pytest.mark.parametrize("case,expect", [
    ("header-too-short", B.S_IOERR),
    ("sector-beyond-capacity", B.S_IOERR),
    ("range-crosses-capacity", B.S_IOERR),
    ("huge-sector", B.S_IOERR),
    ("in-with-readable-data", B.S_IOERR),
    ("out-with-writable-data", B.S_IOERR),
    ("length-not-sector-multiple", B.S_IOERR),
    ("unknown-type", B.S_UNSUPP),
    ("get-id-with-readable-data", B.S_IOERR),
    ("discard-segment-bytes-not-multiple-of-16", B.S_IOERR),
])
def test_malformed_requests_complete_with_an_error(disk, image, case, expect):
    before = image.read_bytes()
    if case == "header-too-short":
        disk.header(B.T_IN)
        st, _ = disk.request([(HDR, 8, False), (DATA, 512, True), (STATUS, 1, True)])
    elif case == "sector-beyond-capacity":
        st, _ = disk.simple(B.T_IN, SECTORS, 512)
    elif case == "range-crosses-capacity":
        st, _ = disk.simple(B.T_OUT, SECTORS - 1, 1024)
    elif case == "huge-sector":
        st, _ = disk.simple(B.T_IN, 2**64 - 1, 512)
    elif case == "in-with-readable-data":
        st, _ = disk.simple(B.T_IN, 0, 512, data_writable=False)
    elif case == "out-with-writable-data":
        st, _ = disk.simple(B.T_OUT, 0, 512, data_writable=True)
    elif case == "length-not-sector-multiple":
        st, _ = disk.simple(B.T_OUT, 0, 100)
    elif case == "unknown-type":
        st, _ = disk.simple(77, 0, 512)
    elif case == "get-id-with-readable-data":
        st, _ = disk.simple(B.T_GET_ID, 0, 20, data_writable=False)
    elif case == "discard-segment-bytes-not-multiple-of-16":
        st, _ = disk.simple(B.T_DISCARD, 0, 24, data_writable=False)
    assert st == expect
    assert image.read_bytes() == before
    assert not disk.dev.broken
    # the device still serves a good request afterwards
    assert disk.simple(B.T_IN, 0, 512)[0] == B.S_OK


def test_no_status_byte_completes_with_zero_length(disk):
    disk.header(B.T_IN)
    st, n = disk.request([(HDR, 16, False), (DATA, 512, False)])
    assert n == 0 and st == 0xEE          # nowhere to put a status: nothing written
    assert disk.dev.model.malformed == 1


def test_read_only_image(image):
    d = Disk(image, read_only=True)
    try:
        assert d.dev.offered & spec.bit(B.F_RO)
        before = image.read_bytes()
        d.mem.write(DATA, os.urandom(512))
        assert d.simple(B.T_OUT, 0, 512)[0] == B.S_IOERR
        d.mem.write(DATA, struct.pack("<QII", 0, 1, 0))
        assert d.simple(B.T_WRITE_ZEROES, 0, 16, data_writable=False)[0] == B.S_IOERR
        assert d.simple(B.T_DISCARD, 0, 16, data_writable=False)[0] == B.S_IOERR
        assert image.read_bytes() == before
        assert d.simple(B.T_IN, 0, 512)[0] == B.S_OK
        assert d.simple(B.T_FLUSH, 0, 0)[0] == B.S_OK
    finally:
        d.close()


def test_backend_failure_is_ioerr_not_a_crash(image):
    d = Disk(image)
    try:
        os.truncate(image, 512)           # the image shrinks under the device
        st, n = d.simple(B.T_IN, 10, 512)
        assert st == B.S_IOERR and n == 1
        assert not d.dev.broken
    finally:
        d.close()


def test_null_backend_moves_no_data(tmp_path):
    d = Disk(None, null=True)
    try:
        d.mem.write(DATA, b"x" * 512)
        assert d.simple(B.T_IN, 0, 512) == (B.S_OK, 513)
        assert d.mem.read(DATA, 512) == b"x" * 512
        assert d.simple(B.T_OUT, SECTORS, 512)[0] == B.S_IOERR
    finally:
        d.close()


def test_config_fields(disk):
    cfg = disk.dev.model.config()
    assert len(cfg) == 60
    cap, size_max, seg_max = struct.unpack_from("<QII", cfg)
    assert (cap, size_max, seg_max) == (SECTORS, 1 << 22, 254)
    assert struct.unpack_from("<I", cfg, 20)[0] == 512
