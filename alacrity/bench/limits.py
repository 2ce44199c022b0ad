"""Physical limits, measured in the same run as the benchmark they bound.

- file: the same access pattern with plain `os.preadv`/`os.pwritev` on the same file, in
  one process, no ring, no guest.
- null: the same request loop through the virtio-blk device model in one process, with
  no ring and no second process (what the device costs, with nothing in between).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Callable

from alacrity.devices.block import BlockCore, NullBackend
from alacrity.memory import GuestMemory
from alacrity.virtio import blk as B
from alacrity.virtio.chain import Chain


def block_offsets(rw: str, bs: int, capacity: int, seed: int = 1, n: int = 1 << 16) -> list[int]:
    """Byte offsets of successive requests: sequential or uniformly random, bs-aligned,
    cycling through a precomputed table so the hot loop draws no random numbers."""
    blocks = max(1, capacity // bs)
    if rw.startswith("rand"):
        rng = random.Random(seed)
        return [rng.randrange(blocks) * bs for _ in range(min(n, max(blocks, 1) * 4))]
    return [(i % blocks) * bs for i in range(min(n, blocks))]


def _timed(loop: Callable[[int], int], seconds: float) -> tuple[int, float]:
    """Run loop(batch) until `seconds` passed; returns (ops, elapsed)."""
    ops = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    batch = 64
    while True:
        ops += loop(batch)
        now = time.perf_counter()
        if now >= end:
            return ops, now - t0


def file_limit(path: str, rw: str, bs: int, seconds: float) -> dict[str, float]:
    write = "write" in rw
    fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        capacity = os.lseek(fd, 0, os.SEEK_END)
        offs = block_offsets(rw, bs, capacity)
        buf = memoryview(bytearray(bs))
        bufs = [buf]
        op = os.pwritev if write else os.preadv
        pos = 0
        n_offs = len(offs)

        def loop(batch: int) -> int:
            nonlocal pos
            for _ in range(batch):
                op(fd, bufs, offs[pos])
                pos += 1
                if pos == n_offs:
                    pos = 0
            return batch

        ops, dt = _timed(loop, seconds)
    finally:
        os.close(fd)
    return {"ops_per_s": ops / dt, "bytes_per_s": ops * bs / dt,
            "what": f"os.{'pwritev' if write else 'preadv'} {bs} B in one process"}


def null_limit(rw: str, bs: int, seconds: float, capacity: int) -> dict[str, float]:
    """The virtio-blk request handler on a null backend, called directly in a loop."""
    mem = GuestMemory.create([(0, 1 << 20)], name="alacrity-limit")
    try:
        dev = B.VirtioBlk(BlockCore(NullBackend(capacity)))
        rtype = B.T_OUT if "write" in rw else B.T_IN
        hdr = mem.view(0, 16)
        data = mem.view(4096, bs) if bs <= (1 << 20) - 8192 else memoryview(bytearray(bs))
        status = mem.view(64, 1)
        if rtype == B.T_OUT:
            chain = Chain(0, [hdr, data], [status], 16 + bs, 1)
        else:
            chain = Chain(0, [hdr], [data, status], 16, bs + 1)
        offs = [o // 512 for o in block_offsets(rw, bs, capacity)]
        n_offs = len(offs)
        pack = B.HEADER.pack_into
        handle = dev.handle
        pos = 0

        def loop(batch: int) -> int:
            nonlocal pos
            for _ in range(batch):
                pack(hdr, 0, rtype, 0, offs[pos])
                handle(chain)
                pos += 1
                if pos == n_offs:
                    pos = 0
            return batch

        ops, dt = _timed(loop, seconds)
    finally:
        mem.close()
    return {"ops_per_s": ops / dt, "bytes_per_s": ops * bs / dt,
            "what": "virtio-blk handler on null, in one process, no ring"}


# -- net ------------------------------------------------------------------------------------
def net_stream_limit(size: int, seconds: float, batch: int = 32) -> dict[str, float]:
    """The same frames through the net device core in one process: transmit on a loopback
    backend, receive into the backlog, take them out. No ring, no second process."""
    from alacrity.devices.net import LoopbackBackend, NetCore

    core = NetCore(LoopbackBackend())
    backlog = core.backlog
    frames = [bytes(size)] * batch

    def loop(n: int) -> int:
        for _ in range(n):
            core.transmit(frames)
            backlog.clear()
        return n * batch

    ops, dt = _timed(loop, seconds)
    return {"ops_per_s": ops / dt, "bytes_per_s": ops * size / dt,
            "what": f"{size} B frames through the net core on loopback, in one process, no ring"}


class EventfdEcho:
    """Host half of the eventfd round-trip limit: on the I/O thread, answer each ping."""

    def __init__(self, io: Any):
        self.io = io
        self.ping = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.pong = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.active = False

    def start(self) -> None:
        self.io.add_reader(self.ping, self._on_ping)
        self.active = True

    def _on_ping(self) -> None:
        try:
            os.eventfd_read(self.ping)
        except BlockingIOError:
            return
        os.eventfd_write(self.pong, 1)

    def stop(self) -> None:
        if self.active:
            self.io.remove_reader(self.ping)
            self.active = False

    def close(self) -> None:
        self.stop()
        os.close(self.ping)
        os.close(self.pong)


class ShmEcho:
    """Host half of the shared-memory round-trip limit: a poller on the I/O thread copies
    the guest's ping word to the pong word (both in guest RAM, one cache line)."""

    def __init__(self, io: Any, mem: Any, addr: int):
        self.io = io
        self.words = mem.view(addr, 8).cast("I")
        self.last = self.words[0]

    def poll_start(self) -> None:
        pass

    def poll(self) -> bool:
        v = self.words[0]
        if v != self.last:
            self.last = v
            self.words[1] = v
            return True
        return False

    def poll_stop(self) -> bool:
        # nothing can wake the I/O thread for a ping written to memory: keep it polling
        # for as long as the echo is registered (a guest preempted for longer than the
        # poll window would otherwise wait forever)
        return True

    def start(self) -> None:
        self.io.add_poller(self)

    def stop(self) -> None:
        self.io.remove_poller(self)


def guest_eventfd_rtt(ping: int, pong: int, seconds: float) -> list[int]:
    """Guest half: round trips through the host's EventfdEcho; returns ns per round trip."""
    import select
    p = select.poll()
    p.register(pong, select.POLLIN)
    clock = time.perf_counter_ns
    out = []
    end = clock() + int(seconds * 1e9)
    while True:
        t = clock()
        if t >= end:
            return out
        os.eventfd_write(ping, 1)
        while True:
            p.poll(1000)
            try:
                os.eventfd_read(pong)
                break
            except BlockingIOError:
                continue
        out.append(clock() - t)


def guest_shm_rtt(mem: Any, addr: int, seconds: float) -> list[int]:
    """Guest half: round trips through the host's ShmEcho, both sides spinning."""
    words = mem.view(addr, 8).cast("I")
    clock = time.perf_counter_ns
    out = []
    seq = words[0]
    end = clock() + int(seconds * 1e9)
    spins = 0
    while True:
        t = clock()
        if t >= end:
            return out
        seq = (seq + 1) & 0xFFFFFFFF
        words[0] = seq
        while words[1] != seq:
            spins += 1
            if spins & 0xFFFFF == 0 and clock() > end + 1_000_000_000:
                raise TimeoutError("the host stopped answering the shared-memory ping")
        out.append(clock() - t)
