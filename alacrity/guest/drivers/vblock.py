"""A guest-side vblock driver with queue depth N (vblock is alacrity's own block device on
vbus; see alacrity/vbus/vblock.py for the layout).

Each slot owns a request (header and one iov) and a data buffer; submit() writes the
request, kick() posts every submitted request with one pass over the IOQ and one inject,
reap() pops finished requests at the valid head. Interrupts come through the bridge's
event queue; the queue's own signal is enabled only while wait() sleeps.
"""

from __future__ import annotations

import time

from alacrity.errors import DeviceError
from alacrity.guest.drivers.vbus_bridge import VbusBridgeDriver, VbusError
from alacrity.vbus import vblock as V
from alacrity.vbus.ioq import Ioq, init_ring, ring_size
from alacrity.vbus.shm_signal import NORTH
from alacrity.bus import QueueStats

SLOT_REQ = V.request_size(1)          # 40 bytes: the header and one iov


class VblockError(IOError):
    def __init__(self, status: int, what: str):
        super().__init__(f"vblock {what} failed with status {status}")
        self.status = status


class VblockDriver:
    def __init__(self, bridge: VbusBridgeDriver, devid: int | None = None, *, depth: int = 1,
                 max_bytes: int = 4096, queue_size: int = 256, always: bool = False,
                 poll_us: float = 0.0):
        self.b = bridge
        m = bridge.m
        if devid is None:
            devid = bridge.find(V.TYPE)
        self.devh = bridge.devopen(devid, V.VERSION)
        r, out = bridge.devcall(self.devh, V.FUNC_QUERY, out_len=V.QUERY.size)
        if r:
            raise VbusError("vblock QUERY", r)
        self.capacity, self.blk_size, flags, self.max_segments = V.QUERY.unpack(out)
        self.read_only = bool(flags & V.FLAG_RO)
        if depth > queue_size:
            raise ValueError(f"depth {depth} exceeds the queue size {queue_size}")
        mem = m.mem
        alloc = m.alloc.alloc
        ring = alloc(ring_size(queue_size), 64)
        init_ring(mem, ring, queue_size)
        self.q = Ioq(mem, ring, NORTH, always=always)
        self.handle = bridge.devshm(self.devh, V.QUEUE_ID, ring, ring_size(queue_size),
                                    signal=self.q.signal)
        self.depth = depth
        self.max_bytes = max_bytes
        # one cache line per request: the device writes one status while we fill the next
        self.req = [alloc(64, 64) for _ in range(depth)]
        self.req_v = [mem.view(a, SLOT_REQ) for a in self.req]
        self.data = [alloc(max(max_bytes, 512), 4096) for _ in range(depth)]
        self.data_v = [mem.view(a, max(max_bytes, 512)) for a in self.data]
        self.stats = QueueStats()
        self.poll_ns = int(poll_us * 1000)
        self.always = always
        self._staged: list[tuple[int, int, int]] = []
        if not always:
            self.q.signal.disable()        # completions signalled only when wait() asks

    # -- asynchronous interface -------------------------------------------------------------
    def submit(self, slot: int, rtype: int, sector: int = 0, nbytes: int = 0) -> None:
        """Stage one request in `slot` (posted by kick())."""
        if nbytes > self.max_bytes:
            raise ValueError(f"{nbytes} bytes exceed the slot size {self.max_bytes}")
        v = self.req_v[slot]
        V.REQ.pack_into(v, 0, rtype, 0xFF, sector, 1 if nbytes else 0)
        if nbytes:
            V.IOV.pack_into(v, V.REQ.size, nbytes, self.data[slot])
        self._staged.append((slot, self.req[slot], V.request_size(1 if nbytes else 0)))

    def kick(self) -> bool:
        """Post what was staged and signal the device once. True if the signal crossed."""
        staged = self._staged
        if not staged:
            return False
        self.q.post(staged)
        staged.clear()
        if self.q.signal.inject():
            self.stats.doorbells += 1
            return True
        self.stats.doorbells_suppressed += 1
        return False

    def reap(self) -> list[tuple[int, int]]:
        """Finished requests: [(slot, status)]."""
        req_v = self.req_v
        return [(slot, req_v[slot][4]) for slot in self.q.reap(self.depth)]

    def wait(self, timeout: float | None = 10.0) -> None:
        """Return once a finished request waits: poll for `poll_us` (if set), then enable
        the queue's signal (which wakes at once if the device signalled meanwhile),
        re-check, and sleep on the bus interrupt."""
        q = self.q
        done = q.done
        if done():
            return
        if self.poll_ns:
            clock = time.perf_counter_ns
            deadline = clock() + self.poll_ns
            while True:
                for _ in range(16):
                    if done():
                        return
                if clock() >= deadline:
                    break
        sig = q.signal
        while True:
            sig.enable()
            if done():
                break
            if not self.b.wait_interrupt(timeout):
                raise TimeoutError(f"no completion within {timeout} s")
            self.stats.interrupts += 1
            if done():
                break
        if not self.always:
            sig.disable()

    def ack(self) -> None:
        """Nothing to acknowledge: shm-signal acknowledges in shared memory (pending),
        where virtio-mmio needs two exits. Here so callers can treat drivers alike."""

    # -- synchronous helpers (slot 0) ---------------------------------------------------------
    def _sync(self, rtype: int, sector: int = 0, nbytes: int = 0, what: str = "") -> None:
        self.submit(0, rtype, sector, nbytes)
        self.kick()
        while True:
            self.wait()
            done = self.reap()
            if done:
                break
        if done != [(0, done[0][1])]:
            raise DeviceError(f"unexpected completions {done}")
        if done[0][1] != V.S_OK:
            raise VblockError(done[0][1], what or f"request type {rtype}")

    def read(self, sector: int, nbytes: int) -> bytes:
        self._sync(V.T_IN, sector, nbytes, f"read of {nbytes} at sector {sector}")
        return bytes(self.data_v[0][:nbytes])

    def write(self, sector: int, data: bytes) -> None:
        self.data_v[0][:len(data)] = data
        self._sync(V.T_OUT, sector, len(data), f"write of {len(data)} at sector {sector}")

    def flush(self) -> None:
        self._sync(V.T_FLUSH, 0, 0, "flush")

    def get_id(self) -> bytes:
        self.data_v[0][:20] = bytes(20)
        self._sync(V.T_GET_ID, 0, 20, "get-id")
        return bytes(self.data_v[0][:20]).rstrip(b"\0")

    def close(self) -> None:
        self.b.devclose(self.devh)
