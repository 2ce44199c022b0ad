"""Packed virtqueues (VIRTIO 1.x section 2.8): the device side and the driver side.

Layout in guest memory (little-endian):
  descriptor ring          16 bytes per slot: u64 addr, u32 len, u16 id, u16 flags   (align 16)
  driver event suppression u16 off_wrap, u16 flags (read by the device)              (align 4)
  device event suppression u16 off_wrap, u16 flags (written by the device)           (align 4)

A slot is available when its AVAIL bit equals the reader's wrap counter and its USED bit
does not; used when both equal the writer's wrap counter. Each side keeps a position and a
one-bit wrap counter that flips at the end of the ring. For event suppression, a
(position, wrap) pair is turned into a "linear" index in [0, 2*size) so the usual
vring_need_event arithmetic works modulo 2*size.

Batching: the first flags store of a batch is what exposes it (the peer polls only its
next position), so both sides write every other slot first and that one store last.
Event-suppression structures are written with one aligned 32-bit store.
"""

from __future__ import annotations

import struct
from typing import Sequence

from alacrity.errors import DeviceError, GuestError
from alacrity.memory import GuestMemory, full_barrier
from alacrity.virtio.chain import Chain
from alacrity.virtio.spec import (DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_QUEUE_SIZE,
                                  RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE)

