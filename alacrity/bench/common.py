"""What every benchmark report shares."""

from __future__ import annotations

import os
import platform
from typing import Any, Iterable

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
