"""Serving a virtio device model's queues, whatever the transport.

`QueueHost` is what virtio-mmio and the vhost-user backend share: it builds rings and
`VirtQueue`s, runs the bounded service passes (handing unfinished work back to the I/O
thread), runs model work the device schedules, busy-polls, and turns a `GuestError` or a
model bug into one `fail()` (whose effect is the transport's: DEVICE_NEEDS_RESET for
virtio-mmio, closing the connection for vhost-user).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from alacrity.bus import QueueStats
from alacrity.errors import GuestError
from alacrity.limits import DEFAULT, Limits
from alacrity.memory import GuestMemory
from alacrity.virtio import spec
from alacrity.virtio.device import Notify, Ring, VirtioDevice, VirtQueue
from alacrity.virtio.packed import PackedQueue
from alacrity.virtio.split import SplitQueue

log = logging.getLogger("alacrity.virtio")

Defer = Callable[[object, Callable[[], bool]], None]


class QueueHost:
    def __init__(self, model: VirtioDevice, mem: GuestMemory, *, name: str | None = None,
                 notify: Notify = Notify.MITIGATED, budget: int = 8, defer: Defer | None = None,
                 limits: Limits = DEFAULT):
        self.model = model
        self.limits = limits
        self.queue_max = limits.queue_max(model.queue_max)   # what QueueNumMax says
        model.apply_limits(limits)
        self.mem = mem
        self.name = name or model.name
        self.notify_mode = Notify(notify)
        self.budget = budget          # chains per pass before other work gets a turn
        self.defer = defer            # hands unfinished work back to the I/O loop
        self._pending: set[int] = set()
        self.polling = False          # an I/O thread is busy-polling our queues
        self.lock = threading.RLock()
        self.stats = [QueueStats() for _ in range(model.num_queues)]
        self.errors = 0
        self.last_error = ""
        self.broken = False
        self.queues: list[VirtQueue | None] = [None] * model.num_queues
        self.active: list[VirtQueue] = []
        model.schedule = self._schedule

    # -- what a transport decides ------------------------------------------------------------
    def fail(self, reason: str) -> None:
        """The guest (or the frontend) broke the rules."""
        self._mark_broken(reason, "device stopped")

    def live(self) -> bool:
        """May queues and model work run now?"""
        return not self.broken

    def _mark_broken(self, reason: str, consequence: str) -> bool:
        """Count the error; the first one logs one line and stops the queues. True if it
        was the first."""
        self.errors += 1
        self.last_error = reason
        if self.broken:
            return False
        self.broken = True
        self.active = []
        log.error("%s: guest error: %s; %s", self.name, reason, consequence)
        return True

    # -- building queues ---------------------------------------------------------------------
    def make_ring(self, features: int, num: int, desc: int, driver: int, device: int,
                  base: int | None = None) -> Ring:
        """A device-side ring. `base` is where the device resumes (vhost-user's
        SET_VRING_BASE): split, the next available index (the used index is read back from
        the ring); packed, the next slot in bits 0-14 and the wrap counter in bit 15, and
        (as QEMU sends it) the used position the same way in bits 16-31, which frontends
        that know only the first half leave zero: then used starts where avail does."""
        event_idx = bool(features & spec.bit(spec.F_EVENT_IDX))
        indirect = bool(features & spec.bit(spec.F_INDIRECT_DESC))
        if not 0 < num <= self.queue_max:
            raise GuestError(f"queue of {num} entries (limit {self.queue_max})")
        lim = {"max_segments": self.limits.max_segments,
               "max_bytes": self.limits.max_request_bytes}
        if features & spec.bit(spec.F_RING_PACKED):
            pos, wrap = (0, 1) if base is None else (base & 0x7FFF, (base >> 15) & 1)
            used = (base or 0) >> 16 or (pos | wrap << 15)
            upos, uwrap = used & 0x7FFF, (used >> 15) & 1
            if pos >= num or upos >= num:
                raise GuestError(f"packed ring of {num} resumes at {pos}/{upos}")
            return PackedQueue(self.mem, num, desc, driver, device, event_idx=event_idx,
                               indirect=indirect, next_avail=pos, avail_wrap=wrap,
                               next_used=upos, used_wrap=uwrap, **lim)
        if base is None:
            return SplitQueue(self.mem, num, desc, driver, device, event_idx=event_idx,
                              indirect=indirect, **lim)
        return SplitQueue(self.mem, num, desc, driver, device, event_idx=event_idx,
                          indirect=indirect, last_avail=base,
                          used_idx=self.mem.read_u16(device + 2), **lim)

    def make_queue(self, qi: int, ring: Ring, interrupt: Callable[[], None]) -> VirtQueue:
        model = self.model
        handler = model.handler(qi)
        return VirtQueue(qi, ring, self.stats[qi], interrupt,
                         suppress=self.notify_mode is not Notify.ALWAYS, handler=handler,
                         after=model.after(qi),
                         kick=None if handler is not None else (lambda qi=qi: model.kick(qi)),
                         budget=model.budget(qi) or self.budget, limit=model.limit(qi),
                         poll_hook=model.poller(qi), copier=model.copier(qi))

    # -- running -------------------------------------------------------------------------------
    def _service(self, vq: VirtQueue) -> None:
        try:
            more = vq.service()
            if more and self.defer is None:     # no I/O loop to come back to: finish now
                while more and not self.broken:
                    more = vq.service()
        except GuestError as e:
            self.fail(f"queue {vq.index}: {e}")
            return
        except Exception as e:  # a bug in a device model must not take the host down
            log.exception("%s: queue %d handler failed", self.name, vq.index)
            self.fail(f"queue {vq.index}: internal error {e!r}")
            return
        if more:
            self._pending.add(vq.index)
            self.defer(self, self.run_pending)

    def _schedule(self, fn: Callable[[], bool]) -> None:
        """The model asks to run fn on the I/O thread (after the current pass)."""
        if self.defer is None:
            while self._run_model(fn):
                pass
        else:
            self.defer((self, fn), lambda: self._run_model(fn))

    def _run_model(self, fn: Callable[[], bool]) -> bool:
        with self.lock:
            if not self.live():
                return False
            try:
                return bool(fn())
            except GuestError as e:
                self.fail(str(e))
            except Exception as e:
                log.exception("%s: device work failed", self.name)
                self.fail(f"internal error {e!r}")
            return False

    def run_pending(self) -> bool:
        """Another bounded pass over queues that stopped at their budget."""
        with self.lock:
            pending, self._pending = self._pending, set()
            for qi in pending:
                vq = self.queues[qi] if qi < len(self.queues) else None
                if vq is not None and not self.broken and vq in self.active:
                    self._service(vq)
            return bool(self._pending)

    # -- polling (iothread.Poller) ---------------------------------------------------------
    def poll_start(self) -> None:
        with self.lock:
            self.polling = True
            for vq in self.active:
                vq.ring.disable_notify()

    def poll(self) -> bool:
        active = self.active
        if not active:
            return False
        worked = False
        with self.lock:
            for vq in active:
                try:
                    if vq.poll():
                        worked = True
                except GuestError as e:
                    self.fail(f"queue {vq.index}: {e}")
                    return False
                except Exception as e:
                    log.exception("%s: queue %d handler failed", self.name, vq.index)
                    self.fail(f"queue {vq.index}: internal error {e!r}")
                    return False
        return worked

    def poll_stop(self) -> bool:
        pending = False
        with self.lock:
            self.polling = False
            for vq in self.active:
                if vq.ring.enable_notify():
                    pending = True
        return pending

    # -- introspection -------------------------------------------------------------------
    def queue_stats(self) -> list[dict[str, int]]:
        return [s.as_dict() for s in self.stats]
