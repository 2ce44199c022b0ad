"""virtio-blk framing (VIRTIO 1.x section 5.2) on top of the transport-free `BlockCore`.

A request is one chain: a 16-byte header {le32 type, le32 reserved, le64 sector} that the
device reads, the data (read by the device for OUT, written for IN), and one status byte
that the device writes last. The device makes no assumption about how the driver splits
these across descriptors. Malformed requests complete with IOERR or UNSUPP; nothing here
raises into the device loop.
"""

from __future__ import annotations

import logging
import struct

from alacrity.devices.block import SECTOR, BlockCore, Status, _advance
from alacrity.limits import Limits
from alacrity.virtio import spec
from alacrity.virtio.device import Handler, VirtioDevice
from alacrity.virtio.chain import Chain

log = logging.getLogger("alacrity.virtio.blk")

# feature bits (5.2.3)
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

# request types and status (5.2.6)
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")   # discard / write zeroes: sector, num_sectors, flags
WRITE_ZEROES_F_UNMAP = 1

# struct virtio_blk_config up to write_zeroes_may_unmap (60 bytes)
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")


class VirtioBlk(VirtioDevice):
    device_id = spec.ID_BLOCK
    name = "virtio-blk"
    num_queues = 1

    def __init__(self, core: BlockCore, *, queue_max: int = 256, size_max: int = 1 << 22,
                 max_discard_sectors: int = 1 << 22, max_discard_seg: int = 32):
        super().__init__()
        self.core = core
        self.queue_max = queue_max
        self.size_max = size_max
        self.seg_max = max(1, queue_max - 2)
        self.max_request = size_max   # a request this small cannot break size_max
        self.max_discard_sectors = max_discard_sectors
        self.max_discard_seg = max_discard_seg
        self.malformed = 0

    def apply_limits(self, limits: Limits) -> None:
        # a request is header + data segments + status: two descriptors are not data
        self.seg_max = max(1, min(self.seg_max, limits.max_segments - 2))
        self.size_max = min(self.size_max, limits.max_request_bytes)
        self.max_request = min(self.max_request, limits.max_request_bytes)

    def device_features(self) -> int:
        f = (spec.bit(F_SIZE_MAX) | spec.bit(F_SEG_MAX) | spec.bit(F_BLK_SIZE)
             | spec.bit(F_FLUSH) | spec.bit(F_DISCARD) | spec.bit(F_WRITE_ZEROES))
        if self.core.read_only:
            f |= spec.bit(F_RO)
        return f

    def config(self) -> bytes:
        return CONFIG.pack(self.core.capacity_sectors, self.size_max, self.seg_max,
                           0, 0, 0,                    # geometry (not offered)
                           SECTOR,                     # blk_size
                           0, 0, 0, 0,                 # topology (not offered)
                           0, 0, self.num_queues,      # writeback, unused0, num_queues
                           self.max_discard_sectors, self.max_discard_seg, 1,
                           self.max_discard_sectors, self.max_discard_seg, 1)

    def handler(self, index: int) -> Handler | None:
        return self.handle if index == 0 else None

    # -- one request ------------------------------------------------------------------------
    def _bad(self, why: str) -> None:
        self.malformed += 1
        if self.malformed <= 10:
            log.warning("virtio-blk: malformed request: %s", why)

    def handle(self, c: Chain) -> int:
        """Serve one chain; return the number of bytes written into guest memory."""
        w = c.writable
        if not c.write_len:
            self._bad("no status byte")
            return 0
        last = w[-1]
        n = len(last)
        if n == 1:                     # the usual layout: the status byte on its own
            into = w[:-1]
        elif n:
            into = w[:-1]
            into.append(last[:n - 1])
        else:                          # trailing empty descriptors: find the status byte
            into = [v for v in w if len(v)]
            last = into.pop()
            n = len(last)
            if n > 1:
                into.append(last[:n - 1])
        try:
            r = c.readable
            if len(r) == 1 and len(r[0]) == 16:   # fast path: IN with a lone header
                rtype, _, sector = HEADER.unpack_from(r[0])
                if rtype == T_IN and len(into) <= self.seg_max and c.write_len <= self.max_request:
                    status = self.core.read(sector, into, c.write_len - 1)
                    last[n - 1] = status
                    return c.write_len if status == S_OK else 1
            status, written = self._request(c, into)
        except Exception:  # never let a bug escape into the device loop
            log.exception("virtio-blk: request failed")
            status, written = S_IOERR, 0
        last[n - 1] = status
        return written + 1

    def _request(self, c: Chain, into: list[memoryview]) -> tuple[int, int]:
        r = c.readable
        if r and len(r[0]) == 16:
            rtype, _, sector = HEADER.unpack_from(r[0])
            out = r[1:]
        elif c.read_len >= 16:
            head = b"".join(bytes(v[:16]) for v in r)[:16]  # header split across pieces
            rtype, _, sector = HEADER.unpack(head)
            out = _advance(r, 16)
        else:
            self._bad(f"header of {c.read_len} bytes (needs 16)")
            return S_IOERR, 0
        core = self.core
        if rtype == T_IN:
            if out:
                self._bad("IN request with device-readable data")
                return S_IOERR, 0
            if len(into) > self.seg_max and not self._segments_ok(into):
                return S_IOERR, 0
            nbytes = c.write_len - 1
            if nbytes > self.max_request and not self._segments_ok(into):
                return S_IOERR, 0
            st = core.read(sector, into, nbytes)
            return st, (nbytes if st == S_OK else 0)
        if rtype == T_OUT:
            if into:
                self._bad("OUT request with device-writable data")
                return S_IOERR, 0
            nbytes = c.read_len - 16
            if (len(out) > self.seg_max or nbytes > self.max_request) and not self._segments_ok(out):
                return S_IOERR, 0
            return core.write(sector, out, nbytes), 0
        if rtype == T_FLUSH:
            return core.flush(), 0
        if rtype == T_GET_ID:
            if out:
                self._bad("GET_ID with device-readable data")
                return S_IOERR, 0
            return S_OK, core.put_id(into)
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            return self._ranges(rtype, out, into), 0
        return S_UNSUPP, 0

    def _segments_ok(self, views: list[memoryview]) -> bool:
        """seg_max and size_max, checked in full (the fast path skips small requests)."""
        if len(views) > self.seg_max:
            self._bad(f"{len(views)} data segments (seg_max {self.seg_max})")
            return False
        for v in views:
            if len(v) > self.size_max:
                self._bad(f"segment of {len(v)} bytes (size_max {self.size_max})")
                return False
        return True

    def _ranges(self, rtype: int, out: list[memoryview], into: list[memoryview]) -> int:
        if into:
            self._bad("DISCARD/WRITE_ZEROES with device-writable data")
            return S_IOERR
        total = sum(map(len, out))     # sizes first: copy nothing a guest made huge
        if not total or total % SEGMENT.size:
            self._bad(f"{total} bytes of discard/write-zeroes segments")
            return S_IOERR
        if total // SEGMENT.size > self.max_discard_seg:
            return S_IOERR
        data = b"".join(bytes(v) for v in out)
        for sector, count, flags in SEGMENT.iter_unpack(data):
            if count > self.max_discard_sectors:
                return S_IOERR
            if rtype == T_DISCARD:
                if flags:
                    return S_UNSUPP
                st = self.core.discard(sector, count)
            else:
                if flags & ~WRITE_ZEROES_F_UNMAP:
                    return S_UNSUPP
                st = self.core.write_zeroes(sector, count)
            if st != Status.OK:
                return st
        return S_OK
