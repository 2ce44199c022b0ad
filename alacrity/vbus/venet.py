"""venet ("virtual-ethernet", version 1) on the transport-free `NetCore`, host side.

Queues the guest registers with DEVSHM: rx (0) and tx (1) IOQs; with PMTD the
pre-mapped tx descriptor pool (100); with the event queue its data pool (101) and IOQ (102).

- Guest transmit: the guest pushes descriptors on both indexes of the tx IOQ; the device
  takes them at the inuse head (ptr/len is a flat frame, or with SG a `venet_sg`, which
  with PMTD is an offset into the pool; the device copies each descriptor before it
  validates it), pops them (ownership back to the guest: that is the completion) and,
  with TXC, sends a tx-complete event per frame.
- Guest receive: the guest posts buffers on the valid index; the device fills them at the
  inuse tail and pushes them back.
- Device calls: LINKUP, LINKDOWN, MACQUERY, NEGCAP (SG group: SG and PMTD; EVENTQ group:
  LINKSTATE and TXC; no offloads), FLUSHRX, PMTDQUERY, EVQQUERY.
Layouts from include/linux/venet.h.
"""

from __future__ import annotations

import logging
import struct

from alacrity.devices.net import NetCore
from alacrity.errors import GuestError
from alacrity.vbus import abi
from alacrity.vbus.device import CallError, Shm, VbusDevice
from alacrity.vbus.ioq import Ioq
from alacrity.vbus.shm_signal import ShmSignal

log = logging.getLogger("alacrity.venet")

TYPE = "virtual-ethernet"
VERSION = 1
QUEUE_RX, QUEUE_TX = 0, 1
PMTD_POOL_ID, EVQ_DPOOL_ID, EVQ_QUEUE_ID = 100, 101, 102

FUNC_LINKUP, FUNC_LINKDOWN, FUNC_MACQUERY, FUNC_NEGCAP = 0, 1, 2, 3
FUNC_FLUSHRX, FUNC_PMTDQUERY, FUNC_EVQQUERY = 4, 5, 6

CAP_GROUP_SG, CAP_GROUP_EVENTQ, CAP_GROUP_L4RO = 0, 1, 2
CAP_SG, CAP_TSO4, CAP_TSO6, CAP_ECN, CAP_UFO, CAP_PMTD = 1, 2, 4, 8, 16, 32
CAP_EVQ_LINKSTATE, CAP_EVQ_TXC = 1, 2
SG_AVAILABLE = CAP_SG | CAP_PMTD            # no segmentation or checksum offloads
EVQ_AVAILABLE = CAP_EVQ_LINKSTATE | CAP_EVQ_TXC

CAPS = struct.Struct("<II")                      # gid, bits
SG = struct.Struct("<QIIHHBxHH2xI")              # cookie, flags, len, csum{start, offset},
                                                 # gso{type, hdrlen, size}, count (32)
IOV = struct.Struct("<I4xQ")                     # len, ptr (16)
SG_FLAG_NEEDS_CSUM, SG_FLAG_GSO, SG_FLAG_ECN = 1, 2, 4
EVQ_QUERY = struct.Struct("<IIII16x")            # flags, evsize, dpid, qid (32)
EVENT_LINKSTATE = struct.Struct("<IIIB3x")       # header{flags, size, id}, state (16)
EVENT_TXC = struct.Struct("<IIIIQ")              # header, txqid, cookie (24)
EVENT_ID_LINKSTATE, EVENT_ID_TXC = 0, 1
EVQ_EVSIZE = EVENT_TXC.size                      # the largest event
MAX_SG = 18                                      # iovs per frame (MAX_SKB_FRAGS + 1)
TXMITIGATION = 10                                # tx completions per signal to the guest


def sg_size(count: int) -> int:
    return SG.size + IOV.size * count


