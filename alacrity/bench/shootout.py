"""`alacrity shootout`: the matrix ABI x notify mode x workload, measured fairly.

Every cell is an ordinary `bench blk` or `bench net` run. Rounds are interleaved (each
round runs every cell once, ABIs next to each other), repeated, and each cell reports the
median and the spread (min-max) of its runs. The physical limits come from the same runs
(each benchmark measures its own) and are shown beside the results. A cell that fails is
kept, marked failed with its error. Ctrl-C stops after cleaning up and writes what was
measured so far.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from alacrity.bench import blk, net
from alacrity.bench.common import machine_info
from alacrity.errors import ConfigError

ABIS = ("virtio-split", "virtio-packed", "vbus")
NOTIFY = ("always", "mitigated", "poll")
GUESTS = ("process", "kvm")
# (workload kind, ABI, guest) cells nobody can run yet
UNSUPPORTED: set[tuple[str, str, str]] = set()
SCRATCH_BYTES = 128 << 20
RESULTS_VERSION = 1


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str                 # "blk" or "net"
    title: str
    key: str                  # the headline metric: "ops_per_s", "bytes_per_s" or "lat_p50_us"
    options: dict[str, Any]


WORKLOADS = (
    Workload("blk-null-d1", "blk", "blk null 4 KiB, depth 1", "lat_p50_us",
             {"image": "null", "bs": 4096, "depth": 1, "rw": "read"}),
    Workload("blk-null-d32", "blk", "blk null 4 KiB, depth 32", "ops_per_s",
             {"image": "null", "bs": 4096, "depth": 32, "rw": "read"}),
    Workload("blk-file-64k-seq", "blk", "blk file 64 KiB sequential read, depth 8", "bytes_per_s",
             {"image": "scratch", "bs": 65536, "depth": 8, "rw": "read"}),
    Workload("net-stream", "net", "net 64 B stream, loopback", "ops_per_s",
             {"mode": "stream", "size": 64, "backend": "loopback"}),
    Workload("net-pingpong", "net", "net 64 B pingpong, pair", "lat_p50_us",
             {"mode": "pingpong", "size": 64, "backend": "pair"}),
)
BY_NAME = {w.name: w for w in WORKLOADS}

# what each cell reports (median, min, max over its runs)
METRICS = ("ops_per_s", "bytes_per_s", "lat_p50_us", "lat_p99_us", "doorbells_per_op",
           "interrupts_per_op", "exits_per_op", "ratio_to_limit", "limit_ops_per_s",
           "limit_bytes_per_s")


@dataclass
class Shootout:
    abis: tuple[str, ...] = ABIS
    notify: tuple[str, ...] = NOTIFY
    guests: tuple[str, ...] = ("process",)
    workloads: tuple[str, ...] = tuple(w.name for w in WORKLOADS)
    repeat: int = 3
    seconds: float = 1.5
    warmup: float = 0.5
    limit_seconds: float = 0.5
    quick: bool = False
    low_latency: bool = False
    out: str = "shootout-out"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick_config(cls, **kw: Any) -> "Shootout":
        base = dict(repeat=1, seconds=0.4, warmup=0.15, limit_seconds=0.2, quick=True)
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)

    def validate(self) -> None:
        for name, values, allowed in (("abi", self.abis, ABIS), ("notify", self.notify, NOTIFY),
                                      ("workloads", self.workloads, tuple(BY_NAME))):
            if not values:
                raise ConfigError(f"--{name}: nothing selected (have: {', '.join(allowed)})")
            for v in values:
                if v not in allowed:
                    raise ConfigError(f"--{name} {v}: expected some of {', '.join(allowed)}")
        for g in self.guests:
            if g not in GUESTS:
                raise ConfigError(f"--guest {g}: not available yet (have: {', '.join(GUESTS)})")
            if g == "kvm":
                from alacrity.kvm import api
                why = api.usable()
                if why:
                    raise ConfigError(f"--guest kvm: {why}")
        if not self.cells():
            raise ConfigError("nothing to run")
        if self.repeat < 1:
            raise ConfigError(f"--repeat {self.repeat}: must be at least 1")

    def cells(self) -> list[tuple[str, str, str, str]]:
        """(workload, notify, abi, guest) in the order of one round: the ABIs of one
        workload and mode next to each other, so they see the same machine state."""
        return [(w, n, a, g) for w in self.workloads for n in self.notify
                for g in self.guests for a in self.abis
                if (BY_NAME[w].kind, a, g) not in UNSUPPORTED]

    def runs(self) -> int:
        return self.repeat * len(self.cells())


# -------------------------------------------------------------------------------------------
# /dev/cpu_dma_latency (what tuned's latency profiles hold)
# -------------------------------------------------------------------------------------------
class LowLatency:
    """Hold /dev/cpu_dma_latency at 0 while open; says whether it took effect."""

    PATH = "/dev/cpu_dma_latency"

    def __init__(self, wanted: bool):
        self.wanted = wanted
        self.fd = -1
        self.effective = False
        self.why = "not requested"
        if not wanted:
            return
        try:
            self.fd = os.open(self.PATH, os.O_RDWR | os.O_CLOEXEC)
            os.write(self.fd, (0).to_bytes(4, "little"))
            # reading the device gives the current system-wide target (binary s32)
            check = os.open(self.PATH, os.O_RDONLY | os.O_CLOEXEC)
            try:
                target = int.from_bytes(os.read(check, 4), "little", signed=True)
            finally:
                os.close(check)
            self.effective = target == 0
            self.why = (f"{self.PATH} held at 0 us for the run" if self.effective
                        else f"{self.PATH} written, but the target reads {target} us")
        except OSError as e:
            self.why = f"{self.PATH}: {e.strerror}; ran without it"
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def describe(self) -> dict[str, Any]:
        return {"requested": self.wanted, "effective": self.effective, "why": self.why}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -------------------------------------------------------------------------------------------
# running
# -------------------------------------------------------------------------------------------
def _flatten(r: dict[str, Any]) -> dict[str, float]:
    return {"ops_per_s": r["ops_per_s"], "bytes_per_s": r["bytes_per_s"],
            "lat_p50_us": r["lat_us"]["p50"], "lat_p99_us": r["lat_us"]["p99"],
            "doorbells_per_op": r["doorbells_per_op"], "interrupts_per_op": r["interrupts_per_op"],
            "exits_per_op": r["exits_per_op"], "ratio_to_limit": r["ratio_to_limit"],
            "limit_ops_per_s": r["limit"]["ops_per_s"],
            "limit_bytes_per_s": r["limit"]["bytes_per_s"]}


def make_scratch(size: int = SCRATCH_BYTES) -> str:
    """A scratch image of real (non-zero, non-sparse) data in $TMPDIR."""
    fd, path = tempfile.mkstemp(prefix="alacrity-scratch-", suffix=".img")
    try:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            os.write(fd, block)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def run_one(cfg: Shootout, workload: str, notify: str, abi: str, guest: str, scratch: str | None,
            tick: Callable[[float], None] | None = None) -> dict[str, Any]:
    w = BY_NAME[workload]
    common = dict(abi=abi, guest=guest, notify=notify, seconds=cfg.seconds, warmup=cfg.warmup,
                  limit_seconds=cfg.limit_seconds)
    if w.kind == "blk":
        opts = dict(w.options)
        if opts["image"] == "scratch":
            assert scratch is not None
            opts["image"] = scratch
        return blk.run(blk.BlkBench(**common, **opts), tick)
    return net.run(net.NetBench(**common, **w.options), tick)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def build_results(cfg: Shootout, runs: dict[tuple, list[dict[str, Any]]],
                  errors: dict[tuple, list[str]], low_latency: dict[str, Any],
                  started: float, interrupted: bool) -> dict[str, Any]:
    cells = []
    for key in cfg.cells():
        workload, notify, abi, guest = key
        w = BY_NAME[workload]
        ok = runs.get(key, [])
        errs = errors.get(key, [])
        cell: dict[str, Any] = {"workload": workload, "title": w.title, "kind": w.kind,
                                "key_metric": w.key, "abi": abi, "notify": notify,
                                "guest": guest, "runs": len(ok), "errors": errs}
        if ok:
            flat = [_flatten(r) for r in ok]
            cell["status"] = "ok"
            cell["metrics"] = {m: _summary([f[m] for f in flat]) for m in METRICS}
            cell["limit"] = {"what": ok[0]["limit"]["what"],
                             "ops_per_s": cell["metrics"]["limit_ops_per_s"]["median"],
                             "bytes_per_s": cell["metrics"]["limit_bytes_per_s"]["median"]}
            lat = [r["limit"].get("lat_us", {}).get("p50") for r in ok]
            if all(x is not None for x in lat):
                cell["limit"]["lat_p50_us"] = round(statistics.median(lat), 3)
        elif errs:
            cell["status"] = "failed"
        else:
            cell["status"] = "not-run"
        cells.append(cell)
    return {
        "version": RESULTS_VERSION,
        "command": "alacrity shootout",
        "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "complete": not interrupted and all(c["status"] != "not-run" for c in cells),
        "interrupted": interrupted,
        "config": {"abis": list(cfg.abis), "notify": list(cfg.notify), "guests": list(cfg.guests),
                   "workloads": list(cfg.workloads), "repeat": cfg.repeat,
                   "seconds": cfg.seconds, "warmup": cfg.warmup,
                   "limit_seconds": cfg.limit_seconds, "quick": cfg.quick},
        "machine": {**machine_info(), "low_latency": low_latency},
        "limits": limits_of(cells),
        "cells": cells,
    }


def limits_of(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The physical limits, as measured by the cells of this run (median over cells)."""
    def med(sel: Callable[[dict[str, Any]], bool], field_: str) -> float | None:
        xs = [c["limit"][field_] for c in cells if c["status"] == "ok" and sel(c)
              and field_ in c["limit"]]
        return round(statistics.median(xs), 3) if xs else None

    def trips(c: dict[str, Any]) -> int:
        return 2 if BY_NAME[c["workload"]].options.get("backend") == "pair" else 1

    def rtt(poll: bool) -> float | None:
        xs = [c["limit"]["lat_p50_us"] / trips(c) for c in cells
              if c["status"] == "ok" and c["workload"] == "net-pingpong"
              and (c["notify"] == "poll") == poll and "lat_p50_us" in c["limit"]]
        return round(statistics.median(xs), 3) if xs else None

    out = {
        "eventfd_rtt_us": rtt(False),
        "shm_rtt_us": rtt(True),
        "preadv_bytes_per_s": med(lambda c: c["workload"] == "blk-file-64k-seq", "bytes_per_s"),
        "null_loop_ops_per_s": med(lambda c: c["workload"].startswith("blk-null"), "ops_per_s"),
        "net_core_pps": med(lambda c: c["workload"] == "net-stream", "ops_per_s"),
    }
    return {k: v for k, v in out.items() if v is not None}


