"""shm-signal (version 1): AlacrityVM's in-band notification mitigation.

Layout (16 bytes, little-endian):
  0  u32 magic (0x58fa39df)
  4  u32 ver (1)
  8  irq[north]: u8 enabled, u8 pending, u8 dirty
  11 irq[south]: u8 enabled, u8 pending, u8 dirty
  14 2 bytes padding
`irq[x]` is the receive state of side x. North owns the memory (the guest), south is the
other side (the host device).

Rules (lib/shm_signal.c):
- inject (to the remote side r): irq[r].dirty = 1; barrier; if irq[r].enabled and not
  irq[r].pending: pending = 1; barrier; cross the boundary once.
- wakeup (on my irq): while enabled and (dirty or pending): repeat {dirty = 0; run the
  notifier} while enabled and dirty; then pending = 0. The outer loop closes the race of a
  signal arriving between clearing dirty and clearing pending.
- disable: enabled = 0. enable: enabled = 1, and if dirty or pending, wake up at once.
Each flag is its own byte and is written with one byte store.
"""

from __future__ import annotations

from typing import Callable

from alacrity.errors import GuestError
from alacrity.memory import full_barrier

MAGIC = 0x58FA39DF
VERSION = 1
SIZE = 16
NORTH, SOUTH = 0, 1
# byte offsets within the descriptor
OFF_MAGIC, OFF_VER = 0, 4
OFF_IRQ = (8, 11)          # irq[north], irq[south]
ENABLED, PENDING, DIRTY = 0, 1, 2


def init_desc(view: memoryview) -> None:
    """Write a fresh descriptor (north does this before it hands the memory over)."""
    view[:SIZE] = bytes(SIZE)
    view[0:4] = MAGIC.to_bytes(4, "little")
    view[4:8] = VERSION.to_bytes(4, "little")


class ShmSignal:
    """One side (`locale`) of a shm-signal whose 16-byte descriptor is `view`.

    `cross()` is how this side reaches the other (a doorbell for north, an event for
    south); `notifier()` is what a wakeup runs. `always=True` crosses on every inject
    (no mitigation), for measurements that want none."""

    __slots__ = ("view", "locale", "cross", "notifier", "always", "_mine", "_theirs",
                 "injected", "crossed", "in_wakeup")

    def __init__(self, view: memoryview, locale: int, cross: Callable[[], None],
                 notifier: Callable[[], None] | None = None, *, always: bool = False,
                 check: bool = True):
        if len(view) < SIZE:
            raise GuestError(f"shm-signal descriptor of {len(view)} bytes (needs {SIZE})")
        if check:
            magic = int.from_bytes(view[0:4], "little")
            ver = int.from_bytes(view[4:8], "little")
            if magic != MAGIC or ver != VERSION:
                raise GuestError(f"shm-signal magic/version {magic:#x}/{ver} "
                                 f"(expected {MAGIC:#x}/{VERSION})")
        self.view = view
        self.locale = locale
        self.cross = cross
        self.notifier = notifier or (lambda: None)
        self.always = always
        self._mine = OFF_IRQ[locale]
        self._theirs = OFF_IRQ[locale ^ 1]
        self.injected = 0       # injects made
        self.crossed = 0        # of which crossed the boundary
        self.in_wakeup = False

    # -- sending ---------------------------------------------------------------------------
    def inject(self) -> bool:
        """Tell the remote side the shared memory changed. True if it crossed."""
        v = self.view
        t = self._theirs
        v[t + DIRTY] = 1
        full_barrier()                      # dirty visible before we look at pending
        self.injected += 1
        if v[t + ENABLED] and (self.always or not v[t + PENDING]):
            v[t + PENDING] = 1
            self.crossed += 1
            self.cross()
            return True
        return False

    # -- receiving -------------------------------------------------------------------------
    def enable(self) -> bool:
        """Unmask; runs the wakeup now if signals came while masked. True if it ran."""
        v = self.view
        m = self._mine
        v[m + ENABLED] = 1
        full_barrier()
        if (v[m + DIRTY] or v[m + PENDING]) and not self.in_wakeup:
            self.wakeup()
            return True
        return False

    def disable(self) -> None:
        """Mask: the remote side's injects only mark us dirty."""
        self.view[self._mine + ENABLED] = 0

    def wakeup(self, budget: int = 64) -> bool:
        """Run the notifier until our irq is clean, then acknowledge (clear pending).
        `budget` bounds the notifier runs of one wakeup, so a peer that keeps re-dirtying
        cannot hold us here; returns True if it ran out with work left: pending stays set
        (the peer's signals keep being absorbed) and the caller must call again."""
        v = self.view
        m = self._mine
        self.in_wakeup = True
        try:
            while v[m + ENABLED] and (v[m + DIRTY] or v[m + PENDING]):
                while True:
                    v[m + DIRTY] = 0
                    full_barrier()
                    self.notifier()
                    budget -= 1
                    if not (v[m + ENABLED] and v[m + DIRTY]):
                        break
                    if budget <= 0:
                        return True     # pending stays set: the peer need not signal again
                v[m + PENDING] = 0
                full_barrier()
            return False
        finally:
            self.in_wakeup = False

    def flags(self, locale: int) -> tuple[int, int, int]:
        """(enabled, pending, dirty) of one side's irq, for tests and reports."""
        o = OFF_IRQ[locale]
        return self.view[o + ENABLED], self.view[o + PENDING], self.view[o + DIRTY]
