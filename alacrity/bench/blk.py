"""`alacrity bench blk`: a block workload through a guest, a ring and a device model.

The host builds a machine with one block device, boots a guest that runs `guest_main`,
and snapshots its own counters when the guest marks the start and end of the measured
window (warm-up excluded). The physical limit is measured in the same run.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from alacrity.bench.common import (VHOST_USER, check_guest, machine_info, run_in_thread,
                                    ticker)
from alacrity.bench.limits import block_offsets, file_limit, null_limit
from alacrity.bench.stats import latency_summary_us
from alacrity.devices.block import SECTOR, BlockCore, open_backend
from alacrity.errors import ConfigError
from alacrity.guest.drivers.vbus_bridge import find_bridge
from alacrity.guest.drivers.vblock import VblockDriver
from alacrity.guest.drivers.virtio_blk import VirtioBlkDriver
from alacrity.guest.process import ProcessGuest
from alacrity.guest.programs import find_device
from alacrity.machine import Machine
from alacrity.virtio import blk as B
from alacrity.virtio import spec
from alacrity.vbus import vblock as V
from alacrity.vbus.vblock import Vblock
from alacrity.virtio.device import Notify

ABIS = ("virtio-split", "virtio-packed", "vbus")
GUESTS = ("process", "kvm", "vhost-user:PATH")
RWS = ("read", "write", "randread", "randwrite")
NOTIFY = tuple(n.value for n in Notify)


@dataclass
class BlkBench:
    abi: str = "virtio-split"
    guest: str = "process"
    rw: str = "read"
    bs: int = 4096
    depth: int = 1
    seconds: float = 5.0
    warmup: float = 1.0
    image: str = "null"
    notify: str = "mitigated"
    queue_size: int = 256
    poll_us: float = 200.0
    host_spin_us: float = 50.0
    null_size: int = 1 << 30
    limit_seconds: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.abi not in ABIS:
            raise ConfigError(f"--abi {self.abi}: not available for blk (have: {', '.join(ABIS)})")
        check_guest(self.guest, self.abi)
        if self.rw not in RWS:
            raise ConfigError(f"--rw {self.rw}: expected one of {', '.join(RWS)}")
        if self.notify not in NOTIFY:
            raise ConfigError(f"--notify {self.notify}: expected one of {', '.join(NOTIFY)}")
        if self.bs <= 0 or self.bs % SECTOR:
            raise ConfigError(f"--bs {self.bs}: must be a positive multiple of {SECTOR}")
        if self.bs > 1 << 22:
            raise ConfigError(f"--bs {self.bs}: larger than the device's size_max (4 MiB)")
        if self.depth < 1:
            raise ConfigError(f"--depth {self.depth}: must be at least 1")
        if self.abi == "vbus":
            if not 2 <= self.queue_size <= 65536:
                raise ConfigError(f"--queue-size {self.queue_size}: an IOQ holds 2..65536")
        elif self.queue_size & (self.queue_size - 1) or not 2 <= self.queue_size <= 32768:
            raise ConfigError(f"--queue-size {self.queue_size}: must be a power of two, 2..32768")
        if self.depth * (1 if self.abi == "vbus" else 3) > self.queue_size:
            raise ConfigError(f"--depth {self.depth}: needs {self.depth * 3} descriptors, "
                              f"the queue has {self.queue_size}")
        if self.host_spin_us < 0:
            raise ConfigError(f"--host-spin-us {self.host_spin_us}: must be 0 or more")
        if self.seconds <= 0:
            raise ConfigError(f"--seconds {self.seconds}: must be positive")
        if self.image != "null":
            if not os.path.exists(self.image):
                raise ConfigError(f"--image {self.image}: no such file "
                                  f"(create one, e.g. truncate -s 256M {self.image})")
            size = os.stat(self.image).st_size
            if os.path.isfile(self.image) and size < self.bs:
                raise ConfigError(f"--image {self.image}: {size} bytes, smaller than --bs")


def run(cfg: BlkBench, tick: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Run one benchmark; `tick(fraction_done)` is called about ten times a second."""
    cfg.validate()
    if cfg.guest.startswith(VHOST_USER):
        return _run_vhost_user(cfg, tick)
    if cfg.guest == "kvm":
        return _run_kvm(cfg, tick)
    notify = Notify(cfg.notify)
    write = "write" in cfg.rw
    backend = open_backend(cfg.image, read_only=not write, null_size=cfg.null_size)
    machine = Machine(_ram(cfg), poll_us=cfg.poll_us if notify is Notify.POLL else 0,
                      idle_spin_us=cfg.host_spin_us)
    try:
        if cfg.abi == "vbus":
            vblock = Vblock(BlockCore(backend))
            dev = machine.add_vbus_bridge([vblock], notify=notify)
            signals = dev.totals
            broken = lambda: vblock.broken or dev.broken       # noqa: E731
        else:
            dev = machine.add_virtio_mmio(B.VirtioBlk(BlockCore(backend), queue_max=cfg.queue_size),
                                          notify=notify)
            signals = dev.stats[0].as_dict
            broken = lambda: dev.broken                          # noqa: E731
        guest = ProcessGuest(machine)
        marks: dict[str, dict[str, Any]] = {}

        def on_mark(name: str, data: dict[str, Any]) -> None:
            marks[name] = {"queue": signals(), "exits": guest.exits,
                           "io_wakeups": machine.io.wakeups, "t": time.perf_counter()}

        guest.on_mark = on_mark
        t0 = time.monotonic()
        total = cfg.warmup + cfg.seconds
        guest.start("alacrity.bench.blk:guest_main", _args(cfg))
        try:
            g = guest.wait(timeout=total + 60,
                           tick=(lambda: tick(min(1.0, (time.monotonic() - t0) / total)))
                           if tick else None)
        finally:
            guest.close()
        if broken():
            raise RuntimeError(f"device reported a guest error: {dev.last_error}")
    finally:
        machine.close()
        backend.close()
    if cfg.image == "null":
        limit = null_limit(cfg.rw, cfg.bs, cfg.limit_seconds, cfg.null_size)
    else:
        limit = file_limit(cfg.image, cfg.rw, cfg.bs, cfg.limit_seconds)
    if tick:
        tick(1.0)
    return assemble(cfg, g, marks, limit)