def write_results(out_dir: str, results: dict[str, Any]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def run(cfg: Shootout, progress: Callable[[str, float], None] | None = None,
        on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the matrix. `progress(description, fraction_of_all_runs)`; results.json is
    rewritten after every run, so an interrupted shootout leaves what it measured."""
    cfg.validate()
    started = time.time()
    runs: dict[tuple, list[dict[str, Any]]] = {}
    errors: dict[tuple, list[str]] = {}
    total = cfg.runs()
    done = 0
    ll = LowLatency(cfg.low_latency)
    scratch = None
    interrupted = False
    try:
        if "blk-file-64k-seq" in cfg.workloads:
            if progress:
                progress("creating the scratch image", 0.0)
            scratch = make_scratch()
        for _rep in range(cfg.repeat):
            for key in cfg.cells():
                workload, notify, abi, guest = key
                desc = f"{workload} {notify} {abi}"

                def tick(f: float, d: str = desc, base: int = done) -> None:
                    if progress:
                        progress(d, (base + min(1.0, f)) / total)

                tick(0.0)
                try:
                    r = run_one(cfg, workload, notify, abi, guest, scratch, tick)
                    if r.get("errors"):
                        raise RuntimeError(f"{r['errors']} requests or frames failed")
                    runs.setdefault(key, []).append(r)
                except KeyboardInterrupt:
                    raise
                except Exception as e:   # the cell is kept, marked failed, with its error
                    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    errors.setdefault(key, []).append(f"{type(e).__name__}: {why}"[:300])
                done += 1
                results = build_results(cfg, runs, errors, ll.describe(), started, False)
                write_results(cfg.out, results)
                if on_result:
                    on_result(results)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        ll.close()
        if scratch is not None:
            try:
                os.unlink(scratch)
            except OSError:
                pass
    results = build_results(cfg, runs, errors, ll.describe(), started, interrupted)
    write_results(cfg.out, results)
    return results
