"""A guest-side virtio-blk driver with queue depth N.

Each of the N request slots owns a header, a data buffer and a status byte in guest RAM;
a request is the chain header -> data -> status (or one indirect descriptor with
`indirect=True`). The driver checks everything the device hands back.
"""

from __future__ import annotations

import time
from typing import Any

from alacrity.errors import DeviceError
from alacrity.virtio import blk as B
from alacrity.virtio import spec

WANTED = (spec.bit(B.F_SIZE_MAX) | spec.bit(B.F_SEG_MAX) | spec.bit(B.F_BLK_SIZE)
          | spec.bit(B.F_FLUSH) | spec.bit(B.F_RO) | spec.bit(B.F_DISCARD)
          | spec.bit(B.F_WRITE_ZEROES))


class BlkError(IOError):
    """A request completed with a status other than OK."""

    def __init__(self, status: int, what: str):
        super().__init__(f"virtio-blk {what} failed with status {status}")
        self.status = status


class VirtioBlkDriver:
    def __init__(self, transport: Any, *, depth: int = 1, max_bytes: int = 4096,
                 queue_size: int = 256, event_idx: bool = True, indirect: bool = False,
                 poll_us: float = 0.0, always_kick: bool = False, packed: bool = False):
        t = self.t = transport
        if t.device_id != spec.ID_BLOCK:
            raise DeviceError(f"device id {t.device_id} is not a block device")
        wanted = WANTED
        if event_idx:
            wanted |= spec.bit(spec.F_EVENT_IDX)
        if indirect:
            wanted |= spec.bit(spec.F_INDIRECT_DESC)
        if packed:
            wanted |= spec.bit(spec.F_RING_PACKED)
        t.negotiate(wanted)
        if packed and not t.has(spec.F_RING_PACKED):
            raise DeviceError("the device does not offer VIRTIO_F_RING_PACKED")
        self.capacity = t.read_config(0, 8)              # sectors
        self.size_max = t.read_config(8, 4) if t.has(B.F_SIZE_MAX) else 0
        self.seg_max = t.read_config(12, 4) if t.has(B.F_SEG_MAX) else 0
        self.blk_size = t.read_config(20, 4) if t.has(B.F_BLK_SIZE) else 512
        self.read_only = t.has(B.F_RO)
        if self.size_max and max_bytes > self.size_max:
            raise ValueError(f"request size {max_bytes} exceeds the device's size_max {self.size_max}")
        self.q = t.setup_queue(0, queue_size, indirect_max=3 if indirect else 0)
        self.use_indirect = bool(self.q.indirect_max)
        per_req = 1 if self.use_indirect else 3
        if depth * per_req > self.q.size:
            raise ValueError(f"depth {depth} needs {depth * per_req} descriptors; "
                             f"the queue has {self.q.size}")
        self.depth = depth
        self.max_bytes = max_bytes
        mem = t.m.mem
        alloc = t.m.alloc.alloc
        # header and status byte of a slot share one cache line, and no slot shares a line
        # with another: the device writes one slot while the driver rewrites the next
        lines = [alloc(64, 64) for _ in range(depth)]
        self.hdr = lines
        self.status = [a + 16 for a in lines]
        self.data = [alloc(max(max_bytes, 512), 4096) for _ in range(depth)]
        self.hdr_v = [mem.view(a, 16) for a in self.hdr]
        self.status_v = [mem.view(a, 1) for a in self.status]
        self.data_v = [mem.view(a, max(max_bytes, 512)) for a in self.data]
        self.stats = t.stats[0]
        self.poll_ns = int(poll_us * 1000)
        self.always_kick = always_kick
        self._need_ack = False
        t.driver_ok()
        if not always_kick:
            self.q.disable_cb()    # interrupts only when wait() asks for them

    # -- asynchronous interface -------------------------------------------------------------
    def submit(self, slot: int, rtype: int, sector: int = 0, nbytes: int = 0) -> None:
        """Queue one request in `slot` (not visible to the device until kick())."""
        if nbytes > self.max_bytes:
            raise ValueError(f"{nbytes} bytes exceed the slot size {self.max_bytes}")
        B.HEADER.pack_into(self.hdr_v[slot], 0, rtype, 0, sector)
        self.status_v[slot][0] = 0xFF
        hdr = (self.hdr[slot], 16)
        st = (self.status[slot], 1)
        if rtype == B.T_OUT or rtype in (B.T_DISCARD, B.T_WRITE_ZEROES):
            bufs, n_out = [hdr, (self.data[slot], nbytes), st], 2
        elif nbytes:
            bufs, n_out = [hdr, (self.data[slot], nbytes), st], 1
        else:
            bufs, n_out = [hdr, st], 1
        self.q.add(bufs, n_out, slot, self.use_indirect)

    def kick(self) -> bool:
        return self.t.kick(0, self.always_kick)

    def reap(self) -> list[tuple[int, int, int]]:
        """Completed requests: [(slot, status, bytes written by the device)]."""
        out = []
        status_v = self.status_v
        for slot, written in self.q.get_used():
            out.append((slot, status_v[slot][0], written))
        return out

    def wait(self, timeout: float | None = 10.0) -> None:
        """Return once at least one completion is waiting: poll for `poll_us` first (if
        set), then enable interrupts, re-check, and sleep on the interrupt eventfd."""
        q = self.q
        if q.has_used():
            return
        if self._need_ack:
            # acknowledge the last interrupt now, while the device still has work: the two
            # exits overlap with it instead of delaying the next submissions
            self.ack()
            if q.has_used():
                return
        if self.poll_ns:
            clock = time.perf_counter_ns
            deadline = clock() + self.poll_ns
            has_used = q.has_used
            while True:
                for _ in range(16):
                    if has_used():
                        return
                if clock() >= deadline:
                    break
        while True:
            if q.enable_cb():
                break
            if not self.t.wait_interrupt(timeout):
                raise TimeoutError(f"no completion within {timeout} s")
            self.stats.interrupts += 1
            self._need_ack = True
            if q.has_used():
                break
            self.ack()      # an interrupt without used buffers: maybe a config change
        if not self.always_kick:
            # mute interrupts while we reap (as Linux's virtblk_done does). With a split ring
            # and EVENT_IDX a stale used_event does this already; a packed ring's event
            # offset is only meaningful within two laps of the ring, so it must be said.
            q.disable_cb()

    def ack(self) -> None:
        """Acknowledge a taken interrupt (wait() does it before sleeping, so the exits
        overlap device work; callers may also do it earlier)."""
        if self._need_ack:
            self._need_ack = False
            self.t.ack_interrupt()

    # -- synchronous helpers (slot 0) ---------------------------------------------------------
    def _sync(self, rtype: int, sector: int = 0, nbytes: int = 0, what: str = "") -> int:
        self.submit(0, rtype, sector, nbytes)
        self.kick()
        while True:
            self.wait()
            done = self.reap()
            self.ack()
            if done:
                break
        slot, status, written = done[0]
        if len(done) != 1 or slot != 0:
            raise DeviceError(f"unexpected completions {done}")
        if status != B.S_OK:
            raise BlkError(status, what or f"request type {rtype}")
        return written

    def read(self, sector: int, nbytes: int) -> bytes:
        written = self._sync(B.T_IN, sector, nbytes, f"read of {nbytes} at sector {sector}")
        if written != nbytes + 1:
            raise DeviceError(f"read of {nbytes} bytes reported {written} written")
        return bytes(self.data_v[0][:nbytes])

    def write(self, sector: int, data: bytes) -> None:
        self.data_v[0][:len(data)] = data
        self._sync(B.T_OUT, sector, len(data), f"write of {len(data)} at sector {sector}")

    def flush(self) -> None:
        self._sync(B.T_FLUSH, 0, 0, "flush")

    def get_id(self) -> bytes:
        written = self._sync(B.T_GET_ID, 0, 20, "get-id")
        return bytes(self.data_v[0][:max(0, written - 1)]).rstrip(b"\0")

    def discard(self, sector: int, count: int, *, zeroes: bool = False, unmap: bool = False) -> None:
        B.SEGMENT.pack_into(self.data_v[0], 0, sector, count, B.WRITE_ZEROES_F_UNMAP if unmap else 0)
        self._sync(B.T_WRITE_ZEROES if zeroes else B.T_DISCARD, 0, B.SEGMENT.size,
                   "write-zeroes" if zeroes else "discard")
