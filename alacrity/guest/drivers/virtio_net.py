"""A guest-side virtio-net driver: rx buffers posted up front and re-posted as frames are
taken, tx slots with the 12-byte header in front of each frame, one descriptor each."""

from __future__ import annotations

import time
from typing import Any

from alacrity.errors import DeviceError
from alacrity.virtio import net as N
from alacrity.virtio import spec

HDR_LEN = 12
WANTED = spec.bit(N.F_MAC) | spec.bit(N.F_STATUS) | spec.bit(N.F_MTU)


class VirtioNetDriver:
    def __init__(self, transport: Any, *, rx_buffers: int = 128, buf_size: int = 2048,
                 tx_slots: int = 128, queue_size: int = 256, mrg_rxbuf: bool = True,
                 event_idx: bool = True, packed: bool = False, poll_us: float = 0.0,
                 always_kick: bool = False, reuse: bool = True):
        t = self.t = transport
        if t.device_id != spec.ID_NET:
            raise DeviceError(f"device id {t.device_id} is not a network device")
        wanted = WANTED
        if mrg_rxbuf:
            wanted |= spec.bit(N.F_MRG_RXBUF)
        if event_idx:
            wanted |= spec.bit(spec.F_EVENT_IDX)
        if packed:
            wanted |= spec.bit(spec.F_RING_PACKED)
        t.negotiate(wanted)
        if packed and not t.has(spec.F_RING_PACKED):
            raise DeviceError("the device does not offer VIRTIO_F_RING_PACKED")
        self.mac = bytes(t.read_config(i, 1) for i in range(6)) if t.has(N.F_MAC) else bytes(6)
        self.link_up = bool(t.read_config(6, 2) & N.S_LINK_UP) if t.has(N.F_STATUS) else True
        self.mtu = t.read_config(10, 2) if t.has(N.F_MTU) else 1500
        self.mergeable = t.has(N.F_MRG_RXBUF)
        if not self.mergeable and buf_size < HDR_LEN + 14 + self.mtu:
            raise ValueError(f"rx buffers of {buf_size} bytes cannot hold an MTU frame "
                             f"without VIRTIO_NET_F_MRG_RXBUF")
        self.rxq = t.setup_queue(N.RX, queue_size)
        self.txq = t.setup_queue(N.TX, queue_size)
        mem = t.m.mem
        alloc = t.m.alloc.alloc
        self.buf_size = buf_size
        self.rx_addr = [alloc(buf_size, 64) for _ in range(min(rx_buffers, self.rxq.size))]
        self.rx_view = [mem.view(a, buf_size) for a in self.rx_addr]
        self.rx_bufs = [[(a, buf_size)] for a in self.rx_addr]
        slot_size = HDR_LEN + 14 + max(self.mtu, 1500)
        self.tx_addr = [alloc(slot_size, 64) for _ in range(min(tx_slots, self.txq.size))]
        self.tx_view = [mem.view(a, slot_size) for a in self.tx_addr]
        self.tx_free = list(range(len(self.tx_addr)))
        for v in self.tx_view:
            v[:HDR_LEN] = bytes(HDR_LEN)     # no offloads: the header stays all zero
        self.rx_stats = t.stats[N.RX]
        self.tx_stats = t.stats[N.TX]
        self.poll_ns = int(poll_us * 1000)
        self.always_kick = always_kick
        self._need_ack = False
        self._partial: list[bytes] = []      # a merged frame still being collected
        self._partial_left = 0
        self.rx_errors = 0
        # rx buffers never change: pinned (unless reuse=False), so a split ring reuses their
        # descriptors as they are
        self.reuse = reuse
        self.rx_handles = [self.rxq.add(self.rx_bufs[i], 0, i, pin=reuse)
                           for i in range(len(self.rx_addr))]
        t.driver_ok()
        if not always_kick:
            # interrupts only when wait() asks for them
            self.rxq.disable_cb()
            self.txq.disable_cb()
        self.kick_rx()

    # -- transmit ----------------------------------------------------------------------------
    def send(self, frame: bytes | memoryview) -> bool:
        """Queue a frame (not visible until kick_tx). False if every tx slot is in use."""
        if not self.tx_free:
            self.reclaim_tx()
            if not self.tx_free:
                return False
        slot = self.tx_free.pop()
        n = len(frame)
        self.tx_view[slot][HDR_LEN:HDR_LEN + n] = frame
        self.txq.add([(self.tx_addr[slot], HDR_LEN + n)], 1, slot)
        return True

    def kick_tx(self) -> bool:
        return self.t.kick(N.TX, self.always_kick)

    def reclaim_tx(self) -> int:
        done = self.txq.get_used()
        self.tx_free.extend(slot for slot, _ in done)
        return len(done)

    # -- receive -----------------------------------------------------------------------------
    def kick_rx(self) -> bool:
        return self.t.kick(N.RX, self.always_kick)

    def recv(self) -> list[bytes]:
        """Every frame received since the last call; their buffers go back to the device
        (call kick_rx afterwards)."""
        out = []
        repost = self.repost_rx
        for i, n in self.rxq.get_used():
            v = self.rx_view[i]
            if self._partial_left:
                self._partial.append(bytes(v[:n]))
                self._partial_left -= 1
                if not self._partial_left:
                    out.append(b"".join(self._partial))
                    self._partial = []
            elif n < HDR_LEN:
                self.rx_errors += 1
            else:
                nbuf = v[10] | v[11] << 8 if self.mergeable else 1
                if nbuf <= 1:
                    out.append(bytes(v[HDR_LEN:n]))
                else:
                    self._partial = [bytes(v[HDR_LEN:n])]
                    self._partial_left = nbuf - 1
            repost(i)
        return out

    def repost_rx(self, i: int) -> None:
        """Offer rx buffer i to the device again."""
        if self.reuse:
            self.rxq.readd(self.rx_handles[i], i)
        else:
            self.rxq.add(self.rx_bufs[i], 0, i)

    def repost_rx_many(self, idx: list[int]) -> None:
        """Offer rx buffers idx to the device again, in one pass."""
        if self.reuse:
            handles = self.rx_handles
            self.rxq.readd_many([handles[i] for i in idx], idx)
        else:
            for i in idx:
                self.rxq.add(self.rx_bufs[i], 0, i)

    # -- waiting -------------------------------------------------------------------------------
    def wait(self, timeout: float | None = 10.0, tx: bool = False, rx_delay: int = 0,
             tx_delay: int = 0) -> None:
        """Return once rx (or, with tx=True, tx) has used buffers: poll first if set, then
        enable notifications, re-check and sleep on the interrupt. With EVENT_IDX the
        delays ask for the interrupt only after that many more used buffers (interrupt
        coalescing by the driver, as Linux does for tx with virtqueue_enable_cb_delayed)."""
        rxq, txq = self.rxq, self.txq

        def ready() -> bool:
            return rxq.has_used() or (tx and txq.has_used())

        if ready():
            return
        if self._need_ack:
            self._need_ack = False
            self.t.ack_interrupt()
            if ready():
                return
        if self.poll_ns:
            clock = time.perf_counter_ns
            deadline = clock() + self.poll_ns
            while clock() < deadline:
                for _ in range(16):
                    if ready():
                        return
        while True:
            pending = rxq.enable_cb(rx_delay)
            if tx:
                pending = txq.enable_cb(tx_delay) or pending
            if pending:
                break
            if not self.t.wait_interrupt(timeout):
                raise TimeoutError(f"nothing received within {timeout} s")
            self.rx_stats.interrupts += 1
            self._need_ack = True
            if ready():
                break
            self._need_ack = False
            self.t.ack_interrupt()     # an interrupt with nothing used: maybe a config change
        if not self.always_kick:
            rxq.disable_cb()
            txq.disable_cb()
