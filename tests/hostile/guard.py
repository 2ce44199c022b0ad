"""What every hostile-guest test checks, in one place.

`GuardedRam` is guest RAM whose two regions are adjacent in guest-physical space (A at 0,
B right after it) but not in the memfd behind them: canary pages sit before A, between A
and B, and after B. A device that translated a range across the A/B boundary as if it were
contiguous, or ran off either end, would read or write canary bytes. After an attack the
canaries must be unchanged (nothing outside RAM was written), and nothing the device
produced (an image file, transmitted frames) may contain canary bytes (nothing outside RAM
was read).

`deadline()` bounds the work of one doorbell: a device that loops on a hostile ring fails
the test with TimeoutError instead of hanging it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import threading
from typing import Iterator

from alacrity.memory import GuestMemory, RegionInfo

PAGE = mmap.PAGESIZE
MiB = 1 << 20
CANARY = b"CANARY!\xa5"                 # 8 bytes; any read of 15+ canary bytes contains it


class GuardedRam:
    def __init__(self, a_size: int = 8 * MiB, b_size: int = 1 * MiB):
        self.a_size, self.b_size = a_size, b_size
        self.fd = os.memfd_create("alacrity-guarded", os.MFD_CLOEXEC)
        total = PAGE + a_size + PAGE + b_size + PAGE
        os.ftruncate(self.fd, total)
        self.guards = [0, PAGE + a_size, PAGE + a_size + PAGE + b_size]   # file offsets
        self._file = mmap.mmap(self.fd, total)
        page = (CANARY * (PAGE // len(CANARY)))
        for off in self.guards:
            self._file[off:off + PAGE] = page
        self.mem = GuestMemory.from_fds(
            [RegionInfo(0, a_size, self.fd, PAGE),
             RegionInfo(a_size, b_size, self.fd, 2 * PAGE + a_size)], owns_fds=False)
        self.end = a_size + b_size            # first guest-physical address past RAM

    def canaries_intact(self) -> bool:
        page = CANARY * (PAGE // len(CANARY))
        return all(self._file[off:off + PAGE] == page for off in self.guards)

    def close(self) -> None:
        """Close the file view and fd (the GuestMemory is closed by its owner)."""
        self._file.close()
        os.close(self.fd)


def leaked(data: bytes) -> bool:
    """Did canary bytes (memory outside guest RAM) end up in what the device produced?"""
    return CANARY in data or CANARY[4:] + CANARY[:4] in data


@contextlib.contextmanager
def deadline(seconds: float = 5.0) -> Iterator[None]:
    """Raise TimeoutError in the main thread if the block runs longer than `seconds`."""
    assert threading.current_thread() is threading.main_thread()

    def expired(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: the work per doorbell is unbounded")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
