"""IOQ (version 4): AlacrityVM's shared-memory ring, both sides.

Layout (little-endian, C alignment):
  ioq_ring_head: u32 magic @0 (0x47fa2fe4), u32 ver @4 (4), shm_signal_desc @8 (16 bytes),
                 idx[0] "valid" @24, idx[1] "inuse" @36, u32 count @48, ring[count] @56
  ioq_ring_idx (12 bytes):  u32 head @0, u32 tail @4, u8 full @8
  ioq_ring_desc (32 bytes): u64 cookie @0 (north's own), u64 ptr @8, u64 len @16,
                            u8 valid @24, u8 sown @25 (1: south owns it)
Total size: 56 + 32 * count.

Semantics (lib/ioq.c): an index is a (head, tail, full) triple over positions 0..count-1
(they wrap at count, not at 2**16); `full` tells a full index from an empty one when
head == tail. A side pushes at the tail, or pops at the head, of one index (or of both
together), only on a descriptor it owns (`sown`); the index moves first, then ownership
flips to the peer. Each ring carries its own shm-signal.

The host never trusts what the guest wrote: every index is checked (< count, and equal to
where the operation must happen) and every ownership bit is checked, where it is used.
"""

from __future__ import annotations

import struct
from typing import Callable

from alacrity.errors import GuestError
from alacrity.memory import GuestMemory
from alacrity.vbus import shm_signal
from alacrity.vbus.shm_signal import ShmSignal

MAGIC = 0x47FA2FE4
VERSION = 4
HEAD_SIZE = 56
DESC_SIZE = 32
IDX_SIZE = 12
SIGNAL_OFFSET = 8
VALID, INUSE = 0, 1
IDX_OFFSET = (24, 36)
COUNT_OFFSET = 48
MAX_COUNT = 1 << 16



def ring_size(count: int) -> int:
    return HEAD_SIZE + DESC_SIZE * count


def init_ring(mem: GuestMemory, addr: int, count: int) -> None:
    """North: lay out a fresh ring (zeroed, magic, version, count, a fresh shm-signal)."""
    view = mem.view(addr, ring_size(count))
    view[:] = bytes(len(view))
    struct.pack_into("<II", view, 0, MAGIC, VERSION)
    struct.pack_into("<I", view, COUNT_OFFSET, count)
    shm_signal.init_desc(view[SIGNAL_OFFSET:SIGNAL_OFFSET + shm_signal.SIZE])


