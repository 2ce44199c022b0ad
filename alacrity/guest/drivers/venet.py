"""A guest-side venet driver (drivers/net/vbus-enet.c's role): rx and tx IOQs, flat or
scatter-gather tx descriptors (optionally from the pre-mapped pool, PMTD), and optionally
the event queue (LINKSTATE, TXC).

- rx: every descriptor of the rx ring holds a buffer, posted once on the valid index;
  the device fills them at the inuse tail, the driver takes them at the inuse head and
  hands them straight back (release) after copying the frame out.
- tx: a frame is pushed on both indexes; finished ones are popped at the valid head.
Signals toward the driver are enabled only while wait() sleeps (unless `always`).
"""

from __future__ import annotations

import time

from alacrity.bus import QueueStats
from alacrity.errors import DeviceError
from alacrity.guest.drivers.vbus_bridge import VbusBridgeDriver, VbusError
from alacrity.vbus import venet as E
from alacrity.vbus.ioq import Ioq, init_ring, ring_size
from alacrity.vbus.shm_signal import NORTH

FRAME_MAX = 14 + 1500


class VenetDriver:
    def __init__(self, bridge: VbusBridgeDriver, devid: int | None = None, *,
                 queue_size: int = 256, tx_slots: int = 128, buf_size: int = 1536,
                 sg: bool = False, pmtd: bool = False, evq: bool = False,
                 always: bool = False, poll_us: float = 0.0):
        self.b = bridge
        m = bridge.m
        mem = m.mem
        alloc = m.alloc.alloc
        if devid is None:
            devid = bridge.find(E.TYPE)
        if buf_size < FRAME_MAX:
            raise ValueError(f"rx buffers of {buf_size} bytes cannot hold an MTU frame")
        self.devh = devh = bridge.devopen(devid, E.VERSION)
        self.mac = self._call(E.FUNC_MACQUERY, out_len=6)
        self.sg = self.pmtd = self.txc = self.linkstate = False
        if sg or pmtd:
            bits = E.CAPS.unpack(self._call(E.FUNC_NEGCAP, E.CAPS.pack(
                E.CAP_GROUP_SG, E.CAP_SG | (E.CAP_PMTD if pmtd else 0))))[1]
            self.sg = bool(bits & E.CAP_SG)
            self.pmtd = bool(bits & E.CAP_PMTD)
        self.events: list[tuple[int, int]] = []        # (event id, value) seen
        self.link_up = False
        self.evq: Ioq | None = None
        if evq:
            bits = E.CAPS.unpack(self._call(E.FUNC_NEGCAP, E.CAPS.pack(
                E.CAP_GROUP_EVENTQ, E.CAP_EVQ_LINKSTATE | E.CAP_EVQ_TXC)))[1]
            self.linkstate = bool(bits & E.CAP_EVQ_LINKSTATE)
            self.txc = bool(bits & E.CAP_EVQ_TXC)
            _f, evsize, dpid, qid = E.EVQ_QUERY.unpack(
                self._call(E.FUNC_EVQQUERY, out_len=E.EVQ_QUERY.size))
            count = 64
            pool = alloc(count * evsize, 64)
            self.evq_pool = mem.view(pool, count * evsize)
            bridge.devshm(devh, dpid, pool, count * evsize)
            ring = alloc(ring_size(count), 64)
            init_ring(mem, ring, count)
            self.evq = Ioq(mem, ring, NORTH, always=always)
            # event descriptors point into the pool by offset
            self.evq.post([(i, i * evsize, evsize) for i in range(count)], both=False)
            bridge.devshm(devh, qid, ring, ring_size(count), signal=self.evq.signal)
            self.evq.signal.notifier = self.take_events
            self.evq.signal.enable()
        # rx: one buffer per descriptor, all posted up front
        self.rxq = self._queue(E.QUEUE_RX, queue_size, always)
        self.txq = self._queue(E.QUEUE_TX, queue_size, always)
        self.buf_size = buf_size
        self.rx_addr = [alloc(buf_size, 64) for _ in range(queue_size)]
        self.rx_view = [mem.view(a, buf_size) for a in self.rx_addr]
        self.rxq.post([(i, a, buf_size) for i, a in enumerate(self.rx_addr)], both=False)
        # tx slots: a frame buffer each, and with SG a venet_sg describing it
        tx_slots = min(tx_slots, queue_size)
        self.tx_addr = [alloc(FRAME_MAX, 64) for _ in range(tx_slots)]
        self.tx_view = [mem.view(a, FRAME_MAX) for a in self.tx_addr]
        self.tx_free = list(range(tx_slots))
        self.sg_size = E.sg_size(1)
        if self.sg:
            if self.pmtd:
                pool_id = bridge.devcall(devh, E.FUNC_PMTDQUERY)[0]
                pool = alloc(tx_slots * self.sg_size, 64)
                bridge.devshm(devh, pool_id, pool, tx_slots * self.sg_size)
                # descriptors carry offsets into the pool
                self.sg_ptr = [i * self.sg_size for i in range(tx_slots)]
                self.sg_view = [mem.view(pool + p, self.sg_size) for p in self.sg_ptr]
            else:
                addrs = [alloc(self.sg_size, 64) for _ in range(tx_slots)]
                self.sg_ptr = addrs
                self.sg_view = [mem.view(a, self.sg_size) for a in addrs]
        self.rx_stats = QueueStats()
        self.tx_stats = QueueStats()
        self.rx_errors = 0
        self.always = always
        self.poll_ns = int(poll_us * 1000)
        self._staged: list[tuple[int, int, int]] = []
        self._call(E.FUNC_LINKUP)
        if self.evq is not None:
            self.take_events()
        elif not self.linkstate:
            self.link_up = True
        if not always:
            self.rxq.signal.disable()
            self.txq.signal.disable()

    def _call(self, func: int, data: bytes = b"", *, out_len: int = 0) -> bytes:
        r, out = self.b.devcall(self.devh, func, data, out_len=out_len)
        if r < 0:
            raise VbusError(f"venet device call {func}", r)
        return out

    def _queue(self, qid: int, count: int, always: bool) -> Ioq:
        m = self.b.m
        ring = m.alloc.alloc(ring_size(count), 64)
        init_ring(m.mem, ring, count)
        q = Ioq(m.mem, ring, NORTH, always=always)
        self.b.devshm(self.devh, qid, ring, ring_size(count), signal=q.signal)
        return q

    # -- transmit ----------------------------------------------------------------------------
    def stage(self, slot: int, length: int) -> None:
        """Stage tx slot `slot`, whose buffer holds a frame of `length` bytes."""
        if self.sg:
            E.SG.pack_into(self.sg_view[slot], 0, slot, 0, length, 0, 0, 0, 0, 0, 1)
            E.IOV.pack_into(self.sg_view[slot], E.SG.size, length, self.tx_addr[slot])
            self._staged.append((slot, self.sg_ptr[slot], self.sg_size))
        else:
            self._staged.append((slot, self.tx_addr[slot], length))

    def send(self, frame: bytes | memoryview) -> bool:
        """Queue a frame (not visible until kick_tx). False if every tx slot is in use."""
        if not self.tx_free:
            self.reclaim_tx()
            if not self.tx_free:
                return False
        slot = self.tx_free.pop()
        n = len(frame)
        self.tx_view[slot][:n] = frame
        self.stage(slot, n)
        return True

    def kick_tx(self) -> bool:
        staged = self._staged
        if staged:
            self.txq.post(staged)
            staged.clear()
        if self.txq.signal.inject():
            self.tx_stats.doorbells += 1
            return True
        self.tx_stats.doorbells_suppressed += 1
        return False

    def tx_done(self) -> list[int]:
        """Slots of frames the device has sent (popped at the tx valid head)."""
        return self.txq.reap(self.txq.count)

    def reclaim_tx(self) -> int:
        done = self.tx_done()
        self.tx_free.extend(done)
        return len(done)

    # -- receive -----------------------------------------------------------------------------
    def rx_take(self) -> list[tuple[int, int]]:
        """Filled rx buffers at the inuse head: [(buffer index, frame length)]. They stay
        ours until rx_release()."""
        n_buf = len(self.rx_view)
        size = self.buf_size
        out = []
        for _pos, cookie, _ptr, length in self.rxq.take(self.rxq.count):
            if cookie >= n_buf or length > size:
                raise DeviceError(f"venet: rx descriptor {cookie} filled with {length} bytes")
            out.append((cookie, length))
        return out

    def rx_release(self, n: int) -> None:
        """Hand the first n taken buffers back to the device."""
        self.rxq.release(n, length=self.buf_size)

    def recv(self) -> list[bytes]:
        """Every frame received since the last call; the buffers go straight back to the
        device (kick_rx tells it, if it asked)."""
        got = self.rxq.take(self.rxq.count)
        if not got:
            return []
        view = self.rx_view
        n_buf = len(view)
        size = self.buf_size
        frames = []
        for _pos, i, _ptr, n in got:
            if i >= n_buf or n > size:
                raise DeviceError(f"venet: rx descriptor {i} filled with {n} bytes")
            if n:
                frames.append(bytes(view[i][:n]))
            else:
                self.rx_errors += 1        # FLUSHRX hands buffers back empty
        self.rxq.release(len(got), length=size)
        return frames

    def kick_rx(self) -> bool:
        """Tell the device buffers came back (crosses only if it ran out and asked)."""
        if self.rxq.signal.inject():
            self.rx_stats.doorbells += 1
            return True
        self.rx_stats.doorbells_suppressed += 1
        return False

    def flush_rx(self) -> None:
        self._call(E.FUNC_FLUSHRX)

    def link_down(self) -> None:
        self._call(E.FUNC_LINKDOWN)

    def close(self) -> None:
        self.b.devclose(self.devh)

    # -- events ------------------------------------------------------------------------------
    def take_events(self) -> None:
        q = self.evq
        if q is None:
            return
        got = q.take(q.count)
        size = len(self.evq_pool)
        for _pos, _cookie, ptr, length in got:
            if ptr + length > size or length < 12:
                raise DeviceError(f"venet: event at pool offset {ptr}+{length}")
            ev = self.evq_pool[ptr:ptr + length]
            _flags, _size, eid = E.EVENT_LINKSTATE.unpack_from(ev)[:3]
            if eid == E.EVENT_ID_LINKSTATE:
                self.link_up = bool(ev[12])
                self.events.append((eid, ev[12]))
            elif eid == E.EVENT_ID_TXC:
                self.events.append((eid, E.EVENT_TXC.unpack_from(ev)[4]))
            if len(self.events) > 4096:
                del self.events[:2048]
        if got:
            q.release(len(got), length=E.EVQ_EVSIZE)
            q.signal.inject()

    # -- waiting -------------------------------------------------------------------------------
    def wait(self, timeout: float | None = 10.0, tx: bool = False, rx_delay: int = 0,
             tx_delay: int = 0) -> None:
        """Return once rx (or, with tx=True, tx) has something: poll first if set, then
        enable the signals (each wakes at once if the device signalled meanwhile),
        re-check and sleep on the bus interrupt. shm-signal has no delayed wake-up: the
        delays are accepted for the caller's sake and ignored."""
        rxq, txq = self.rxq, self.txq
        if tx:
            rx_ready, tx_done = rxq.ready, txq.done

            def ready() -> bool:
                return rx_ready() or tx_done()
        else:
            ready = rxq.ready

        if ready():
            return
        if self.poll_ns:
            clock = time.perf_counter_ns
            deadline = clock() + self.poll_ns
            while clock() < deadline:
                for _ in range(16):
                    if ready():
                        return
        tx_sig = (self.evq.signal if self.txc else txq.signal) if tx else None
        while True:
            rxq.signal.enable()
            if tx_sig is not None:
                tx_sig.enable()
            if ready():
                break
            if not self.b.wait_interrupt(timeout):
                raise TimeoutError(f"nothing received within {timeout} s")
            self.rx_stats.interrupts += 1
            if ready():
                break
        if not self.always:
            rxq.signal.disable()
            txq.signal.disable()
