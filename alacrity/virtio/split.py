"""Split virtqueues (VIRTIO 1.x section 2.7): the device side and the driver side of one ring.

Layout in guest memory (all little-endian):
  descriptor table  16 bytes per entry: u64 addr, u32 len, u16 flags, u16 next   (align 16)
  available ring    u16 flags, u16 idx, u16 ring[size], u16 used_event           (align 2)
  used ring         u16 flags, u16 idx, {u32 id, u32 len}[size], u16 avail_event (align 4)

Indexes are free-running 16-bit counters; a slot is `idx % size` (size is a power of two).
Shared indexes and flags are published with one aligned store through a cast memoryview.
The ring knows nothing about the device it serves.
"""

from __future__ import annotations

import struct
from typing import Sequence

from alacrity.errors import DeviceError, GuestError
from alacrity.virtio.chain import Chain
from alacrity.memory import GuestMemory, full_barrier
from alacrity.virtio.spec import (AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT,
                                  DESC_F_WRITE, MAX_QUEUE_SIZE, USED_F_NO_NOTIFY, need_event)

DESC = struct.Struct("<QIHH")
DESC_SIZE = 16


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes taken by the descriptor table, the available ring and the used ring."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


def check_size(size: int) -> None:
    if not (0 < size <= MAX_QUEUE_SIZE) or size & (size - 1):
        raise GuestError(f"split queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")