def _args(cfg: BlkBench) -> dict[str, Any]:
    return {"abi": cfg.abi, "rw": cfg.rw, "bs": cfg.bs, "depth": cfg.depth,
            "seconds": cfg.seconds, "warmup": cfg.warmup, "notify": cfg.notify,
            "queue_size": cfg.queue_size, "poll_us": cfg.poll_us}


def _ram(cfg: BlkBench) -> int:
    ram = max(32 << 20, cfg.depth * (cfg.bs + 4096) + (16 << 20))
    return (ram + (2 << 20) - 1) & ~((2 << 20) - 1)


def _run_vhost_user(cfg: BlkBench, tick: Callable[[float], None] | None) -> dict[str, Any]:
    """Our virtio-blk driver, in this process, against somebody's vhost-user backend.
    Doorbells and interrupts are counted by the frontend (kicks written, call-fd wake-ups);
    the data is whatever the backend serves (`--image`, if given, names the file it serves,
    for the limit)."""
    from alacrity.vhost_user.frontend import VhostUserGuest

    guest = VhostUserGuest(cfg.guest[len(VHOST_USER):], spec.ID_BLOCK, _ram(cfg))
    marks: dict[str, dict[str, Any]] = {}
    guest.on_mark = lambda name, data: marks.__setitem__(
        name, {"queue": guest.signals(), "exits": 0, "io_wakeups": 0, "t": time.perf_counter()})
    t0 = time.monotonic()
    total = cfg.warmup + cfg.seconds
    try:
        g = run_in_thread(lambda: guest_main(guest, _args(cfg)), total + 60,
                          (lambda: tick(min(1.0, (time.monotonic() - t0) / total)))
                          if tick else None)
    finally:
        guest.close()
    limit = (null_limit(cfg.rw, cfg.bs, cfg.limit_seconds, cfg.null_size) if cfg.image == "null"
             else file_limit(cfg.image, cfg.rw, cfg.bs, cfg.limit_seconds))
    if tick:
        tick(1.0)
    return assemble(cfg, g, marks, limit)