class Ioq:
    """One side (`locale`) of the IOQ at guest address `addr`."""

    def __init__(self, mem: GuestMemory, addr: int, locale: int, *, length: int | None = None,
                 cross: Callable[[], None] = lambda: None, always: bool = False,
                 signal: ShmSignal | None = None):
        head = mem.view(addr, HEAD_SIZE)
        magic, ver = struct.unpack_from("<II", head)
        if magic != MAGIC or ver != VERSION:
            raise GuestError(f"IOQ at {addr:#x}: magic/version {magic:#x}/{ver} "
                             f"(expected {MAGIC:#x}/{VERSION})")
        count = struct.unpack_from("<I", head, COUNT_OFFSET)[0]
        if not 0 < count <= MAX_COUNT:
            raise GuestError(f"IOQ at {addr:#x}: count {count} (1..{MAX_COUNT})")
        if length is not None and ring_size(count) > length:
            raise GuestError(f"IOQ at {addr:#x}: {count} descriptors need {ring_size(count)} "
                             f"bytes, the region has {length}")
        self.mem = mem
        self.addr = addr
        self.locale = locale
        self.peer = locale ^ 1
        self.count = count
        self.view = mem.view(addr, ring_size(count))
        self._h32 = self.view[:HEAD_SIZE].cast("I")
        self._ring = self.view[HEAD_SIZE:]
        self._q = self._ring.cast("Q")             # cookie 4k, ptr 4k+1, len 4k+2
        # Only the side that pops a ring (take/release) writes its inuse head, so that side
        # keeps its own copy: no re-checking on every pop, and a peer that writes it is
        # caught by the comparison (GuestError), whatever value it wrote.
        head = self._h32[9]
        if head >= count:
            raise GuestError(f"IOQ at {addr:#x}: inuse head {head} >= count {count}")
        self._ihead = head
        # the ring's signal (or the one the guest registered for it elsewhere)
        self.signal = signal or ShmSignal(self.view[SIGNAL_OFFSET:SIGNAL_OFFSET + shm_signal.SIZE],
                                          locale, cross, always=always)

    # -- indexes ----------------------------------------------------------------------------
    def head(self, idx: int) -> int:
        v = self._h32[IDX_OFFSET[idx] // 4]
        if v >= self.count:
            raise GuestError(f"IOQ {self.addr:#x}: {('valid', 'inuse')[idx]} head {v} "
                             f">= count {self.count}")
        return v

    def tail(self, idx: int) -> int:
        v = self._h32[IDX_OFFSET[idx] // 4 + 1]
        if v >= self.count:
            raise GuestError(f"IOQ {self.addr:#x}: {('valid', 'inuse')[idx]} tail {v} "
                             f">= count {self.count}")
        return v

    def index(self, idx: int) -> tuple[int, int, int]:
        """(head, tail, used) of one index, read once and checked."""
        h32 = self._h32
        w = IDX_OFFSET[idx] >> 2
        h = h32[w]
        t = h32[w + 1]
        count = self.count
        if h >= count or t >= count:
            raise GuestError(f"IOQ {self.addr:#x}: {('valid', 'inuse')[idx]} index "
                             f"{h}/{t} >= count {count}")
        if h == t:
            return h, t, (count if self.view[IDX_OFFSET[idx] + 8] else 0)
        return h, t, (t - h if t > h else t + count - h)

    def full(self, idx: int) -> bool:
        """ioq_full(): the flag only counts when head == tail (a lying flag is ignored)."""
        return bool(self.view[IDX_OFFSET[idx] + 8]) and self.head(idx) == self.tail(idx)

    def used(self, idx: int) -> int:
        """ioq_count(): descriptors between head and tail."""
        return self.index(idx)[2]

    def remain(self, idx: int) -> int:
        return self.count - self.used(idx)

    def _bad_inuse(self) -> None:
        h32 = self._h32
        if h32[9] != self._ihead:
            raise GuestError(f"IOQ {self.addr:#x}: inuse head is {h32[9]}, not {self._ihead} "
                             f"where we left it (the peer wrote our index)")
        raise GuestError(f"IOQ {self.addr:#x}: inuse tail {h32[10]} >= count {self.count}")

    # -- descriptors ------------------------------------------------------------------------
    def set_desc(self, pos: int, *, cookie: int | None = None, ptr: int | None = None,
                 length: int | None = None, valid: int | None = None) -> None:
        q = self._q
        if cookie is not None:
            q[4 * pos] = cookie
        if ptr is not None:
            q[4 * pos + 1] = ptr
        if length is not None:
            q[4 * pos + 2] = length
        if valid is not None:
            self._ring[pos * DESC_SIZE + 24] = valid

    # -- batched host operations -----------------------------------------------------------
    def take(self, limit: int) -> list[tuple[int, int, int, int]]:
        """Descriptors handed to us at the inuse head, in order, at most `limit`:
        [(pos, cookie, ptr, len)]. Nothing moves until release(). South takes requests
        (tx, block) this way; north takes filled buffers (rx, events)."""
        ring = self._ring
        q = self._q
        me = self.locale
        count = self.count
        h32 = self._h32
        pos = self._ihead
        tail = h32[10]
        if h32[9] != pos or tail >= count:
            self._bad_inuse()
        if tail == pos:
            used = count if self.view[44] else 0
        else:
            used = tail - pos if tail > pos else tail + count - pos
        out = []
        # only what the index says is there, and only what we own
        for _ in range(limit if limit < used else used):
            if ring[pos * DESC_SIZE + 25] != me:
                break
            k = pos << 2
            out.append((pos, q[k], q[k + 1], q[k + 2]))
            pos += 1
            if pos == count:
                pos = 0
        return out

    def release(self, n: int, length: int | None = None) -> None:
        """Pop n descriptors from the inuse head (taken with take()), handing them to the
        peer: head moves, full clears, ownership flips. South: completions; north: buffers
        posted again, with `length` written back as each one's len if given)."""
        if not n:
            return
        ring = self._ring
        q = self._q
        me = self.locale
        count = self.count
        pos = start = self._ihead
        if self._h32[9] != pos:
            self._bad_inuse()
        peer = self.peer
        for _ in range(n):
            if ring[pos * DESC_SIZE + 25] != me:
                raise GuestError(f"IOQ {self.addr:#x}: descriptor {pos} changed owner "
                                 f"while we held it")
            if length is not None:
                q[4 * pos + 2] = length
            pos += 1
            if pos == count:
                pos = 0
        self._h32[9] = self._ihead = pos        # inuse head (byte 36)
        if self.view[44]:
            self.view[44] = 0
        pos = start
        for _ in range(n):                      # then the descriptors go to the peer
            ring[pos * DESC_SIZE + 25] = peer
            pos += 1
            if pos == count:
                pos = 0

    def free_slots(self, limit: int) -> list[tuple[int, int, int, int]]:
        """South: buffers the guest posted, at the inuse tail, that we own and may fill:
        [(pos, cookie, ptr, len)], at most `limit`."""
        ring = self._ring
        q = self._q
        me = self.locale
        count = self.count
        head, pos, used = self.index(INUSE)
        out = []
        room = count - used                     # up to the inuse head
        for _ in range(limit if limit < room else room):
            if ring[pos * DESC_SIZE + 25] != me:
                break
            k = pos << 2
            out.append((pos, q[k], q[k + 1], q[k + 2]))
            pos += 1
            if pos == count:
                pos = 0
        return out

    def fill(self, lens: list[int]) -> None:
        """South: push len(lens) filled buffers at the inuse tail, writing each one's length
        (ioq_iter_push on inuse): the lengths are written, the tail moves (one store), then
        ownership flips to north in order."""
        n = len(lens)
        if not n:
            return
        ring = self._ring
        q = self._q
        me = self.locale
        count = self.count
        head, start, used = self.index(INUSE)
        if n > count - used:
            raise GuestError(f"IOQ {self.addr:#x}: {n} buffers filled, {count - used} free")
        pos = start
        for length in lens:
            if ring[pos * DESC_SIZE + 25] != me:
                raise GuestError(f"IOQ {self.addr:#x}: descriptor {pos} changed owner "
                                 f"while the device filled it")
            q[4 * pos + 2] = length
            pos += 1
            if pos == count:
                pos = 0
        if pos == head:
            self.view[44] = 1                   # full: set before the tail lands on head
        self._h32[10] = pos                     # inuse tail (byte 40)
        peer = self.peer
        pos = start
        for _ in range(n):
            ring[pos * DESC_SIZE + 25] = peer
            pos += 1
            if pos == count:
                pos = 0

    # -- batched guest (north) operations ---------------------------------------------------
    def post(self, entries: list[tuple[int, int, int]], *, both: bool = True) -> None:
        """North: hand descriptors to south at the tail, [(cookie, ptr, len)]: requests
        pushed on both indexes (tx, block), or buffers on the valid index only (rx, events).
        Descriptors are written, the tails move (one store each), then ownership flips in
        order, so south sees a prefix of the batch at any time."""
        if not entries:
            return
        ring = self._ring
        q = self._q
        me = self.locale
        count = self.count
        vhead, start, used = self.index(VALID)
        if len(entries) > count - used:
            raise GuestError(f"IOQ {self.addr:#x}: {len(entries)} descriptors posted, "
                             f"{count - used} free")
        pos = start
        h32 = self._h32
        if both:
            # the inuse tail is ours too; south's inuse head is only compared with it (for
            # `full`), never used as a position, so it needs no range check here
            ihead = h32[9]
            if h32[10] != pos:
                raise GuestError(f"IOQ {self.addr:#x}: valid and inuse tails not synchronized")
        for cookie, ptr, length in entries:
            base = pos * DESC_SIZE
            if ring[base + 25] != me:
                raise GuestError(f"IOQ {self.addr:#x}: descriptor {pos} is still the peer's")
            k = 4 * pos
            q[k] = cookie
            q[k + 1] = ptr
            q[k + 2] = length
            ring[base + 24] = 1
            pos += 1
            if pos == count:
                pos = 0
        if vhead == pos:
            self.view[32] = 1                    # full: set before the tail lands on head
        h32[7] = pos                             # valid tail (byte 28)
        if both:
            if ihead == pos:
                self.view[44] = 1
            h32[10] = pos                        # inuse tail (byte 40)
        peer = self.peer
        pos = start
        for _ in range(len(entries)):
            ring[pos * DESC_SIZE + 25] = peer
            pos += 1
            if pos == count:
                pos = 0

    def reap(self, limit: int) -> list[int]:
        """North: cookies of requests south has finished, popped from the valid head
        without a flip (the descriptors are ours to post again)."""
        ring = self._ring
        q = self._q
        me = self.locale
        count = self.count
        pos, _, used = self.index(VALID)
        out = []
        for _ in range(limit if limit < used else used):
            if ring[pos * DESC_SIZE + 25] != me:
                break
            out.append(q[pos << 2])
            pos += 1
            if pos == count:
                pos = 0
        if out:
            self._h32[6] = pos                   # valid head (byte 24)
            if self.view[32]:
                self.view[32] = 0
        return out

    def done(self) -> bool:
        """North: is a finished request waiting at the valid head? (cheap: no list)"""
        h32 = self._h32
        pos = h32[6]                                   # valid head (byte 24)
        if pos >= self.count:
            return False
        if pos == h32[7] and not self.view[32]:        # empty: head == tail, not full
            return False
        return self._ring[pos * DESC_SIZE + 25] == self.locale

    def ready(self) -> bool:
        """Is a descriptor handed to us waiting at the inuse head? (cheap: no list; take()
        checks the indexes)"""
        pos = self._ihead
        if pos == self._h32[10] and not self.view[44]:
            return False
        return self._ring[pos * DESC_SIZE + 25] == self.locale