class SplitQueue:
    """The device side of a split virtqueue."""

    def __init__(self, mem: GuestMemory, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool = False, indirect: bool = False,
                 last_avail: int = 0, used_idx: int = 0,
                 max_segments: int = MAX_QUEUE_SIZE, max_bytes: int = 1 << 64):
        check_size(size)
        if desc & 15 or avail & 1 or used & 3:
            raise GuestError(f"misaligned split ring: desc {desc:#x} avail {avail:#x} used {used:#x}")
        dsz, asz, usz = ring_sizes(size)
        self.mem = mem
        self.size = size
        self.mask = size - 1
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_segments = min(size, max_segments)   # a chain never exceeds the queue
        self.max_bytes = max_bytes                     # one request's total length
        self.addrs = (desc, avail, used)
        self._desc = mem.view(desc, dsz)
        self._avail16 = mem.view(avail, asz).cast("H")
        used_mv = mem.view(used, usz)
        self._used16 = used_mv.cast("H")
        self._used32 = used_mv[:4 + 8 * size].cast("I")
        self._used_event = 2 + size          # index of used_event in _avail16
        self._avail_event = 2 + 4 * size     # index of avail_event in _used16
        # Lone descriptors walked before, by head: (their 16 raw bytes, the Chain made of
        # them). A driver that offers the same buffer again (rx buffers, a fixed frame) is
        # served by comparing 16 bytes instead of walking; any change walks and checks anew,
        # and marks the slot False: a driver that writes new buffers every lap (DPDK, Linux)
        # pays for neither the compare nor the copy again.
        self._lone: list[tuple[bytes, Chain] | None | bool] = [None] * size
        self.last_avail = last_avail & 0xFFFF  # next available entry to take
        self.used_idx = used_idx & 0xFFFF      # last published used index
        self.next_used = self.used_idx         # where the next used element goes

    # -- taking work ----------------------------------------------------------------------
    def has_work(self) -> bool:
        return self._avail16[1] != self.last_avail

    def _available(self, limit: int) -> int:
        """How many entries to take now (at most `limit`); the available index is read once
        and may not run more than a queue ahead."""
        idx = self._avail16[1]
        last = self.last_avail
        n = (idx - last) & 0xFFFF
        if n > self.size:
            raise GuestError(f"available index {idx} is {n} entries ahead of {last} "
                             f"(queue size {self.size})")
        return n if n < limit else limit

    def pop(self, limit: int = MAX_QUEUE_SIZE) -> list[Chain]:
        """The chains made available since the last call (at most `limit`), in one pass."""
        avail = self._avail16
        last = self.last_avail
        n = self._available(limit)
        if not n:
            return []
        # The walk is inlined here (one function for the whole batch): this is the
        # hottest loop of every device.
        size = self.size
        mask = self.mask
        desc = self._desc
        mem = self.mem
        r0 = mem.regions[0]        # fast path: the first region, checked inline
        base, rsize, rmv = r0.gpa, r0.size, r0.mv
        unpack = DESC.unpack_from
        cache = self._lone
        max_links = self.max_segments
        max_bytes = self.max_bytes
        chains = []
        for k in range(n):
            head = avail[2 + ((last + k) & mask)]
            if head >= size:
                raise GuestError(f"available ring names descriptor {head} (queue size {size})")
            at = head << 4
            hit = cache[head]
            if hit:
                raw = desc[at:at + 16]
                if hit[0] == raw:                      # the same lone descriptor as before
                    chains.append(hit[1])
                    continue
                cache[head] = hit = False              # it changes: stop caching this slot
            addr, length, flags, nxt = unpack(desc, at)
            if not flags & (DESC_F_NEXT | DESC_F_INDIRECT):       # a lone descriptor
                if length > max_bytes:
                    raise GuestError(f"chain {head}: {length} bytes (limit {max_bytes})")
                off = addr - base
                v = rmv[off:off + length] if off >= 0 and off + length <= rsize \
                    else mem.view(addr, length)
                c = (Chain(head, [], [v], 0, length) if flags & DESC_F_WRITE
                     else Chain(head, [v], [], length, 0))
                if hit is None:
                    cache[head] = (bytes(desc[at:at + 16]), c)
                chains.append(c)
                continue
            table = desc
            limit = size          # entries in the current table
            count = 0             # NEXT links followed
            readable: list[memoryview] = []
            writable: list[memoryview] = []
            rlen = wlen = 0
            i = head
            while True:
                addr, length, flags, nxt = unpack(table, i << 4)
                if flags & DESC_F_INDIRECT:
                    if table is not desc:
                        raise GuestError("indirect descriptor inside an indirect table")
                    table, limit = self._indirect(addr, length, flags)
                    i = 0
                    continue
                off = addr - base
                if off >= 0 and off + length <= rsize:
                    v = rmv[off:off + length]
                else:
                    v = mem.view(addr, length)
                if flags & DESC_F_WRITE:
                    writable.append(v)
                    wlen += length
                elif writable:
                    raise GuestError(f"chain {head}: device-readable descriptor after a "
                                     f"device-writable one")
                else:
                    readable.append(v)
                    rlen += length
                if not flags & DESC_F_NEXT:
                    break
                count += 1
                if count >= max_links:
                    raise GuestError(f"descriptor chain from head {head} is longer than "
                                     f"{max_links} descriptors (queue size {size}): a loop, "
                                     f"a runaway chain or too many segments")
                i = nxt
                if i >= limit:
                    raise GuestError(f"chain {head}: next descriptor {i} is outside its "
                                     f"table ({limit} entries)")
            if rlen + wlen > max_bytes:
                raise GuestError(f"chain {head}: {rlen + wlen} bytes (limit {max_bytes})")
            chains.append(Chain(head, readable, writable, rlen, wlen))
        self.last_avail = (last + n) & 0xFFFF
        return chains

    def take_copies(self, limit: int, skip: int, longest: int) -> tuple[list[int], list[bytes]]:
        """The fast path of queues whose requests are one device-readable buffer each (frames
        to transmit): (heads to complete, a copy of each buffer after its first `skip`
        bytes), in one pass and without Chain objects. Stops at the first chain that is
        anything else, shorter than `skip` or longer than `longest` (nothing is copied
        before its length is checked); pop() takes that one. The checks are pop()'s."""
        avail = self._avail16
        last = self.last_avail
        n = self._available(limit)
        if not n:
            return [], []
        size = self.size
        mask = self.mask
        desc = self._desc
        mem = self.mem
        r0 = mem.regions[0]
        base, rsize, rmv = r0.gpa, r0.size, r0.mv
        unpack = DESC.unpack_from
        if longest > self.max_bytes:
            longest = self.max_bytes         # pop() refuses the longer ones
        heads: list[int] = []
        copies: list[bytes] = []
        for k in range(n):
            head = avail[2 + ((last + k) & mask)]
            if head >= size:
                raise GuestError(f"available ring names descriptor {head} (queue size {size})")
            addr, length, flags, _ = unpack(desc, head << 4)
            if flags or length < skip or length > longest:
                break
            off = addr - base
            if off >= 0 and off + length <= rsize:
                copies.append(rmv[off + skip:off + length].tobytes())
            else:
                copies.append(mem.view(addr, length)[skip:].tobytes())
            heads.append(head)
        self.last_avail = (last + len(heads)) & 0xFFFF
        return heads, copies

    def push_heads(self, heads: list[int]) -> None:
        """push() of chains the device wrote nothing into, for a whole batch."""
        used32 = self._used32
        mask = self.mask
        nu = self.next_used
        for h in heads:
            slot = (nu & mask) << 1
            used32[1 + slot] = h
            used32[2 + slot] = 0
            nu += 1
        self.next_used = nu & 0xFFFF

    def _indirect(self, addr: int, length: int, flags: int) -> tuple[memoryview, int]:
        """Check an INDIRECT descriptor and map its table."""
        if not self.indirect:
            raise GuestError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
        if flags & DESC_F_NEXT:
            raise GuestError("indirect descriptor with NEXT set")
        if length == 0 or length % DESC_SIZE:
            raise GuestError(f"indirect table length {length} is not a non-zero "
                             f"multiple of {DESC_SIZE}")
        return self.mem.view(addr, length), length // DESC_SIZE

    # -- giving work back -------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Stage a used element; the guest sees it at the next publish()."""
        slot = self.next_used & self.mask
        used32 = self._used32
        used32[1 + 2 * slot] = head
        used32[2 + 2 * slot] = written
        self.next_used = (self.next_used + 1) & 0xFFFF

    def push_many(self, chains: list[Chain], written: list[int]) -> None:
        """push() for a whole batch."""
        used32 = self._used32
        mask = self.mask
        nu = self.next_used
        for c, w in zip(chains, written):
            slot = nu & mask
            used32[1 + 2 * slot] = c.head
            used32[2 + 2 * slot] = w
            nu += 1
        self.next_used = nu & 0xFFFF

    def publish(self) -> bool:
        """Make staged used elements visible with one index store. Returns True if the
        driver asked for an interrupt (flags, or the used_event rule with EVENT_IDX)."""
        new = self.next_used
        old = self.used_idx
        if new == old:
            return False
        self._used16[1] = new
        self.used_idx = new
        full_barrier()
        if self.event_idx:
            return need_event(self._avail16[self._used_event], new, old)
        return not self._avail16[0] & AVAIL_F_NO_INTERRUPT

    # -- doorbell suppression --------------------------------------------------------------
    def disable_notify(self) -> None:
        """Ask the driver not to ring the doorbell (with EVENT_IDX a stale avail_event does)."""
        if not self.event_idx:
            self._used16[0] = USED_F_NO_NOTIFY

    def enable_notify(self) -> bool:
        """Ask for a doorbell on the next buffer, then re-check: True if work is waiting."""
        if self.event_idx:
            self._used16[self._avail_event] = self.last_avail
        else:
            self._used16[0] = 0
        full_barrier()
        return self._avail16[1] != self.last_avail

    def state(self) -> dict[str, int]:
        return {"last_avail": self.last_avail, "used_idx": self.used_idx}