DESC = struct.Struct("<QIHH")      # addr, len, id, flags
DESC_BODY = struct.Struct("<QIH")  # the same without flags (a head is exposed by its flags)
AVAIL_USED = 0x8080                # DESC_F_AVAIL | DESC_F_USED


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor ring, the driver area and the device area."""
    return 16 * size, 4, 4


def check_size(size: int) -> None:
    if not 0 < size <= MAX_QUEUE_SIZE:
        raise GuestError(f"packed queue size {size} is not in 1..{MAX_QUEUE_SIZE}")


def _available_bits(wrap: int) -> int:
    """What AVAIL|USED read as for a slot made available under this wrap counter."""
    return 0x0080 if wrap else 0x8000


def _linear(pos: int, wrap: int, size: int) -> int:
    return pos if wrap else pos + size


def _event_wanted(event: int, new: int, old: int, size: int) -> bool:
    """vring_need_event on linear indexes modulo 2*size (event is an off_wrap value)."""
    e = _linear(event & 0x7FFF, event >> 15, size)
    mod = 2 * size
    return (new - e - 1) % mod < (new - old) % mod


class PackedQueue:
    """The device side of a packed virtqueue."""

    def __init__(self, mem: GuestMemory, size: int, desc: int, driver: int, device: int, *,
                 event_idx: bool = False, indirect: bool = False,
                 next_avail: int = 0, avail_wrap: int = 1, next_used: int = 0, used_wrap: int = 1,
                 max_segments: int = MAX_QUEUE_SIZE, max_bytes: int = 1 << 64):
        check_size(size)
        if desc & 15 or driver & 3 or device & 3:
            raise GuestError(f"misaligned packed ring: desc {desc:#x} driver {driver:#x} "
                             f"device {device:#x}")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_segments = min(size, max_segments)   # a list never exceeds the queue
        self.max_bytes = max_bytes                     # one request's total length
        self.addrs = (desc, driver, device)
        self._ring = mem.view(desc, 16 * size)
        self._r16 = self._ring.cast("H")
        self._r32 = self._ring.cast("I")
        self._driver = mem.view(driver, 4).cast("I")   # driver event suppression (we read)
        self._device = mem.view(device, 4).cast("I")   # device event suppression (we write)
        self.next_avail = next_avail
        self.avail_wrap = avail_wrap
        self.next_used = next_used
        self.used_wrap = used_wrap
        self._signalled = _linear(next_used, used_wrap, size)
        self._pending: tuple[int, int] | None = None    # (slot, flags) of the batch's first
        self._inflight = bytearray(size)                # buffer ids the device holds
        self._inflight_desc = 0
        # Lone buffers seen before, by buffer id: (addr, len and id bytes, the flag bits
        # below AVAIL, the Chain made of them). A driver that offers the same buffer under
        # the same id again is served by comparing bytes instead of walking.
        self._lone: list[tuple[bytes, int, Chain] | None] = [None] * size

    # -- taking work ----------------------------------------------------------------------
    def has_work(self) -> bool:
        # (what _available_bits() says, inline: this runs on every turn of a busy-poll loop)
        return (self._r16[self.next_avail * 8 + 7] & AVAIL_USED) == (0x0080 if self.avail_wrap else 0x8000)

    def pop(self, limit: int = MAX_QUEUE_SIZE) -> list[Chain]:
        """The buffers made available since the last call (at most `limit`), in one pass."""
        size = self.size
        r16 = self._r16
        ring = self._ring
        mem = self.mem
        r0 = mem.regions[0]
        base, rsize, rmv = r0.gpa, r0.size, r0.mv
        unpack = DESC.unpack_from
        inflight = self._inflight
        in_desc = self._inflight_desc
        cache = self._lone
        pos = self.next_avail
        wrap = self.avail_wrap
        want = _available_bits(wrap)
        max_links = self.max_segments
        max_bytes = self.max_bytes
        chains: list[Chain] = []
        while limit:
            flags = r16[pos * 8 + 7]
            if (flags & AVAIL_USED) != want:
                break
            limit -= 1
            at = pos << 4
            bid = r16[pos * 8 + 6]
            hit = cache[bid] if bid < size else None
            if hit is not None and hit[1] == flags & 0x7F and hit[0] == ring[at:at + 14]:
                c = hit[2]                          # the same lone buffer as before
            else:
                addr, length, bid, flags = unpack(ring, at)
                c = None
            if c is not None or not flags & (DESC_F_NEXT | DESC_F_INDIRECT):   # a lone one
                if c is None:
                    if length > max_bytes:
                        raise GuestError(f"buffer at slot {pos}: {length} bytes (limit {max_bytes})")
                    off = addr - base
                    v = rmv[off:off + length] if 0 <= off and off + length <= rsize \
                        else mem.view(addr, length)
                    c = (Chain(bid, [], [v], 0, length) if flags & DESC_F_WRITE
                         else Chain(bid, [v], [], length, 0))
                    if bid < size:
                        cache[bid] = (bytes(ring[at:at + 14]), flags & 0x7F, c)
                if bid >= size or inflight[bid]:
                    raise GuestError(f"buffer id {bid} at slot {pos} is out of range or in use")
                in_desc += 1
                if in_desc > size:
                    raise GuestError(f"more than {size} descriptors in flight")
                inflight[bid] = 1
                chains.append(c)
                pos += 1
                if pos == size:
                    pos = 0
                    wrap ^= 1
                    want = _available_bits(wrap)
                continue
            readable: list[memoryview] = []
            writable: list[memoryview] = []
            rlen = wlen = 0
            count = 0
            p, w, pw = pos, wrap, want
            while True:
                addr, length, bid, flags = unpack(ring, p << 4)
                if count and (flags & AVAIL_USED) != pw:
                    raise GuestError(f"buffer at slot {pos}: slot {p} of its list is not "
                                     f"available (flags {flags:#x})")
                count += 1
                if flags & DESC_F_INDIRECT:
                    if count != 1 or flags & DESC_F_NEXT:
                        raise GuestError("indirect descriptor inside a list (with NEXT, or "
                                         "after other descriptors)")
                    rlen, wlen = self._indirect(addr, length, readable, writable)
                else:
                    off = addr - base
                    v = rmv[off:off + length] if 0 <= off and off + length <= rsize \
                        else mem.view(addr, length)
                    if flags & DESC_F_WRITE:
                        writable.append(v)
                        wlen += length
                    elif writable:
                        raise GuestError(f"buffer at slot {pos}: device-readable element "
                                         f"after a device-writable one")
                    else:
                        readable.append(v)
                        rlen += length
                p += 1
                if p == size:
                    p = 0
                    w ^= 1
                    pw = _available_bits(w)
                if not flags & DESC_F_NEXT:
                    break
                if count >= max_links:
                    raise GuestError(f"descriptor list at slot {pos} is longer than "
                                     f"{max_links} descriptors (queue size {size})")
            if bid >= size:
                raise GuestError(f"buffer id {bid} at slot {pos} is not below the queue size {size}")
            if rlen + wlen > max_bytes:
                raise GuestError(f"buffer at slot {pos}: {rlen + wlen} bytes (limit {max_bytes})")
            if inflight[bid]:
                raise GuestError(f"buffer id {bid} made available again while in use")
            in_desc += count
            if in_desc > size:
                raise GuestError(f"more than {size} descriptors in flight")
            inflight[bid] = 1
            chains.append(Chain(bid, readable, writable, rlen, wlen, count))
            pos, wrap, want = p, w, pw
        # (a GuestError above leaves these behind; the device needs a reset then anyway)
        self.next_avail = pos
        self.avail_wrap = wrap
        self._inflight_desc = in_desc
        return chains

    def _indirect(self, addr: int, length: int, readable: list[memoryview],
                  writable: list[memoryview]) -> tuple[int, int]:
        """Map an indirect table: len/16 elements in order; only WRITE counts in them."""
        if not self.indirect:
            raise GuestError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
        if length == 0 or length % 16:
            raise GuestError(f"indirect table length {length} is not a non-zero multiple of 16")
        n = length // 16
        if n > self.max_segments:
            raise GuestError(f"indirect table of {n} elements is longer than "
                             f"{self.max_segments} (queue size {self.size})")
        table = self.mem.view(addr, length)
        view = self.mem.view
        rlen = wlen = 0
        for a, ln, _, f in DESC.iter_unpack(table):
            v = view(a, ln)
            if f & DESC_F_WRITE:
                writable.append(v)
                wlen += ln
            elif writable:
                raise GuestError("indirect table: device-readable element after a writable one")
            else:
                readable.append(v)
                rlen += ln
        return rlen, wlen

    def take_copies(self, limit: int, skip: int, longest: int) -> tuple[list[int], list[bytes]]:
        """The fast path of queues whose requests are each one device-readable buffer (frames
        to transmit): (buffer ids to complete, a copy of each buffer after its first `skip`
        bytes), in one pass and without Chain objects. Stops at the first buffer that is
        anything else, shorter than `skip`, longer than `longest`, or breaks a rule (an id
        out of range or in flight): pop() takes that one, and raises. Each slot's flags are
        read before its body."""
        size = self.size
        r16 = self._r16
        ring = self._ring
        mem = self.mem
        r0 = mem.regions[0]
        base, rsize, rmv = r0.gpa, r0.size, r0.mv
        unpack = DESC_BODY.unpack_from
        inflight = self._inflight
        in_desc = self._inflight_desc
        if longest > self.max_bytes:
            longest = self.max_bytes         # pop() refuses the longer ones
        pos = self.next_avail
        wrap = self.avail_wrap
        want = _available_bits(wrap)
        heads: list[int] = []
        copies: list[bytes] = []
        while limit and in_desc < size:
            flags = r16[pos * 8 + 7]
            if flags & 0x80FF != want:       # not available, or NEXT/WRITE/INDIRECT set
                break
            addr, length, bid = unpack(ring, pos << 4)
            if length < skip or length > longest or bid >= size or inflight[bid]:
                break
            off = addr - base
            if off >= 0 and off + length <= rsize:
                copies.append(rmv[off + skip:off + length].tobytes())
            else:
                copies.append(mem.view(addr, length)[skip:].tobytes())
            inflight[bid] = 1
            in_desc += 1
            heads.append(bid)
            limit -= 1
            pos += 1
            if pos == size:
                pos = 0
                wrap ^= 1
                want = _available_bits(wrap)
        self.next_avail = pos
        self.avail_wrap = wrap
        self._inflight_desc = in_desc
        return heads, copies

    def push_heads(self, heads: list[int]) -> None:
        """push_many() of one-slot buffers the device wrote nothing into, by buffer id."""
        size = self.size
        r16 = self._r16
        r32 = self._r32
        inflight = self._inflight
        pos = self.next_used
        wrap = self.used_wrap
        used_bits = AVAIL_USED if wrap else 0
        pending = self._pending
        for bid in heads:
            inflight[bid] = 0
            r16[pos * 8 + 6] = bid
            r32[pos * 4 + 2] = 0
            if pending is None:
                pending = (pos, used_bits)
            else:
                r16[pos * 8 + 7] = used_bits
            pos += 1
            if pos == size:
                pos = 0
                wrap ^= 1
                used_bits = AVAIL_USED if wrap else 0
        self._pending = pending
        self._inflight_desc -= len(heads)
        self.next_used = pos
        self.used_wrap = wrap

    # -- giving work back -------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        raise NotImplementedError("packed rings need the chain: use push_many")

    def push_many(self, chains: list[Chain], written: list[int]) -> None:
        """Write used descriptors in completion order; the batch's first flags wait for
        publish()."""
        size = self.size
        r16 = self._r16
        r32 = self._r32
        inflight = self._inflight
        pos = self.next_used
        wrap = self.used_wrap
        used_bits = AVAIL_USED if wrap else 0
        pending = self._pending
        freed = 0
        for c, n in zip(chains, written):
            bid = c.head
            if not inflight[bid]:
                raise RuntimeError(f"buffer id {bid} used twice")   # a device-model bug
            inflight[bid] = 0
            r16[pos * 8 + 6] = bid
            r32[pos * 4 + 2] = n
            flags = used_bits | DESC_F_WRITE if n else used_bits
            if pending is None:
                pending = (pos, flags)
            else:
                r16[pos * 8 + 7] = flags
            k = c.ndesc
            freed += k
            pos += k
            if pos >= size:
                pos -= size
                wrap ^= 1
                used_bits = AVAIL_USED if wrap else 0
        self._pending = pending
        self._inflight_desc -= freed
        self.next_used = pos
        self.used_wrap = wrap

    def publish(self) -> bool:
        """Expose the batch (one flags store). True if the driver wants a notification."""
        if self._pending is None:
            return False
        slot, flags = self._pending
        self._pending = None
        self._r16[slot * 8 + 7] = flags
        full_barrier()
        new = _linear(self.next_used, self.used_wrap, self.size)
        old = self._signalled
        self._signalled = new
        ev = self._driver[0]
        mode = (ev >> 16) & 3
        if mode == RING_EVENT_FLAGS_DISABLE:
            return False
        if mode == RING_EVENT_FLAGS_DESC and self.event_idx:
            return _event_wanted(ev & 0xFFFF, new, old, self.size)
        return True

    # -- doorbell suppression --------------------------------------------------------------
    def disable_notify(self) -> None:
        self._device[0] = RING_EVENT_FLAGS_DISABLE << 16

    def enable_notify(self) -> bool:
        """Ask for a doorbell (at our next slot, with EVENT_IDX), then re-check."""
        if self.event_idx:
            self._device[0] = (RING_EVENT_FLAGS_DESC << 16) | self.next_avail | (self.avail_wrap << 15)
        else:
            self._device[0] = 0
        full_barrier()
        return self.has_work()

    def state(self) -> dict[str, int]:
        return {"next_avail": self.next_avail, "avail_wrap": self.avail_wrap,
                "next_used": self.next_used, "used_wrap": self.used_wrap}


class PackedDriverQueue:
    """The driver side of a packed virtqueue."""

    def __init__(self, mem: GuestMemory, size: int, desc: int, driver: int, device: int, *,
                 event_idx: bool = False, indirect_tables: Sequence[int] | None = None,
                 indirect_max: int = 0):
        check_size(size)
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.addrs = (desc, driver, device)
        self._ring = mem.view(desc, 16 * size)
        self._ring[:] = bytes(16 * size)
        self._r16 = self._ring.cast("H")
        self._r32 = self._ring.cast("I")
        drv = mem.view(driver, 4)
        dev = mem.view(device, 4)
        drv[:] = bytes(4)
        dev[:] = bytes(4)
        self._driver = drv.cast("I")
        self._device = dev.cast("I")
        self.next_avail = 0
        self.avail_wrap = 1
        self.next_used = 0
        self.used_wrap = 1
        self.published = 0              # linear index the device has been shown
        self.num_free = size            # free descriptor slots
        self.free_ids: list[int] = list(range(size - 1, -1, -1))
        self.tokens: list[object] = [None] * size
        self.ndesc = [0] * size
        self._pinned = bytearray(size)
        self._pending: tuple[int, int] | None = None
        self.indirect_tables = list(indirect_tables or [])
        self.indirect_max = indirect_max
        self._ind_views = [mem.view(a, 16 * indirect_max) for a in self.indirect_tables]

    def add(self, bufs: Sequence[tuple[int, int]], n_out: int, token: object,
            indirect: bool = False, pin: bool = False) -> object:
        """Add one buffer: bufs[:n_out] device-readable, the rest device-writable. Not
        visible to the device until kick_prepare(). Returns a handle for readd(): a
        packed ring has no descriptors to keep (the device overwrites them with used
        entries), so offering the buffer again writes it again; but a pinned buffer keeps
        its buffer id, so the device can recognise it."""
        if not pin:
            self._add(bufs, n_out, token, indirect, None)
            return None
        if not self.free_ids:
            raise BufferError("virtqueue full")
        bid = self.free_ids.pop()
        self._pinned[bid] = 1
        self._add(bufs, n_out, token, indirect, bid)
        # a lone buffer is offered again from its 14 descriptor bytes (addr, len, id)
        body = DESC_BODY.pack(bufs[0][0], bufs[0][1], bid) if len(bufs) == 1 else None
        return (bufs, n_out, indirect, bid, body, 0 if n_out else DESC_F_WRITE)

    def readd(self, handle: object, token: object) -> None:
        bufs, n_out, indirect, bid, _, _ = handle  # type: ignore[misc]
        if self.ndesc[bid]:
            raise ValueError(f"buffer {bid} is still in flight")
        # _add(), not readd_many() of one: this is on the latency path of every received
        # frame, and the batch loop's setup costs as much again as the offer itself
        self._add(bufs, n_out, token, indirect, bid)

    def readd_many(self, handles: Sequence[object], tokens: Sequence[object]) -> None:
        """readd() of a batch (rx buffers handed back, tx frames sent again), in one pass."""
        n = len(handles)
        if not n:
            return
        if n > self.num_free or handles[0][4] is None:  # type: ignore[index]
            for h, t in zip(handles, tokens):   # lists, or a ring too full: one by one
                self.readd(h, t)
            return
        ring = self._ring
        r16 = self._r16
        ndesc = self.ndesc
        toks = self.tokens
        size = self.size
        pos = self.next_avail
        wrap = self.avail_wrap
        avail = 0x0080 if wrap else 0x8000
        pending = self._pending
        done = 0
        try:
            for h, token in zip(handles, tokens):
                _, _, _, bid, body, wflag = h  # type: ignore[misc]
                if ndesc[bid] or body is None:
                    raise ValueError(f"buffer {bid} is still in flight, or is a list "
                                     f"(readd_many takes lone buffers)")
                at = pos << 4
                ring[at:at + 14] = body
                flags = avail | wflag
                if pending is None:
                    pending = (pos, flags)
                else:
                    r16[pos * 8 + 7] = flags
                toks[bid] = token
                ndesc[bid] = 1
                done += 1
                pos += 1
                if pos == size:
                    pos = 0
                    wrap ^= 1
                    avail = 0x0080 if wrap else 0x8000
        finally:                              # the ones before an error stay offered
            self._pending = pending
            self.next_avail = pos
            self.avail_wrap = wrap
            self.num_free -= done

    def _add(self, bufs: Sequence[tuple[int, int]], n_out: int, token: object,
             indirect: bool, bid: int | None) -> int:
        n = len(bufs)
        if n == 1 and self.num_free and (bid is not None or self.free_ids):
            # the common single-element case
            if bid is None:
                bid = self.free_ids.pop()
            pos = self.next_avail
            addr, length = bufs[0]
            DESC_BODY.pack_into(self._ring, pos << 4, addr, length, bid)
            flags = (0x0080 if self.avail_wrap else 0x8000) | (0 if n_out else DESC_F_WRITE)
            if self._pending is None:
                self._pending = (pos, flags)       # the batch's first: kick_prepare exposes it
            else:
                self._r16[pos * 8 + 7] = flags
            pos += 1
            if pos == self.size:
                pos = 0
                self.avail_wrap ^= 1
            self.next_avail = pos
            self.num_free -= 1
            self.tokens[bid] = token
            self.ndesc[bid] = 1
            return bid
        if n == 0:
            raise BufferError("a buffer needs at least one element")
        use_ind = indirect and n > 1 and bool(self.indirect_tables)
        slots = 1 if use_ind else n
        if slots > self.num_free or (bid is None and not self.free_ids):
            raise BufferError("virtqueue full")
        if use_ind and n > self.indirect_max:
            raise ValueError(f"{n} elements exceed the indirect table ({self.indirect_max})")
        if bid is None:
            bid = self.free_ids.pop()
        size = self.size
        ring = self._ring
        r16 = self._r16
        pos = self.next_avail
        wrap = self.avail_wrap
        avail = 0x0080 if wrap else 0x8000
        head, head_flags = pos, 0
        if use_ind:
            table = self._ind_views[bid]
            for j, (a, ln) in enumerate(bufs):
                DESC.pack_into(table, 16 * j, a, ln, 0, DESC_F_WRITE if j >= n_out else 0)
            DESC_BODY.pack_into(ring, pos << 4, self.indirect_tables[bid], 16 * n, bid)
            head_flags = DESC_F_INDIRECT | avail
            pos += 1
            if pos == size:
                pos = 0
                wrap ^= 1
        else:
            last = n - 1
            for j, (a, ln) in enumerate(bufs):
                flags = avail | (DESC_F_NEXT if j < last else 0) | (DESC_F_WRITE if j >= n_out else 0)
                if j == 0:
                    DESC_BODY.pack_into(ring, pos << 4, a, ln, bid)   # flags come last
                    head_flags = flags
                else:
                    DESC.pack_into(ring, pos << 4, a, ln, bid, flags)
                pos += 1
                if pos == size:
                    pos = 0
                    wrap ^= 1
                    avail = 0x0080 if wrap else 0x8000
        if self._pending is None:
            self._pending = (head, head_flags)       # exposed by kick_prepare()
        else:
            r16[head * 8 + 7] = head_flags
        self.next_avail = pos
        self.avail_wrap = wrap
        self.num_free -= slots
        self.tokens[bid] = token
        self.ndesc[bid] = slots
        return bid

    def kick_prepare(self) -> bool:
        """Expose the added buffers; True if the device wants a doorbell."""
        if self._pending is None:
            return False
        slot, flags = self._pending
        self._pending = None
        self._r16[slot * 8 + 7] = flags
        full_barrier()
        new = _linear(self.next_avail, self.avail_wrap, self.size)
        old = self.published
        self.published = new
        ev = self._device[0]
        mode = (ev >> 16) & 3
        if mode == RING_EVENT_FLAGS_DISABLE:
            return False
        if mode == RING_EVENT_FLAGS_DESC and self.event_idx:
            return _event_wanted(ev & 0xFFFF, new, old, self.size)
        return True

    def has_used(self) -> bool:
        # both bits: a slot skipped by a list in the previous lap still carries that lap's
        # available flags, whose USED bit alone would look used
        return (self._r16[self.next_used * 8 + 7] & AVAIL_USED) == (AVAIL_USED if self.used_wrap else 0)

    def get_used(self) -> list[tuple[object, int]]:
        """Reclaim every used buffer: [(token, written length)]."""
        out = []
        size = self.size
        r16 = self._r16
        r32 = self._r32
        tokens = self.tokens
        ndesc = self.ndesc            # slots of each buffer id in flight; 0: not in flight
        pinned = self._pinned
        pos = self.next_used
        wrap = self.used_wrap
        want = AVAIL_USED if wrap else 0
        while (r16[pos * 8 + 7] & AVAIL_USED) == want:
            bid = r16[pos * 8 + 6]
            if bid >= size or not ndesc[bid]:
                raise DeviceError(f"device used buffer id {bid}, which is not in flight")
            length = r32[pos * 4 + 2]
            out.append((tokens[bid], length))
            tokens[bid] = None
            if not pinned[bid]:
                self.free_ids.append(bid)
            n = ndesc[bid]
            ndesc[bid] = 0
            self.num_free += n
            pos += n
            if pos >= size:
                pos -= size
                wrap ^= 1
                want = AVAIL_USED if wrap else 0
        self.next_used = pos
        self.used_wrap = wrap
        return out

    def disable_cb(self) -> None:
        self._driver[0] = RING_EVENT_FLAGS_DISABLE << 16

    def enable_cb(self, delay: int = 0) -> bool:
        """Ask for a notification on the next used buffer (or `delay` slots later, with
        EVENT_IDX), then re-check: True if used buffers are already waiting."""
        if self.event_idx:
            lin = (_linear(self.next_used, self.used_wrap, self.size) + delay) % (2 * self.size)
            wrap = 1 if lin < self.size else 0
            off = lin if wrap else lin - self.size
            self._driver[0] = (RING_EVENT_FLAGS_DESC << 16) | off | (wrap << 15)
        else:
            self._driver[0] = 0
        full_barrier()
        return self.has_used()

    @property
    def last_used(self) -> int:
        return _linear(self.next_used, self.used_wrap, self.size)