def _run_kvm(cfg: BlkBench, tick: Callable[[float], None] | None) -> dict[str, Any]:
    """The payload's benchmark loop (kvm/payload/bench.c) in a VM on /dev/kvm, on the same
    device and backend as a process guest. Exits are KVM_RUN's userspace exits in the
    window (the two marks excluded); doorbells are the ioeventfd counts the device saw."""
    from alacrity.bench.stats import histogram_summary_us
    from alacrity.kvm import api
    from alacrity.kvm.payload.build import build
    from alacrity.kvm.vm import HIST_BUCKET_NS, GuestFailed, KvmVm, histogram

    why = api.usable()
    if why:
        raise ConfigError(f"--guest kvm: {why}")
    if cfg.bs > 65536 or cfg.depth > 256:
        raise ConfigError("--guest kvm: --bs up to 65536 and --depth up to 256")
    notify = Notify(cfg.notify)
    write = "write" in cfg.rw
    backend = open_backend(cfg.image, read_only=not write, null_size=cfg.null_size)
    machine = Machine(max(64 << 20, _ram(cfg) + (8 << 20)),
                      poll_us=cfg.poll_us if notify is Notify.POLL else 0,
                      idle_spin_us=cfg.host_spin_us)
    try:
        if cfg.abi == "vbus":
            dev = machine.add_vbus_bridge([Vblock(BlockCore(backend))], notify=notify)
            signals = dev.totals
        else:
            dev = machine.add_virtio_mmio(B.VirtioBlk(BlockCore(backend),
                                                      queue_max=cfg.queue_size), notify=notify)
            signals = dev.stats[0].as_dict
        vm = KvmVm(machine)
        marks: dict[str, dict[str, Any]] = {}
        vm.on_mark = lambda name: marks.__setitem__(
            name, {"queue": signals(), "exits": vm.exits, "io_wakeups": 0})
        mode = {Notify.ALWAYS: 0, Notify.MITIGATED: 1, Notify.POLL: 2}[notify]
        args = [cfg.depth, cfg.bs, int(write) | (2 if cfg.rw.startswith("rand") else 0), mode,
                int(cfg.warmup * 1000),
                int(cfg.seconds * 1000), cfg.queue_size, backend.capacity // SECTOR]
        total = cfg.warmup + cfg.seconds
        stop = ticker(tick, total)
        try:
            r = vm.boot(build(), "bench-blk", args, flags=int(cfg.abi == "virtio-packed"),
                        deadline=total + 60)
        except GuestFailed as e:
            raise RuntimeError(str(e)) from None
        finally:
            stop.set()
            hist = histogram(machine.mem)
            vm.close()
        if r.status != 0:
            raise RuntimeError(f"the payload's benchmark failed (status {r.status}): "
                               f"{r.console.strip()}")
        if dev.broken:
            raise RuntimeError(f"device reported a guest error: {dev.last_error}")
        import struct as _s
        from alacrity.kvm.vm import MB_OFF_RESULTS
        ops, cycles, errors, kicks, suppressed = _s.unpack_from("<5Q", r.mailbox, MB_OFF_RESULTS)
        from alacrity.kvm.vm import tsc_khz
        elapsed = cycles / (tsc_khz() * 1000)
        # the two marks are exits of their own: not the workload's
        marks["end"]["exits"] -= 1
        g = {"ops": ops, "elapsed": elapsed, "errors": errors,
             "lat_us": histogram_summary_us(hist, HIST_BUCKET_NS),
             "counters": {"doorbells": kicks, "doorbells_suppressed": suppressed,
                          "mode": r.mode, "cpl": r.cpl}}
    finally:
        machine.close()
        backend.close()
    limit = (null_limit(cfg.rw, cfg.bs, cfg.limit_seconds, cfg.null_size) if cfg.image == "null"
             else file_limit(cfg.image, cfg.rw, cfg.bs, cfg.limit_seconds))
    if tick:
        tick(1.0)
    out = assemble(cfg, g, marks, limit)
    out["kvm_mode"] = r.mode
    return out


def assemble(cfg: BlkBench, g: dict[str, Any], marks: dict[str, dict[str, Any]],
             limit: dict[str, Any]) -> dict[str, Any]:
    ops = g["ops"]
    a, b = marks["start"], marks["end"]
    dq = {k: b["queue"][k] - a["queue"][k] for k in a["queue"]}
    per = (lambda x: round(x / ops, 4)) if ops else (lambda x: 0.0)
    ops_per_s = ops / g["elapsed"] if g["elapsed"] else 0.0
    bytes_per_s = ops_per_s * cfg.bs
    return {
        "benchmark": "blk",
        "abi": cfg.abi, "guest": cfg.guest, "notify": cfg.notify,
        "rw": cfg.rw, "bs": cfg.bs, "depth": cfg.depth, "image": cfg.image,
        "seconds": round(g["elapsed"], 3),
        "ops": ops,
        "ops_per_s": round(ops_per_s, 1),
        "bytes_per_s": round(bytes_per_s, 1),
        "lat_us": g["lat_us"],
        "doorbells_per_op": per(dq["doorbells"]),
        "interrupts_per_op": per(dq["interrupts"]),
        "exits_per_op": per(b["exits"] - a["exits"]),
        "errors": g["errors"],
        "counters": {
            "device": dq,
            "guest": g["counters"],
            "exits": b["exits"] - a["exits"],
            "host_io_wakeups": b["io_wakeups"] - a["io_wakeups"],
        },
        "limit": {"ops_per_s": round(limit["ops_per_s"], 1),
                  "bytes_per_s": round(limit["bytes_per_s"], 1), "what": limit["what"]},
        "ratio_to_limit": round(ops_per_s / limit["ops_per_s"], 4) if limit["ops_per_s"] else 0.0,
        "machine": machine_info(),
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
    }


# ---------------------------------------------------------------------------------------
# guest side
# ---------------------------------------------------------------------------------------
class _Workload:
    """What the benchmark loop needs from a block driver, whatever the ABI: stage a
    request in a slot, post the staged ones, reap [(slot, status)], wait, counters."""

    capacity: int
    stats: Any

    def submit(self, slot: int, sector: int) -> None: ...

    def kick(self) -> None: ...

    def reap(self) -> list[tuple[int, int]]: ...

    def wait(self) -> None: ...

    def extra(self) -> dict[str, int]:
        return {}


class _VirtioWorkload(_Workload):
    def __init__(self, machine: Any, a: dict[str, Any], rtype: int):
        notify = Notify(a["notify"])
        t = self.t = find_device(machine, spec.ID_BLOCK)
        drv = VirtioBlkDriver(t, depth=a["depth"], max_bytes=a["bs"], queue_size=a["queue_size"],
                              event_idx=notify is Notify.MITIGATED,
                              poll_us=a["poll_us"] if notify is Notify.POLL else 0.0,
                              always_kick=notify is Notify.ALWAYS,
                              packed=a["abi"] == "virtio-packed")
        self.capacity = drv.capacity
        self.stats = drv.stats
        self.kick = drv.kick
        self.wait = drv.wait
        q = drv.q
        add = q.add
        get_used = q.get_used
        pack = B.HEADER.pack_into
        hdr_v, status_v = drv.hdr_v, drv.status_v
        bs = a["bs"]
        bufs = [[(drv.hdr[i], 16), (drv.data[i], bs), (drv.status[i], 1)]
                for i in range(a["depth"])]
        n_out = 2 if rtype == B.T_OUT else 1

        def submit(slot: int, sector: int) -> None:
            pack(hdr_v[slot], 0, rtype, 0, sector)
            status_v[slot][0] = 0xFF
            add(bufs[slot], n_out, slot)

        def reap() -> list[tuple[int, int]]:
            return [(slot, status_v[slot][0]) for slot, _ in get_used()]

        self.submit = submit            # type: ignore[method-assign]
        self.reap = reap                # type: ignore[method-assign]

    def extra(self) -> dict[str, int]:
        return {"isr_acks": self.t.acks}


class _VbusWorkload(_Workload):
    def __init__(self, machine: Any, a: dict[str, Any], rtype: int):
        notify = Notify(a["notify"])
        self.bridge = find_bridge(machine)
        drv = VblockDriver(self.bridge, depth=a["depth"], max_bytes=a["bs"],
                           queue_size=a["queue_size"], always=notify is Notify.ALWAYS,
                           poll_us=a["poll_us"] if notify is Notify.POLL else 0.0)
        self.capacity = drv.capacity
        self.stats = drv.stats
        self.kick = drv.kick
        self.wait = drv.wait
        self.reap = drv.reap
        req_v, data = drv.req_v, drv.data
        staged = drv._staged
        req, size = drv.req, V.request_size(1)
        pack = V.REQ.pack_into
        bs = a["bs"]
        for slot in range(a["depth"]):
            V.IOV.pack_into(req_v[slot], V.REQ.size, bs, data[slot])

        def submit(slot: int, sector: int) -> None:
            pack(req_v[slot], 0, rtype, 0xFF, sector, 1)
            staged.append((slot, req[slot], size))

        self.submit = submit            # type: ignore[method-assign]

    def extra(self) -> dict[str, int]:
        return {"bus_interrupts": self.bridge.interrupts}


def guest_main(machine: Any, a: dict[str, Any]) -> dict[str, Any]:
    depth = a["depth"]
    bs = a["bs"]
    rtype = B.T_OUT if "write" in a["rw"] else B.T_IN
    w = (_VbusWorkload if a["abi"] == "vbus" else _VirtioWorkload)(machine, a, rtype)
    sectors = [o // SECTOR for o in block_offsets(a["rw"], bs, w.capacity * SECTOR)]
    n_sectors = len(sectors)
    submit, kick, reap, wait = w.submit, w.kick, w.reap, w.wait
    clock = time.perf_counter_ns
    t_sub = [0] * depth
    lat: list[int] = []
    record = lat.append
    pos = 0
    errors = 0
    ops = 0
    measuring = False
    stopping = False
    inflight = 0
    gstats = w.stats
    now = clock()
    t_start_measure = now + int(a["warmup"] * 1e9)
    t_end = t_start_measure + int(a["seconds"] * 1e9)
    measure_t0 = measure_t1 = 0.0
    g0: dict[str, int] = {}
    exits0 = 0

    for slot in range(depth):
        submit(slot, sectors[pos])
        pos = (pos + 1) % n_sectors
        t_sub[slot] = now
        inflight += 1
    kick()
    while True:
        done = reap()
        if not done:
            if stopping and not inflight:
                break
            wait()
            continue
        now = clock()
        for slot, status in done:
            inflight -= 1
            if status:
                errors += 1
            if measuring:
                record(now - t_sub[slot])
                ops += 1
            if not stopping:
                submit(slot, sectors[pos])
                pos += 1
                if pos == n_sectors:
                    pos = 0
                t_sub[slot] = now
                inflight += 1
        kick()
        if not measuring and not stopping and now >= t_start_measure:
            machine.mark("start")
            measuring = True
            measure_t0 = time.perf_counter()
            g0 = gstats.as_dict()
            exits0 = machine.exits
            t_end = clock() + int(a["seconds"] * 1e9)
        elif measuring and now >= t_end:
            measure_t1 = time.perf_counter()
            machine.mark("end")
            g1 = gstats.as_dict()
            measuring = False
            stopping = True
    counters = {k: g1[k] - g0[k] for k in g1}
    counters["exits"] = machine.exits - exits0
    counters.update(w.extra())
    return {"ops": ops, "elapsed": measure_t1 - measure_t0, "errors": errors,
            "lat_us": latency_summary_us(lat), "counters": counters}
