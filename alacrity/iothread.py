"""The I/O thread: waits on doorbells and control sockets, runs device work, and optionally
busy-polls (bounded, like vhost's busyloop_timeout) before it goes back to sleep.

A *poller* is any object with three methods:
  poll_start()          stop asking the guest for doorbells (we are looking anyway)
  poll() -> bool        one pass over its queues; True if it found work
  poll_stop() -> bool   ask for doorbells again, then re-check; True if work arrived
The loop spins over its pollers while they find work, and for `poll_us` after the last
work; then it re-enables notifications, re-checks, and sleeps in epoll.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Callable, Protocol

log = logging.getLogger("alacrity.io")


class Poller(Protocol):
    def poll_start(self) -> None: ...

    def poll(self) -> bool: ...

    def poll_stop(self) -> bool: ...


class IoThread:
    def __init__(self, poll_us: float = 0.0, name: str = "alacrity-io",
                 idle_spin_us: float = 0.0) -> None:
        self.poll_ns = int(poll_us * 1000)
        self.idle_spin_ns = int(idle_spin_us * 1000)
        self._ep = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._pollers: list[Poller] = []
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._calls: list[Callable[[], None]] = []
        self._calls_lock = threading.Lock()
        self._deferred: dict[object, Callable[[], bool]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ep.register(self._wake, select.EPOLLIN)
        self.wakeups = 0

    # -- registration (thread-safe) -------------------------------------------------------
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._readers[fd] = callback
        self._ep.register(fd, select.EPOLLIN)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def add_poller(self, p: Poller) -> None:
        if p not in self._pollers:
            self._pollers = self._pollers + [p]
            self._kick()

    def remove_poller(self, p: Poller) -> None:
        self._pollers = [q for q in self._pollers if q is not p]

    def defer(self, key: object, fn: Callable[[], bool]) -> None:
        """Run `fn` again on the next loop turn, after the fds were looked at, until it
        returns False (work that stopped at its budget comes back here; on the I/O thread)."""
        self._deferred[key] = fn

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the I/O thread (soon)."""
        with self._calls_lock:
            self._calls.append(fn)
        self._kick()

    def call_sync(self, fn: Callable[[], object], timeout: float = 10.0) -> object:
        """Run `fn` on the I/O thread and return its result."""
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return fn()
        done = threading.Event()
        box: list[object] = []

        def run() -> None:
            try:
                box.append(fn())
            except BaseException as e:  # handed back to the caller
                box.append(e)
            done.set()

        self.call(run)
        if not done.wait(timeout):
            raise TimeoutError("the I/O thread did not answer")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _kick(self) -> None:
        os.eventfd_write(self._wake, 1)

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> "IoThread":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._kick()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)

    def close(self) -> None:
        self.stop()
        self._ep.close()
        os.close(self._wake)

    # -- the loop ------------------------------------------------------------------------
    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        for fd, _ in events:
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                with self._calls_lock:
                    calls, self._calls = self._calls, []
                for fn in calls:
                    self._safe(fn)
                continue
            cb = self._readers.get(fd)
            if cb is not None:
                self._safe(cb)

    @staticmethod
    def _safe(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # a device bug must not kill the loop
            log.exception("I/O thread callback failed")

    def _run_deferred(self) -> None:
        for key, fn in list(self._deferred.items()):
            more = False
            try:
                more = fn()
            except Exception:
                log.exception("I/O thread deferred work failed")
            if not more and self._deferred.get(key) is fn:
                del self._deferred[key]

    def _run(self) -> None:
        ep = self._ep
        while not self._stop:
            if self._deferred:
                events = ep.poll(0)
                if events:
                    self._dispatch(events)
                self._run_deferred()
                continue
            if self._pollers and self.poll_ns > 0:
                self._poll_phase()
                if self._stop:
                    break
            events = self._idle_spin() if self.idle_spin_ns else None
            if not events:
                events = ep.poll(-1)
                self.wakeups += 1
            self._dispatch(events)

    def _idle_spin(self) -> list[tuple[int, int]]:
        """Look at the fds for a short while before sleeping: an exit or doorbell that
        comes soon after work is served without a wake-up (like QEMU's poll-max-ns)."""
        ep = self._ep
        clock = time.monotonic_ns
        deadline = clock() + self.idle_spin_ns
        while clock() < deadline:
            events = ep.poll(0)
            if events:
                return events
        return []

    def _poll_phase(self) -> None:
        ep = self._ep
        poll_ns = self.poll_ns
        clock = time.monotonic_ns
        pollers = self._pollers
        for p in pollers:
            p.poll_start()
        deadline = clock() + poll_ns
        spins = 0
        while not self._stop:
            worked = False
            for p in pollers:
                if p.poll():
                    worked = True
            if self._deferred:
                self._run_deferred()
            spins += 1
            if not spins & 31:
                events = ep.poll(0)
                if events:
                    self._dispatch(events)
                if self._pollers is not pollers:  # registration changed: start over
                    for p in pollers:
                        p.poll_stop()
                    return
            if worked:
                deadline = clock() + poll_ns
            elif clock() >= deadline:
                pending = False
                for p in pollers:
                    if p.poll_stop():
                        pending = True
                if not pending:
                    return
                for p in pollers:
                    p.poll_start()
                deadline = clock() + poll_ns