class SplitDriverQueue:
    """The driver side of a split virtqueue: free list, adding buffers, kicks, reclaiming."""

    def __init__(self, mem: GuestMemory, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool = False, indirect_tables: Sequence[int] | None = None,
                 indirect_max: int = 0):
        check_size(size)
        dsz, asz, usz = ring_sizes(size)
        self.mem = mem
        self.size = size
        self.mask = size - 1
        self.event_idx = event_idx
        self.addrs = (desc, avail, used)
        self._desc = mem.view(desc, dsz)
        self._desc[:] = bytes(dsz)
        avail_mv = mem.view(avail, asz)
        avail_mv[:] = bytes(asz)
        used_mv = mem.view(used, usz)
        used_mv[:] = bytes(usz)
        self._avail16 = avail_mv.cast("H")
        self._used16 = used_mv.cast("H")
        self._used32 = used_mv[:4 + 8 * size].cast("I")
        self._used_event = 2 + size
        self._avail_event = 2 + 4 * size
        self.free: list[int] = list(range(size - 1, -1, -1))
        self.tokens: list[object] = [None] * size
        self.chain_ids: list[Sequence[int] | None] = [None] * size   # in flight: not None
        self._pinned = bytearray(size)
        self.avail_idx = 0          # next avail index (shadow, not yet published)
        self.published = 0          # avail index the device can see
        self.last_used = 0
        # one indirect table per head descriptor, if the caller provided the memory
        self.indirect_tables = list(indirect_tables or [])
        self.indirect_max = indirect_max
        self._ind_views = [mem.view(a, DESC_SIZE * indirect_max) for a in self.indirect_tables]

    @property
    def num_free(self) -> int:
        return len(self.free)

    def add(self, bufs: Sequence[tuple[int, int]], n_out: int, token: object,
            indirect: bool = False, pin: bool = False) -> int:
        """Add one chain: bufs[:n_out] are device-readable, the rest device-writable.
        Written to the ring but not visible until kick_prepare(). Returns the head id.
        With pin=True the descriptors stay the chain's after it is used: readd(head) offers
        the same chain again without rewriting them (the device never writes a split
        descriptor table), so their cache lines never move between the two sides."""
        head = self._add(bufs, n_out, token, indirect)
        if pin:
            self._pinned[head] = 1
        return head

    def readd(self, head: int, token: object) -> None:
        """Offer a pinned chain again, unchanged (see add)."""
        if not self._pinned[head] or self.chain_ids[head] is not None:
            raise ValueError(f"chain {head} is not pinned, or is still in flight")
        self.tokens[head] = token
        self.chain_ids[head] = ()
        self._avail16[2 + (self.avail_idx & self.mask)] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def readd_many(self, heads: Sequence[int], tokens: Sequence[object]) -> None:
        """readd() of a batch, in one pass."""
        pinned = self._pinned
        chain_ids = self.chain_ids
        toks = self.tokens
        avail = self._avail16
        mask = self.mask
        idx = self.avail_idx
        try:
            for head, token in zip(heads, tokens):
                if not pinned[head] or chain_ids[head] is not None:
                    raise ValueError(f"chain {head} is not pinned, or is still in flight")
                toks[head] = token
                chain_ids[head] = ()
                avail[2 + (idx & mask)] = head
                idx += 1
        finally:                              # the ones before an error stay offered
            self.avail_idx = idx & 0xFFFF

    def _add(self, bufs: Sequence[tuple[int, int]], n_out: int, token: object,
             indirect: bool) -> int:
        n = len(bufs)
        pack = DESC.pack_into
        if n == 1:                                  # the common single-buffer case
            free = self.free
            if not free:
                raise BufferError("virtqueue full")
            head = free.pop()
            addr, length = bufs[0]
            pack(self._desc, head << 4, addr, length, 0 if n_out else DESC_F_WRITE, 0)
            self.tokens[head] = token
            self.chain_ids[head] = (head,)
            self._avail16[2 + (self.avail_idx & self.mask)] = head
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
            return head
        if indirect and self.indirect_tables:
            if n > self.indirect_max:
                raise ValueError(f"{n} buffers exceed the indirect table ({self.indirect_max})")
            if not self.free:
                raise BufferError("virtqueue full")
            head = self.free.pop()
            table = self._ind_views[head]
            for j, (addr, length) in enumerate(bufs):
                flags = (DESC_F_NEXT if j + 1 < n else 0) | (DESC_F_WRITE if j >= n_out else 0)
                pack(table, j * DESC_SIZE, addr, length, flags, j + 1 if j + 1 < n else 0)
            pack(self._desc, head * DESC_SIZE, self.indirect_tables[head], n * DESC_SIZE,
                 DESC_F_INDIRECT, 0)
            ids = [head]
        else:
            free = self.free
            if n > len(free) or n == 0:
                raise BufferError("virtqueue full" if n else "a chain needs at least one buffer")
            ids = free[-n:][::-1]
            del free[-n:]
            desc = self._desc
            last = n - 1
            for j, (addr, length) in enumerate(bufs):
                flags = (DESC_F_NEXT if j < last else 0) | (DESC_F_WRITE if j >= n_out else 0)
                pack(desc, ids[j] * DESC_SIZE, addr, length, flags, ids[j + 1] if j < last else 0)
            head = ids[0]
        self.tokens[head] = token
        self.chain_ids[head] = ids
        self._avail16[2 + (self.avail_idx & self.mask)] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def kick_prepare(self) -> bool:
        """Publish the new available index; True if the device wants a doorbell."""
        new = self.avail_idx
        old = self.published
        if new == old:
            return False
        self._avail16[1] = new
        self.published = new
        full_barrier()
        if self.event_idx:
            return need_event(self._used16[self._avail_event], new, old)
        return not self._used16[0] & USED_F_NO_NOTIFY

    def has_used(self) -> bool:
        return self._used16[1] != self.last_used

    def get_used(self) -> list[tuple[object, int]]:
        """Reclaim every used element: [(token, written length)], descriptors freed."""
        idx = self._used16[1]
        last = self.last_used
        n = (idx - last) & 0xFFFF
        if not n:
            return []
        outstanding = (self.published - last) & 0xFFFF
        if n > outstanding:
            raise DeviceError(f"used index {idx} is {n} ahead of {last}, but only "
                              f"{outstanding} buffers were made available")
        used32 = self._used32
        mask = self.mask
        tokens = self.tokens
        chain_ids = self.chain_ids
        free = self.free
        pinned = self._pinned
        out = []
        for k in range(n):
            slot = (last + k) & mask
            head = used32[1 + 2 * slot]
            length = used32[2 + 2 * slot]
            if head >= self.size or chain_ids[head] is None:
                raise DeviceError(f"device returned descriptor {head}, which is not in flight")
            ids = chain_ids[head]
            chain_ids[head] = None
            if not pinned[head]:
                free.extend(ids)
            out.append((tokens[head], length))
            tokens[head] = None
        self.last_used = idx
        return out

    def disable_cb(self) -> None:
        """Ask the device not to interrupt (with EVENT_IDX a stale used_event does)."""
        if not self.event_idx:
            self._avail16[0] = AVAIL_F_NO_INTERRUPT

    def enable_cb(self, delay: int = 0) -> bool:
        """Ask for an interrupt on the next used buffer (or after `delay` more, with
        EVENT_IDX), then re-check: True if used buffers are already waiting."""
        if self.event_idx:
            self._avail16[self._used_event] = (self.last_used + delay) & 0xFFFF
        else:
            self._avail16[0] = 0
        full_barrier()
        return self._used16[1] != self.last_used
