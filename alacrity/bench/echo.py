"""The far half of a round-trip limit, in a process of its own.

A vhost-user frontend runs its driver in a thread of the benchmark process; a round trip
to an echo thread of that same process would measure the GIL, not the machine. So the
echo runs here, started by `EchoProcess` for the limit phase only:

    python -m alacrity.bench.echo eventfd PING_FD PONG_FD
    python -m alacrity.bench.echo shm MEM_FD OFFSET

eventfd: answer every read of PING with a write to PONG. shm: spin, copying the 32-bit
word at OFFSET to the word after it whenever it changes. One byte on stdout says "ready".
"""

from __future__ import annotations

import mmap
import os
import select
import subprocess
import sys
from typing import Any


def _ready() -> None:
    sys.stdout.write("r")
    sys.stdout.flush()


def _eventfd(ping: int, pong: int) -> None:
    p = select.poll()
    p.register(ping, select.POLLIN)
    _ready()
    while True:
        p.poll()
        try:
            os.eventfd_read(ping)
        except BlockingIOError:
            continue
        os.eventfd_write(pong, 1)


def _shm(fd: int, offset: int) -> None:
    page = offset & ~(mmap.PAGESIZE - 1)
    m = mmap.mmap(fd, mmap.PAGESIZE, offset=page)
    words = memoryview(m)[offset - page:offset - page + 8].cast("I")
    last = words[0]
    _ready()
    while True:
        v = words[0]
        if v != last:
            last = v
            words[1] = v


def main(argv: list[str]) -> None:
    kind, a, b = argv[0], int(argv[1]), int(argv[2])
    if kind == "eventfd":
        _eventfd(a, b)
    else:
        _shm(a, b)


class EchoProcess:
    """Start the echo; stop() ends it."""

    def __init__(self, kind: str, a: int, b: int, fds: list[int]):
        self.p = subprocess.Popen([sys.executable, "-m", "alacrity.bench.echo", kind, str(a),
                                   str(b)], pass_fds=fds, stdout=subprocess.PIPE)
        assert self.p.stdout is not None
        if self.p.stdout.read(1) != b"r":
            raise RuntimeError("the echo process did not start")

    def stop(self, *_: Any) -> None:
        self.p.kill()
        self.p.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
