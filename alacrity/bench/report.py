"""Reports: a rich table for the terminal, a progress bar for long runs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def human_rate(x: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.2f} {suffix}{unit}"
    return f"{x:.1f} {unit}"


def bench_table(r: dict[str, Any]) -> Table:
    if r["benchmark"] == "blk":
        what = f"{r['rw']} {r['bs']} B, depth {r['depth']}"
    else:
        what = f"{r['mode']} {r['size']} B frames, {r['backend']}"
    title = f"bench {r['benchmark']}: {r['abi']}, {r['guest']} guest, notify {r['notify']}, {what}"
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("measured", justify="right")
    t.add_column("limit", justify="right")
    lim = r["limit"]
    t.add_row("ops/s" if r["benchmark"] == "blk" else "frames/s (ops)",
              human_rate(r["ops_per_s"]), human_rate(lim["ops_per_s"]))
    t.add_row("bytes/s", human_rate(r["bytes_per_s"], "B"), human_rate(lim["bytes_per_s"], "B"))
    t.add_row("ratio to limit", f"{r['ratio_to_limit']:.3f}", "1")
    lat = r["lat_us"]
    t.add_row("latency p50 / p99 (µs)", f"{lat['p50']:.1f} / {lat['p99']:.1f}",
              f"{lim['lat_us']['p50']:.1f}" if "lat_us" in lim else "")
    t.add_row("doorbells / op", f"{r['doorbells_per_op']:.4f}", "")
    t.add_row("interrupts / op", f"{r['interrupts_per_op']:.4f}", "")
    t.add_row("exits / op", f"{r['exits_per_op']:.4f}", "")
    t.add_row("errors", str(r["errors"]), "")
    t.caption = f"limit: {lim['what']}"
    return t


@contextmanager
def progress(description: str, enabled: bool = True) -> Iterator[Callable[[float], None]]:
    """A progress bar on stderr; yields tick(fraction_done)."""
    if not enabled:
        yield lambda f: None
        return
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=console, transient=True) as p:
        task = p.add_task(description, total=1.0)
        yield lambda f: p.update(task, completed=f)
