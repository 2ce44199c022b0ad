"""What every benchmark report shares."""

from __future__ import annotations

import os
import platform
import threading
import time
from typing import Any, Callable, Iterable

from alacrity.bus import QueueStats


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version()}


def sum_stats(stats: Iterable[QueueStats | Iterable[QueueStats]]) -> dict[str, int]:
    """Counters of several queues (or lists of queues) added up."""
    total = QueueStats()
    for s in stats:
        for q in (s if not isinstance(s, QueueStats) else [s]):
            for k in QueueStats.__slots__:
                setattr(total, k, getattr(total, k) + getattr(q, k))
    return total.as_dict()


VHOST_USER = "vhost-user:"


def check_guest(guest: str, abi: str) -> None:
    """`process`, `kvm` (the C payload in a VM), or `vhost-user:PATH` (our drivers against
    the backend serving PATH)."""
    from alacrity.errors import ConfigError
    if guest in ("process", "kvm"):
        return
    if guest.startswith(VHOST_USER):
        path = guest[len(VHOST_USER):]
        if not path:
            raise ConfigError("--guest vhost-user:PATH: the socket path is missing")
        if abi == "vbus":
            raise ConfigError("--guest vhost-user: vhost-user carries virtio only "
                              "(--abi virtio-split or virtio-packed)")
        return
    raise ConfigError(f"--guest {guest}: expected process, kvm or vhost-user:PATH")


def run_in_thread(fn: Callable[[], dict[str, Any]], timeout: float,
                  tick: Callable[[], None] | None) -> dict[str, Any]:
    """Run a guest program in a thread of this process (a vhost-user frontend has no guest
    process), calling `tick` about ten times a second. A program still running at the
    deadline is reported, not waited for (its socket timeouts end it)."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:          # noqa: BLE001 - handed to the caller
            out["error"] = e

    th = threading.Thread(target=body, name="alacrity-frontend", daemon=True)
    th.start()
    deadline = time.monotonic() + timeout
    while th.is_alive():
        th.join(0.1)
        if tick:
            tick()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest program did not finish within {timeout:.0f} s")
    if "error" in out:
        raise out["error"]
    return out["result"]


def ticker(tick: Callable[[float], None] | None, total: float) -> threading.Event:
    """Call `tick(fraction)` about ten times a second for `total` seconds' worth of run,
    from a thread of its own, until the returned event is set."""
    stop = threading.Event()
    if tick:
        t0 = time.monotonic()

        def run() -> None:
            while not stop.wait(0.1):
                tick(min(1.0, (time.monotonic() - t0) / total))
        threading.Thread(target=run, name="alacrity-ticker", daemon=True).start()
    return stop
