"""virtio-net framing (VIRTIO 1.x section 5.1) on top of the transport-free `NetCore`.

One receive queue (0) and one transmit queue (1). Every frame carries a 12-byte
`virtio_net_hdr` (VERSION_1). No offloads are offered, so the header's only live field
is num_buffers on receive: 1, or with VIRTIO_NET_F_MRG_RXBUF the number of buffers the
frame was spread over.

Transmit: each batch of tx chains is framed, then handed to the core at once. Receive: the
device drives the rx queue itself. Frames wait in the core's backlog until the guest has
posted buffers; rx doorbells are only asked for while frames wait for buffers.
Malformed chains are dropped and counted, never a crash.
"""

from __future__ import annotations

import collections
import logging
import struct
from typing import Callable

from alacrity.devices.net import VNET_HDR_LEN, NetCore
from alacrity.virtio import spec
from alacrity.virtio.chain import Chain
from alacrity.virtio.device import Handler, VirtioDevice, VirtQueue

log = logging.getLogger("alacrity.virtio.net")

# feature bits (5.1.3)
F_CSUM = 0
F_GUEST_CSUM = 1
F_MTU = 3
F_MAC = 5
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_MQ = 22

S_LINK_UP = 1

HDR = struct.Struct("<BBHHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu
HDR_ONE_BUFFER = HDR.pack(0, 0, 0, 0, 0, 0, 1)
RX, TX = 0, 1


def _scatter(views: list[memoryview], data: bytes | memoryview, offset: int = 0) -> int:
    """Copy data into the views starting `offset` bytes in; returns bytes copied."""
    done = 0
    for v in views:
        n = len(v)
        if offset >= n:
            offset -= n
            continue
        k = min(n - offset, len(data) - done)
        v[offset:offset + k] = data[done:done + k]
        done += k
        offset = 0
        if done == len(data):
            break
    return done


class VirtioNet(VirtioDevice):
    device_id = spec.ID_NET
    name = "virtio-net"
    num_queues = 2

    def __init__(self, core: NetCore, *, queue_max: int = 256, rx_budget: int = 64,
                 tx_budget: int = 32):
        super().__init__()
        self.core = core
        self.queue_max = queue_max
        self.rx_budget = rx_budget
        self.tx_budget = tx_budget
        self._tx: list[bytes] = []
        self._rxbufs: collections.deque[Chain] = collections.deque()
        self.rxq: VirtQueue | None = None
        self.txq: VirtQueue | None = None
        self._tx_blocked = False
        self.mergeable = False
        core.on_rx = self._frames_waiting

    # -- virtio device model ------------------------------------------------------------------
    def device_features(self) -> int:
        return (spec.bit(F_MAC) | spec.bit(F_STATUS) | spec.bit(F_MTU) | spec.bit(F_MRG_RXBUF))

    def config(self) -> bytes:
        return CONFIG.pack(self.core.mac, S_LINK_UP if self.core.link_up else 0, 1, self.core.mtu)

    def handler(self, index: int) -> Handler | None:
        return self.handle_tx if index == TX else None

    def copier(self, index: int) -> tuple[int, Callable[[list[bytes]], None]] | None:
        # a frame in one buffer (what DPDK, Linux and our drivers send): copied by the ring,
        # at most header + MTU frame; anything longer goes to handle_tx, which drops it
        return ((VNET_HDR_LEN, VNET_HDR_LEN + self.core.max_frame, self._take_frames)
                if index == TX else None)

    def _take_frames(self, frames: list[bytes]) -> None:
        self._tx += frames

    def after(self, index: int) -> Callable[[], None] | None:
        return self._send_batch if index == TX else None

    def budget(self, index: int) -> int | None:
        # a frame costs far less than a block request: take more per pass
        return self.tx_budget if index == TX else None

    def limit(self, index: int) -> Callable[[], int] | None:
        return self._tx_room if index == TX else None

    def poller(self, index: int) -> Callable[[], bool] | None:
        return self._poll_rx if index == RX else None

    def _poll_rx(self) -> bool:
        if self.core.backlog:
            return self.pump()
        # idle: take the buffers the driver posted now, so the next frame finds one ready
        # instead of walking the ring on its way in
        vq = self.rxq
        if vq is not None and not self._rxbufs and vq.ring.has_work():
            self._rxbufs.extend(vq.ring.pop(self.rx_budget))
        return False

    def _tx_room(self) -> int:
        room = self.core.room()
        if room <= 0 and not self._tx_blocked:
            self._tx_blocked = True
            self.core.backend.wait_room(self._tx_unblocked)
        return room

    def _tx_unblocked(self) -> None:
        self._tx_blocked = False
        if self.txq is not None:
            self.schedule(self.txq.service)

    def kick(self, index: int) -> bool:
        if index == RX and self.rxq is not None:
            self.rxq.ring.disable_notify()   # buffers are welcome, doorbells for them are not
            return self.pump()
        return False

    def activate(self, queues: list[VirtQueue | None]) -> None:
        self.rxq = queues[RX]
        self.txq = queues[TX]
        self.mergeable = bool(self.features & spec.bit(F_MRG_RXBUF))
        self._rxbufs.clear()
        if self.core.backlog:
            self.schedule(self.pump)

    def reset(self) -> None:
        super().reset()
        self.rxq = None
        self.txq = None
        self._tx_blocked = False
        self._rxbufs.clear()
        self._tx.clear()


    # -- transmit ----------------------------------------------------------------------------
    def handle_tx(self, c: Chain) -> int:
        r = c.readable
        if c.writable or c.read_len < VNET_HDR_LEN:
            self.core.counters.tx_malformed += 1
            return 0
        if c.read_len > VNET_HDR_LEN + self.core.max_frame:
            # checked before the copy: a guest's huge buffer is its error, not our memory
            self.core.counters.tx_dropped += 1
            return 0
        if len(r) == 1:
            self._tx.append(bytes(r[0][VNET_HDR_LEN:]))
        else:
            self._tx.append(b"".join(bytes(v) for v in r)[VNET_HDR_LEN:])
        return 0

    def _send_batch(self) -> None:
        if self._tx:
            frames, self._tx = self._tx, []
            if self.core.transmit(frames):
                # frames that came straight back to us (loopback): place them in this pass
                if self.pump():
                    self.schedule(self.pump)

    # -- receive -----------------------------------------------------------------------------
    def _frames_waiting(self) -> None:
        self.schedule(self.pump)

    def pump(self) -> bool:
        """Move waiting frames into rx buffers; one publish for the batch. Returns True if
        there is more to do right away (the budget ran out, or buffers just arrived)."""
        vq = self.rxq
        backlog = self.core.backlog
        if vq is None or not backlog:
            return False
        ring = vq.ring
        bufs = self._rxbufs
        counters = self.core.counters
        mergeable = self.mergeable
        done: list[Chain] = []
        lens: list[int] = []
        budget = self.rx_budget
        starved = False
        nbytes = 0
        frames = 0
        while backlog and budget:
            if not bufs:
                bufs.extend(ring.pop(self.rx_budget))
                if not bufs:
                    starved = True
                    break
            frame = backlog[0]
            need = VNET_HDR_LEN + len(frame)
            b = bufs[0]
            w = b.writable
            if b.write_len < VNET_HDR_LEN:             # no room for even the header
                bufs.popleft()
                done.append(b)
                lens.append(0)
                counters.rx_no_room += 1
                budget -= 1
                continue
            if b.write_len >= need:                    # the frame fits one buffer
                bufs.popleft()
                v = w[0]
                if len(v) >= need:
                    v[:VNET_HDR_LEN] = HDR_ONE_BUFFER
                    v[VNET_HDR_LEN:need] = frame
                else:
                    _scatter(w, HDR.pack(0, 0, 0, 0, 0, 0, 1))
                    _scatter(w, frame, VNET_HDR_LEN)
                done.append(b)
                lens.append(need)
            elif not mergeable:
                # the frame is larger than the buffer: drop it, and give the buffer back
                # empty so that one odd buffer cannot hold up every frame after it
                bufs.popleft()
                done.append(b)
                lens.append(0)
                counters.rx_too_big += 1
                backlog.popleft()
                budget -= 1
                continue
            else:
                take = self._gather(bufs, need)
                if take is None:
                    starved = True
                    break
                self._spread(take, frame, done, lens)
            backlog.popleft()
            frames += 1
            nbytes += need
            budget -= 1
        counters.rx_frames += frames
        counters.rx_bytes += nbytes - VNET_HDR_LEN * frames
        if done:
            ring.push_many(done, lens)
            vq.complete(len(done))
        if frames and self.core._room_waiters:
            self.core.drained()
        if not backlog:
            return False
        if starved:
            # out of buffers: ask for a doorbell when more arrive, and re-check
            return ring.enable_notify()
        return True

    def _gather(self, bufs: collections.deque[Chain], need: int) -> list[Chain] | None:
        """Enough buffers (in order) for `need` bytes, or None if the guest has not posted
        enough yet (they stay queued)."""
        have = 0
        k = 0
        while have < need:
            if k == len(bufs):
                more = self.rxq.ring.pop(self.rx_budget) if self.rxq else []
                if not more:
                    return None
                bufs.extend(more)
            have += bufs[k].write_len
            k += 1
        return [bufs.popleft() for _ in range(k)]

    def _spread(self, take: list[Chain], frame: bytes, done: list[Chain], lens: list[int]) -> None:
        """A frame over several buffers (MRG_RXBUF): the header, with num_buffers, in the first."""
        data = HDR.pack(0, 0, 0, 0, 0, 0, len(take)) + frame
        pos = 0
        for b in take:
            n = _scatter(b.writable, memoryview(data)[pos:pos + b.write_len])
            pos += n
            done.append(b)
            lens.append(n)
