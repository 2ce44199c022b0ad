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


def _cell_text(c: dict[str, Any]) -> str:
    if c["status"] == "failed":
        return f"[red]failed[/]: {c['errors'][-1][:60]}"
    if c["status"] != "ok":
        return "[dim]not run[/]"
    m = c["metrics"]
    key = c["key_metric"]
    s = m[key]
    if key == "lat_p50_us":
        head = f"{s['median']:.1f} µs ({s['min']:.1f}–{s['max']:.1f})"
    elif key == "bytes_per_s":
        head = f"{s['median'] / 1e9:.2f} GB/s ({s['min'] / 1e9:.2f}–{s['max'] / 1e9:.2f})"
    else:
        head = f"{s['median'] / 1e3:.0f}k ({s['min'] / 1e3:.0f}–{s['max'] / 1e3:.0f}k)"
    notif = m["doorbells_per_op"]["median"] + m["interrupts_per_op"]["median"]
    tail = f"n/op {notif:.3f}"
    if m["exits_per_op"]["median"] or c["guest"] == "kvm":
        tail += f" x/op {m['exits_per_op']['median']:.3f}"
    return f"{head}\n[dim]{tail}[/]"


def _limit_text(cells: list[dict[str, Any]]) -> str:
    ok = [c for c in cells if c["status"] == "ok"]
    if not ok:
        return ""
    lim = ok[0]["limit"]
    key = ok[0]["key_metric"]
    if key == "lat_p50_us" and "lat_p50_us" in lim:
        return f"{lim['lat_p50_us']:.1f} µs"
    if key == "bytes_per_s":
        return f"{lim['bytes_per_s'] / 1e9:.2f} GB/s"
    if key == "lat_p50_us":
        return f"{lim['ops_per_s'] / 1e3:.0f}k ops/s"
    return f"{lim['ops_per_s'] / 1e3:.0f}k"


def shootout_table(results: dict[str, Any]) -> Table:
    cfg = results["config"]
    title = (f"alacrity shootout: median (min–max) of {cfg['repeat']} interleaved run(s) "
             f"per cell, {'quick' if cfg['quick'] else 'full'}")
    t = Table(title=title, show_header=True, header_style="bold", show_lines=True)
    t.add_column("workload")
    t.add_column("notify")
    guests = len(cfg["guests"]) > 1
    if guests:
        t.add_column("guest")
    for a in cfg["abis"]:
        t.add_column(a, justify="right")
    t.add_column("limit", justify="right")
    cells = {(c["workload"], c["notify"], c["abi"], c["guest"]): c for c in results["cells"]}
    for w in cfg["workloads"]:
        for n in cfg["notify"]:
            for g in cfg["guests"]:
                row = [cells.get((w, n, a, g)) for a in cfg["abis"]]
                present = [c for c in row if c is not None]
                if not present:
                    continue
                texts = [_cell_text(c) if c is not None else "not yet" for c in row]
                t.add_row(present[0]["title"], n, *([g] if guests else []), *texts,
                          _limit_text(present))
    ll = results["machine"]["low_latency"]
    m = results["machine"]
    t.caption = (f"n/op: doorbells + interrupts per op; x/op: exits per op. "
                 f"{m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}; "
                 f"low latency: {ll['why']}"
                 + ("; INTERRUPTED: partial results" if results["interrupted"] else ""))
    return t
