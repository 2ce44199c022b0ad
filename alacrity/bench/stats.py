"""Small statistics for benchmark results (no numpy needed)."""

from __future__ import annotations

from typing import Sequence


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) of already sorted values, linearly interpolated."""
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def latency_summary_us(samples_ns: list[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9/mean/max in microseconds."""
    s = sorted(samples_ns)
    if not s:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "mean": 0.0, "max": 0.0}
    return {
        "p50": round(percentile(s, 50) / 1000, 3),
        "p90": round(percentile(s, 90) / 1000, 3),
        "p99": round(percentile(s, 99) / 1000, 3),
        "p999": round(percentile(s, 99.9) / 1000, 3),
        "mean": round(sum(s) / len(s) / 1000, 3),
        "max": round(s[-1] / 1000, 3),
    }
