"""vblock ("virtual-block", version 1): a block device on vbus, host side.

**This device is alacrity's own extension, not historical**: AlacrityVM shipped no block
device. It exists so block workloads can be compared across ABIs on the same `BlockCore`
and backends as virtio-blk; it follows venet's shape (an IOQ used like venet's tx queue).

- One IOQ, shm id 0, with a signal. The guest pushes a descriptor on both indexes per
  request; `ptr`/`len` locate a request in guest RAM:
    u32 type @0 (IN 0, OUT 1, FLUSH 4, GET_ID 8: virtio-blk's values)
    u32 status @4 (written by the device: OK 0, IOERR 1, UNSUPP 2)
    u64 sector @8
    u32 count @16, 4 bytes padding
    iov[count] @24, 16 bytes each: u32 len, 4 bytes padding, u64 ptr
  `len` is exactly 24 + 16 * count. The device copies the request before it checks it,
  serves it, writes the status and pops the descriptor (the completion), in order.
- Device call QUERY (func 0, 24 bytes out): u64 capacity in sectors, u32 block size,
  u32 flags (RO = 1), u32 max segments, 4 bytes padding.
A descriptor whose request is not in guest RAM breaks the device (there is nowhere to put
a status); a malformed request (bad length, count, data outside RAM, odd sizes) completes
with IOERR; an unknown type with UNSUPP.
"""

from __future__ import annotations

import logging
import struct

from alacrity.devices.block import BlockCore, Status
from alacrity.errors import GuestError
from alacrity.vbus import abi
from alacrity.vbus.device import CallError, Shm, VbusDevice
from alacrity.vbus.ioq import Ioq
from alacrity.vbus.shm_signal import ShmSignal

log = logging.getLogger("alacrity.vblock")

TYPE = "virtual-block"
VERSION = 1
QUEUE_ID = 0
FUNC_QUERY = 0
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = int(Status.OK), int(Status.IOERR), int(Status.UNSUPP)
FLAG_RO = 1

REQ = struct.Struct("<IIQI4x")        # type, status, sector, count (24)
IOV = struct.Struct("<I4xQ")          # len, ptr (16)
QUERY = struct.Struct("<QIII4x")      # capacity, blk_size, flags, max_segments (24)
STATUS = struct.Struct("<I")
MAX_SEGMENTS = 128
MAX_BYTES = 4 << 20                   # per request


def request_size(count: int) -> int:
    return REQ.size + IOV.size * count


class Vblock(VbusDevice):
    type = TYPE
    version = VERSION

    def __init__(self, core: BlockCore, *, budget: int = 8):
        super().__init__()
        self.core = core
        self.budget = budget
        self.q: Ioq | None = None
        self.malformed = 0
        self.requests = 0
        self._deferred = False

    def open(self, mem, version: int) -> None:  # type: ignore[override]
        super().open(mem, version)
        self.q = None
        self._deferred = False

    def close(self) -> None:
        super().close()
        self.q = None
        self._deferred = False

    # -- control ---------------------------------------------------------------------------
    def call(self, func: int, datap: int, length: int, flags: int) -> int:
        if func == FUNC_QUERY:
            if length != QUERY.size:
                raise CallError(abi.EINVAL, f"QUERY: {length} bytes (needs {QUERY.size})")
            self.write_guest(datap, QUERY.pack(self.core.capacity_sectors, 512,
                                               FLAG_RO if self.core.read_only else 0,
                                               self.max_segments))
            return 0
        raise CallError(abi.EINVAL, f"vblock: no device call {func}")

    def shm(self, shm: Shm) -> None:
        if shm.id != QUEUE_ID:
            raise CallError(abi.EINVAL, f"vblock: no shared memory id {shm.id}")
        if shm.signal is None:
            raise CallError(abi.EINVAL, "vblock: the queue needs a signal")
        if self.q is not None:
            raise CallError(abi.EEXIST, "vblock: the queue is already registered")
        self.q = self.open_ioq(shm)
        shm.signal.notifier = self._doorbell
        shm.signal.enable()                 # requests may already wait

    def signals(self) -> list[ShmSignal]:
        return [self.q.signal] if self.q is not None else []

    @property
    def max_segments(self) -> int:
        return min(MAX_SEGMENTS, self.limits.max_segments)

    @property
    def max_bytes(self) -> int:
        return min(MAX_BYTES, self.limits.max_request_bytes)

    # -- requests ----------------------------------------------------------------------------
    def _doorbell(self) -> None:
        """The queue's wakeup: one bounded pass; if more waits, mute the signal and come
        back from the I/O loop (as vhost does), so other work and exits interleave."""
        if self._deferred:
            return
        if self._pass() and self.q is not None and self.q.take(1):
            self._deferred = True
            if not self.q.signal.always:
                self.q.signal.disable()
            self.schedule(self._continue)

    def _continue(self) -> bool:
        q = self.q
        if q is None:
            self._deferred = False
            return False
        if self._pass() and q.take(1):
            return True
        self._deferred = False
        if not q.signal.always:
            q.signal.enable()               # re-checks: runs the pass again if requests came
        return False

    def poll(self) -> bool:
        if self.q is None or not self.q.ready():
            return False
        self._deferred = False
        return bool(self._pass())

    def _pass(self) -> int:
        q = self.q
        if q is None:
            return 0
        taken = q.take(self.budget)
        if not taken:
            return 0
        view = self.mem.view
        serve = self._serve
        put = STATUS.pack_into
        for _pos, _cookie, ptr, length in taken:
            req = view(ptr, length)         # not in RAM: GuestError, the device breaks
            status = serve(req)
            if length >= 8:
                put(req, 4, status)         # published by the pop below, not by this store
        self.requests += len(taken)
        q.release(len(taken))
        q.signal.inject()
        return len(taken)

    def _bad(self, why: str) -> int:
        self.malformed += 1
        if self.malformed <= 10:
            log.warning("vblock: malformed request: %s", why)
        return S_IOERR

    def _serve(self, req: memoryview) -> int:
        """One request (its bytes in guest RAM); returns its status."""
        length = len(req)
        if length < REQ.size or (length - REQ.size) % IOV.size:
            return self._bad(f"request of {length} bytes")
        if length > request_size(self.max_segments):
            return self._bad(f"request of {length} bytes (at most {self.max_segments} segments)")
        raw = bytes(req)                    # a copy: the guest cannot change it now
        rtype, _status, sector, count = REQ.unpack_from(raw)
        if request_size(count) != length:
            return self._bad(f"count {count} in a request of {length} bytes")
        views = []
        total = 0
        try:
            for ilen, iptr in IOV.iter_unpack(raw[REQ.size:]):
                views.append(self.mem.view(iptr, ilen))
                total += ilen
        except GuestError as e:
            return self._bad(str(e))
        if total > self.max_bytes:
            return self._bad(f"{total} bytes in one request (at most {self.max_bytes})")
        core = self.core
        if rtype == T_IN:
            return int(core.read(sector, views, total))
        if rtype == T_OUT:
            return int(core.write(sector, views, total))
        if rtype == T_FLUSH:
            return int(core.flush())
        if rtype == T_GET_ID:
            core.put_id(views)
            return S_OK
        return S_UNSUPP

    def counters(self) -> dict:
        return {"requests": self.requests, "malformed": self.malformed}
