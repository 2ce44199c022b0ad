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


def histogram_summary_us(counts: list[int], bucket_ns: int) -> dict[str, float]:
    """The same summary from a histogram of `bucket_ns` buckets (a bucket's midpoint stands
    for its samples; the last bucket holds everything beyond, reported at its start)."""
    total = sum(counts)
    if not total:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "mean": 0.0, "max": 0.0}

    def at(q: float) -> float:
        want = q / 100 * total
        seen = 0
        for i, c in enumerate(counts):
            seen += c
            if seen >= want and c:
                return (i + 0.5) * bucket_ns
        return len(counts) * bucket_ns

    mean = sum((i + 0.5) * bucket_ns * c for i, c in enumerate(counts)) / total
    top = max(i for i, c in enumerate(counts) if c)
    return {"p50": round(at(50) / 1000, 3), "p90": round(at(90) / 1000, 3),
            "p99": round(at(99) / 1000, 3), "p999": round(at(99.9) / 1000, 3),
            "mean": round(mean / 1000, 3), "max": round((top + 1) * bucket_ns / 1000, 3)}