class Venet(VbusDevice):
    type = TYPE
    version = VERSION

    def __init__(self, core: NetCore, *, budget: int = 32):
        super().__init__()
        self.core = core
        self.budget = budget
        core.on_rx = self._frames_waiting
        self._reset()

    def _reset(self) -> None:
        self.link = False
        self.sg = self.pmtd = False
        self.evq_on = self.linkstate = self.txc = False
        self.rxq: Ioq | None = None
        self.txq: Ioq | None = None
        self.evq: Ioq | None = None
        self.pmtd_pool: tuple[int, int] | None = None
        self.evq_pool: tuple[int, int] | None = None
        self._tx_blocked = False
        self._tx_deferred = False
        self.malformed = 0
        self.tx_completions = 0

    def open(self, mem, version: int) -> None:  # type: ignore[override]
        super().open(mem, version)
        self._reset()

    def close(self) -> None:
        super().close()
        self._reset()

    # -- device calls ------------------------------------------------------------------------
    def call(self, func: int, datap: int, length: int, flags: int) -> int:
        if func == FUNC_LINKUP:
            if self.link:
                raise CallError(abi.EEXIST, "LINKUP: the link is already up")
            if self.rxq is None or self.txq is None:
                raise CallError(abi.EINVAL, "LINKUP: rx and tx queues are not registered")
            self.link = True
            if self.linkstate:
                self._event(EVENT_LINKSTATE.pack(0, EVENT_LINKSTATE.size, EVENT_ID_LINKSTATE, 1),
                            signal=True)
            self.txq.signal.enable()          # hear the guest transmit (runs what waits)
            if self.core.backlog:
                self.schedule(self.pump)
            return 0
        if func == FUNC_LINKDOWN:
            if not self.link:
                raise CallError(abi.ENOENT, "LINKDOWN: the link is not up")
            self.link = False
            if self.txq is not None:
                self.txq.signal.disable()
            return 0
        if func == FUNC_MACQUERY:
            if length != 6:
                raise CallError(abi.EINVAL, f"MACQUERY: {length} bytes (a MAC is 6)")
            self.write_guest(datap, self.core.mac)
            return 0
        if func == FUNC_NEGCAP:
            if length != CAPS.size:
                raise CallError(abi.EINVAL, f"NEGCAP: {length} bytes (needs {CAPS.size})")
            if self.link:
                raise CallError(abi.EINVAL, "NEGCAP: not while the link is up")
            gid, bits = CAPS.unpack(self.read_guest(datap, CAPS.size))
            if gid == CAP_GROUP_SG:
                bits &= SG_AVAILABLE
                self.sg = bool(bits & CAP_SG)
                self.pmtd = bool(bits & CAP_PMTD) and self.sg
                if not self.sg:
                    bits = 0
            elif gid == CAP_GROUP_EVENTQ:
                bits &= EVQ_AVAILABLE
                self.evq_on = bool(bits)
                self.linkstate = bool(bits & CAP_EVQ_LINKSTATE)
                self.txc = bool(bits & CAP_EVQ_TXC)
            else:
                bits = 0
            self.write_guest(datap, CAPS.pack(gid, bits))
            return 0
        if func == FUNC_FLUSHRX:
            if not self.link or self.rxq is None:
                raise CallError(abi.EINVAL, "FLUSHRX: the link is not up")
            slots = self.rxq.free_slots(self.rxq.count)
            self.rxq.fill([0] * len(slots))   # every posted buffer comes back empty
            return 0
        if func == FUNC_PMTDQUERY:
            return PMTD_POOL_ID
        if func == FUNC_EVQQUERY:
            if length != EVQ_QUERY.size:
                raise CallError(abi.EINVAL, f"EVQQUERY: {length} bytes (needs {EVQ_QUERY.size})")
            if self.link:
                raise CallError(abi.EINVAL, "EVQQUERY: not while the link is up")
            qflags = EVQ_QUERY.unpack(self.read_guest(datap, EVQ_QUERY.size))[0]
            if qflags:
                raise CallError(abi.EINVAL, f"EVQQUERY: flags {qflags:#x}")
            self.write_guest(datap, EVQ_QUERY.pack(0, EVQ_EVSIZE, EVQ_DPOOL_ID, EVQ_QUEUE_ID))
            return 0
        raise CallError(abi.EINVAL, f"venet: no device call {func}")

    # -- shared memory ---------------------------------------------------------------------------
    def shm(self, shm: Shm) -> None:
        if shm.id in (QUEUE_RX, QUEUE_TX, EVQ_QUEUE_ID):
            if shm.signal is None:
                raise CallError(abi.EINVAL, f"venet: queue {shm.id} without a signal")
            current = {QUEUE_RX: self.rxq, QUEUE_TX: self.txq, EVQ_QUEUE_ID: self.evq}[shm.id]
            if current is not None:
                raise CallError(abi.EEXIST, f"venet: queue {shm.id} already registered")
            if shm.id == EVQ_QUEUE_ID and (not self.evq_on or self.evq_pool is None):
                raise CallError(abi.EINVAL, "venet: event queue before its pool")
            q = self.open_ioq(shm)
            if shm.id == QUEUE_RX:
                self.rxq = q
                shm.signal.notifier = self._rx_doorbell
            elif shm.id == QUEUE_TX:
                self.txq = q
                shm.signal.notifier = self._tx_doorbell
            else:
                if q.count * EVQ_EVSIZE != self.evq_pool[1]:
                    raise CallError(abi.EINVAL, f"venet: event pool of {self.evq_pool[1]} bytes "
                                                f"for {q.count} events of {EVQ_EVSIZE}")
                self.evq = q
            return
        if shm.id == PMTD_POOL_ID:
            if shm.signal is not None or not self.pmtd:
                raise CallError(abi.EINVAL, "venet: PMTD pool without PMTD, or with a signal")
            if self.pmtd_pool is not None:
                raise CallError(abi.EEXIST, "venet: PMTD pool already registered")
            self.pmtd_pool = (shm.addr, shm.length)
            return
        if shm.id == EVQ_DPOOL_ID:
            if shm.signal is not None or not self.evq_on:
                raise CallError(abi.EINVAL, "venet: event pool without EVENTQ, or with a signal")
            if self.evq_pool is not None:
                raise CallError(abi.EEXIST, "venet: event pool already registered")
            self.evq_pool = (shm.addr, shm.length)
            return
        raise CallError(abi.EINVAL, f"venet: no shared memory id {shm.id}")

    def signals(self) -> list[ShmSignal]:
        return [q.signal for q in (self.rxq, self.txq) if q is not None]

    # -- guest transmit ----------------------------------------------------------------------------
    def _tx_doorbell(self) -> None:
        if self._tx_deferred:
            return                     # a pass is scheduled; it will find the new frames
        if self._tx_pass() and self._tx_waiting():
            self._tx_deferred = True
            if not self.txq.signal.always:
                self.txq.signal.disable()           # mute while we come back for the rest
            self.schedule(self._tx_continue)

    def _tx_continue(self) -> bool:
        if self._tx_pass() and self._tx_waiting():
            return True
        self._tx_deferred = False
        if self.link and self.txq is not None and not self.txq.signal.always:
            self.txq.signal.enable()                # re-checks: runs again if frames came
        return False

    def _tx_waiting(self) -> bool:
        return self.txq is not None and bool(self.txq.take(1))

    def _tx_pass(self) -> int:
        """Take up to a budget of frames; returns how many were taken."""
        q = self.txq
        if q is None or not self.link:
            return 0
        room = self.core.room()
        budget = min(self.budget, room)
        if budget <= 0:
            if not self._tx_blocked:
                self._tx_blocked = True
                self.core.backend.wait_room(self._tx_unblocked)
            return 0
        taken = q.take(budget)
        if not taken:
            return 0
        frames = []
        cookies = []
        if not self.sg:                 # flat frames: the common case, inline
            view = self.mem.view
            max_frame = self.core.max_frame
            for _pos, _cookie, ptr, length in taken:
                if 0 < length <= max_frame:
                    frames.append(bytes(view(ptr, length)))
                else:
                    self.malformed += 1
                    self.core.counters.tx_malformed += 1
            cookies = [c for _, c, _, _ in taken] if self.txc else cookies
        else:
            for _pos, cookie, ptr, length in taken:
                frame, sg_cookie = self._import(ptr, length)
                if frame is not None:
                    frames.append(frame)
                cookies.append(sg_cookie if sg_cookie is not None else cookie)
        if frames:
            # the frames first (a loopback or pair peer gets them at once), then their
            # completions: the peer's frame does not wait for our index updates
            if self.core.transmit(frames):     # they came straight back: place them now
                if self.pump() and not self.polling:
                    self.schedule(self.pump)
        q.release(len(taken))
        self.tx_completions += len(taken)
        if self.txc and self.evq is not None:
            for c in cookies:
                self._event(EVENT_TXC.pack(0, EVENT_TXC.size, EVENT_ID_TXC, 0, c), signal=False)
            self.evq.signal.inject()
        else:
            q.signal.inject()          # completions: the guest reaps at the valid head
        return len(taken)

    def _tx_unblocked(self) -> None:
        self._tx_blocked = False
        self.schedule(self._tx_continue)

    def _import(self, ptr: int, length: int) -> tuple[bytes | None, int | None]:
        """One SG tx descriptor as a frame (None: dropped and counted), and its cookie."""
        mem = self.mem
        # scatter-gather (flat frames are read inline in _tx_pass): copy the descriptor
        # first, then validate the copy
        max_sg = min(MAX_SG, self.limits.max_segments)
        if not SG.size <= length <= sg_size(max_sg):
            self.malformed += 1
            self.core.counters.tx_malformed += 1
            return None, None
        if self.pmtd:
            if self.pmtd_pool is None:
                raise GuestError("PMTD descriptor before the pool was registered")
            base, plen = self.pmtd_pool
            if ptr + length > plen:
                self.malformed += 1
                self.core.counters.tx_malformed += 1
                return None, None
            raw = bytes(mem.view(base + ptr, length))
        else:
            raw = bytes(mem.view(ptr, length))
        cookie, flags, total, _cs, _co, _gt, _gh, _gs, count = SG.unpack_from(raw)
        if (count == 0 or count > max_sg or sg_size(count) > length or flags & SG_FLAG_GSO
                or total > self.core.max_frame or total > self.limits.max_request_bytes):
            self.malformed += 1
            self.core.counters.tx_malformed += 1
            return None, cookie
        parts = []
        sum_len = 0
        for i in range(count):
            ilen, iptr = IOV.unpack_from(raw, SG.size + IOV.size * i)
            sum_len += ilen
            if sum_len > total:
                break
            parts.append(bytes(mem.view(iptr, ilen)))
        if sum_len != total:
            self.malformed += 1
            self.core.counters.tx_malformed += 1
            return None, cookie
        return b"".join(parts), cookie

    # -- guest receive -----------------------------------------------------------------------------
    def _frames_waiting(self) -> None:
        if not self.polling:           # a polling bridge finds the backlog on its next pass
            self.schedule(self.pump)

    def _rx_doorbell(self) -> None:
        # the guest posted buffers; frames may be waiting for them
        if self.core.backlog:
            if self.pump():
                self.schedule(self.pump)

    def pump(self) -> bool:
        """Fill posted rx buffers with waiting frames; one signal per batch. True if more
        can be done right away."""
        q = self.rxq
        backlog = self.core.backlog
        if q is None or not self.link or not backlog:
            return False
        slots = q.free_slots(min(self.budget, len(backlog)))
        lens = []
        counters = self.core.counters
        mem = self.mem
        for _pos, _cookie, ptr, length in slots:
            frame = backlog[0]
            if len(frame) > length:
                # as the original: the frame is dropped and the buffer waits for the next one
                counters.rx_too_big += 1
                backlog.popleft()
                break
            mem.view(ptr, len(frame))[:] = frame
            backlog.popleft()
            lens.append(len(frame))
            counters.rx_frames += 1
            counters.rx_bytes += len(frame)
            if not backlog:
                break
        if lens:
            q.fill(lens)
            q.signal.inject()
            if self.core._room_waiters:
                self.core.drained()
        if not backlog:
            q.signal.disable()         # no doorbells for buffers while nothing waits
            return False
        if slots and len(lens) == len(slots):
            return True                # every slot asked for was used: ask again
        # out of buffers: hear the guest when it posts more, then look once more
        q.signal.enable()
        return bool(backlog) and bool(q.free_slots(1))

    # -- events ------------------------------------------------------------------------------------
    def _event(self, event: bytes, signal: bool) -> None:
        q = self.evq
        if q is None or self.evq_pool is None:
            return
        slots = q.free_slots(1)
        if not slots:
            log.warning("venet: event queue full; event dropped")
            return
        _pos, _cookie, ptr, length = slots[0]
        base, plen = self.evq_pool
        if ptr + len(event) > plen or length < len(event):
            raise GuestError(f"event slot at pool offset {ptr} overruns the pool ({plen} bytes)")
        self.mem.view(base + ptr, len(event))[:] = event
        q.fill([len(event)])
        if signal:
            q.signal.inject()

    # -- polling -----------------------------------------------------------------------------------
    def poll(self) -> bool:
        worked = False
        txq = self.txq
        if txq is not None and self.link and txq.ready() and self._tx_pass():
            worked = True
            self._tx_deferred = False
        if self.core.backlog and self.pump():
            worked = True
        return worked

    def counters(self) -> dict:
        return {**self.core.counters.as_dict(), "malformed": self.malformed}
