"""`alacrity bench net`: frames through a guest driver, a ring and the net device core.

- stream: the guest keeps its tx ring full of `--size`-byte frames and counts what comes
  back (loopback) or arrives on the second device (pair); pps is frames delivered per second.
- pingpong: one frame in flight. With loopback the guest sends and waits for it to come back
  (one guest-host round trip per op); with pair the guest sends on device A, takes the frame
  from device B, sends it back on B and takes it from A (two round trips per op).

The limit is measured in the same run: for stream, the same frames through the device core
in one process with no ring; for pingpong, a bare round trip between the same two processes
(eventfd, or shared-memory spinning with --notify poll), times the round trips per op.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from alacrity.bench.common import (VHOST_USER, check_guest, machine_info, run_in_thread,
                                    sum_stats, ticker)
from alacrity.bench.limits import (EventfdEcho, ShmEcho, guest_eventfd_rtt, guest_shm_rtt,
                                   net_stream_limit)
from alacrity.bench.stats import latency_summary_us
from alacrity.devices.net import ETH_HLEN, NetCore, open_backends
from alacrity.errors import ConfigError
from alacrity.guest.drivers.vbus_bridge import find_bridge
from alacrity.guest.drivers.venet import VenetDriver
from alacrity.guest.drivers.virtio_net import HDR_LEN, VirtioNetDriver
from alacrity.guest.process import ProcessGuest
from alacrity.guest.programs import find_device
from alacrity.machine import Machine
from alacrity.virtio import net as N
from alacrity.virtio import spec
from alacrity.vbus import venet as E
from alacrity.virtio.device import Notify

ABIS = ("virtio-split", "virtio-packed", "vbus")
GUESTS = ("process", "kvm", "vhost-user:PATH")
MODES = ("stream", "pingpong")
BACKENDS = ("loopback", "pair")
NOTIFY = tuple(n.value for n in Notify)
ETHERTYPE = 0x88B5          # IEEE 802 local experimental


@dataclass
class NetBench:
    abi: str = "virtio-split"
    guest: str = "process"
    mode: str = "stream"
    size: int = 64
    seconds: float = 5.0
    warmup: float = 1.0
    notify: str = "mitigated"
    backend: str = "loopback"
    queue_size: int = 256
    poll_us: float = 200.0
    host_spin_us: float = 50.0
    limit_seconds: float = 1.0
    reuse: bool = True          # drivers offer unchanged buffers again with pinned chains

    def validate(self) -> None:
        check_guest(self.guest, self.abi)
        if self.guest.startswith(VHOST_USER) and self.backend != "loopback":
            raise ConfigError("--guest vhost-user: one device only; its backend must send "
                              "frames back (--backend loopback)")
        for name, value, allowed in (("abi", self.abi, ABIS),
                                     ("mode", self.mode, MODES), ("notify", self.notify, NOTIFY),
                                     ("backend", self.backend, BACKENDS)):
            if value not in allowed:
                raise ConfigError(f"--{name} {value}: expected one of {', '.join(allowed)}")
        if not ETH_HLEN + 4 <= self.size <= ETH_HLEN + 1500:
            raise ConfigError(f"--size {self.size}: a frame is {ETH_HLEN + 4}..{ETH_HLEN + 1500} bytes")
        if self.seconds <= 0:
            raise ConfigError(f"--seconds {self.seconds}: must be positive")
        if self.queue_size < 2 or self.queue_size > 32768:
            raise ConfigError(f"--queue-size {self.queue_size}: must be 2..32768")
        if self.abi == "virtio-split" and self.queue_size & (self.queue_size - 1):
            raise ConfigError(f"--queue-size {self.queue_size}: split rings need a power of two")
        if self.host_spin_us < 0:
            raise ConfigError(f"--host-spin-us {self.host_spin_us}: must be 0 or more")


def _limit_marks(io: Any, mem: Any, echo: EventfdEcho, shm: list[ShmEcho],
                 name: str, data: dict[str, Any]) -> None:
    """The host side of the guest's limit measurement (`_limit_rtt`)."""
    if name == "limit-eventfd":
        echo.start()
    elif name == "limit-shm":
        s = ShmEcho(io, mem, int(data["addr"]))
        s.start()
        shm.append(s)
    elif name == "limit-end":
        echo.stop()
        for s in shm:
            s.stop()


def _limit(cfg: NetBench, rtt_ns: float, trip: str) -> dict[str, Any]:
    """The limit of the run: for stream, the device core alone; for pingpong, the bare
    round trip (`rtt_ns` p50, described by `trip`), times the round trips per op."""
    if cfg.mode == "stream":
        return net_stream_limit(cfg.size, cfg.limit_seconds)
    trips = 2 if cfg.backend == "pair" else 1
    rtt_ns *= trips
    return {"ops_per_s": 1e9 / rtt_ns if rtt_ns else 0.0,
            "bytes_per_s": (1e9 / rtt_ns if rtt_ns else 0.0) * cfg.size,
            "lat_us": {"p50": round(rtt_ns / 1000, 3)},
            "what": f"{trips} x {trip}"}


def _trip(cfg: NetBench, who: str) -> str:
    return (f"{'shared-memory' if cfg.notify == 'poll' else 'eventfd'} round trip "
            f"between {who}")


def _run_vhost_user(cfg: NetBench, tick: Callable[[float], None] | None) -> dict[str, Any]:
    """Our virtio-net driver, in this process, against somebody's vhost-user backend that
    sends frames back. Signals are counted by the frontend; the pingpong limit is a round
    trip between the driver's thread and an echo process (`bench/echo.py`)."""
    from alacrity.bench.echo import EchoProcess
    from alacrity.vhost_user.frontend import VhostUserGuest

    ping = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    pong = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    guest = VhostUserGuest(cfg.guest[len(VHOST_USER):], spec.ID_NET, 32 << 20)
    guest.extra_fds = [ping, pong]
    marks: dict[str, dict[str, Any]] = {}
    echoes: list[EchoProcess] = []

    def on_mark(name: str, data: dict[str, Any]) -> None:
        if name in ("start", "end"):
            marks[name] = {"stats": guest.signals(), "exits": 0}
        elif name == "limit-eventfd":
            echoes.append(EchoProcess("eventfd", ping, pong, [ping, pong]))
        elif name == "limit-shm":
            r = guest.mem.regions[0]
            fd_offset = int(data["addr"]) - r.gpa + r.fd_offset
            echoes.append(EchoProcess("shm", r.fd, fd_offset, [r.fd]))
        elif name == "limit-end":
            for e in echoes:
                e.stop()

    guest.on_mark = on_mark
    t0 = time.monotonic()
    total = cfg.warmup + cfg.seconds + (cfg.limit_seconds if cfg.mode == "pingpong" else 0.0)
    args = {**asdict(cfg), "devices": 1}
    try:
        g = run_in_thread(lambda: guest_main(guest, args), total + 60,
                          (lambda: tick(min(1.0, (time.monotonic() - t0) / total)))
                          if tick else None)
    finally:
        for e in echoes:
            e.stop()
        guest.close()
        os.close(ping)
        os.close(pong)
    limit = _limit(cfg, g.get("limit_rtt_p50_ns", 0),
                   _trip(cfg, "the frontend and an echo process"))
    if tick:
        tick(1.0)
    return assemble(cfg, g, marks, limit, [])


def _run_kvm(cfg: NetBench, tick: Callable[[float], None] | None) -> dict[str, Any]:
    """The payload's net loop (kvm/payload/bench.c) in a VM on /dev/kvm, on the same device
    core and loopback backend as a process guest; for pingpong, the limit is a round trip
    through one shared cache line with the host's I/O thread, measured by the payload."""
    import struct as _s
    from alacrity.bench.stats import histogram_summary_us
    from alacrity.kvm import api
    from alacrity.kvm.payload.build import build
    from alacrity.kvm.vm import (HIST_BUCKET_NS, MB_OFF_RESULTS, GuestFailed, KvmVm,
                                 histogram, tsc_khz)

    why = api.usable()
    if why:
        raise ConfigError(f"--guest kvm: {why}")
    notify = Notify(cfg.notify)
    machine = Machine(64 << 20, poll_us=cfg.poll_us if notify is Notify.POLL else 0,
                      idle_spin_us=cfg.host_spin_us)
    backends = open_backends(cfg.backend)
    total = cfg.warmup + cfg.seconds + (cfg.limit_seconds if cfg.mode == "pingpong" else 0)
    stop = ticker(tick, total)
    try:
        cores = [NetCore(b) for b in backends]
        if cfg.abi == "vbus":
            devs = [machine.add_vbus_bridge([E.Venet(c) for c in cores], notify=notify)]
            signals = devs[0].totals
        else:
            devs = [machine.add_virtio_mmio(N.VirtioNet(c, queue_max=cfg.queue_size),
                                            notify=notify) for c in cores]
            signals = lambda: sum_stats(d.stats for d in devs)          # noqa: E731
        marks: dict[str, dict[str, Any]] = {}
        mode = {Notify.ALWAYS: 0, Notify.MITIGATED: 1, Notify.POLL: 2}[notify]
        args = [int(cfg.mode == "pingpong"), cfg.size, mode, 0, int(cfg.warmup * 1000),
                int(cfg.seconds * 1000), cfg.queue_size]
        payload = build()
        vm = KvmVm(machine)
        vm.on_mark = lambda name: marks.__setitem__(
            name, {"stats": signals(), "exits": vm.exits})
        try:
            r = vm.boot(payload, "bench-net", args, flags=int(cfg.abi == "virtio-packed"),
                        deadline=cfg.warmup + cfg.seconds + 60)
            hist = histogram(machine.mem)
        except GuestFailed as e:
            raise RuntimeError(str(e)) from None
        finally:
            vm.close()
        if r.status != 0:
            raise RuntimeError(f"the payload's benchmark failed (status {r.status})")
        for d in devs:
            if d.broken:
                raise RuntimeError(f"{d.name} reported a guest error: {d.last_error}")
        ops, cycles, errors, kicks, suppressed = _s.unpack_from("<5Q", r.mailbox, MB_OFF_RESULTS)
        marks["end"]["exits"] -= 1
        g = {"ops": ops, "elapsed": cycles / (tsc_khz() * 1000), "errors": errors,
             "lat_us": histogram_summary_us(hist, HIST_BUCKET_NS),
             "counters": {"doorbells": kicks, "doorbells_suppressed": suppressed,
                          "mode": r.mode, "cpl": r.cpl}}
        limit_rtt_ns = 0.0
        if cfg.mode == "pingpong":
            limit_rtt_ns = _kvm_limit(machine, payload, cfg, notify)
        counters = [c.counters.as_dict() for c in cores]
    finally:
        stop.set()
        machine.close()
        for b in backends:
            b.close()
    limit = _limit(cfg, limit_rtt_ns,
                   "shared-memory round trip between the KVM guest and the host's I/O thread"
                   + ("" if notify is Notify.POLL else ", the guest ringing an ioeventfd"))
    if tick:
        tick(1.0)
    out = assemble(cfg, g, marks, limit, counters)
    out["kvm_mode"] = r.mode
    return out


def _kvm_limit(machine: Machine, payload: bytes, cfg: NetBench, notify: Notify) -> float:
    """p50 ns of the payload's round trip to the host's I/O thread through one cache line:
    the I/O thread polls it (`poll`), or a doorbell (an ioeventfd) wakes it."""
    import os as _os

    from alacrity.bench.stats import histogram_summary_us
    from alacrity.bus import IoEventFd, Space
    from alacrity.kvm.vm import HIST, HIST_BUCKET_NS, HIST_BUCKETS, KvmVm, histogram

    addr = 0x90000                              # below the payload: a page of the VMM's
    machine.mem.write(addr, bytes(8))
    machine.mem.write(HIST, bytes(4 * HIST_BUCKETS))
    echo = ShmEcho(machine.io, machine.mem, addr)
    doorbell = 0
    ev = None
    if notify is not Notify.POLL:
        doorbell = 0xD0F0_0000                  # an address nothing else uses
        fd = _os.eventfd(0, _os.EFD_CLOEXEC | _os.EFD_NONBLOCK)

        def answer(_n: int) -> None:
            echo.poll()
        ev = IoEventFd(Space.MMIO, doorbell, 4, None, fd, answer)
        machine.bus.add_ioeventfd(ev)
        machine.io.call_sync(lambda: machine.io.add_reader(fd, machine._reader(ev)))
    vm = KvmVm(machine)
    if notify is Notify.POLL:
        # the echo polls on the I/O thread (the mark arrives on the vCPU thread)
        vm.on_mark = lambda name: machine.io.call_sync(echo.start) if name == "start" else None
    try:
        lr = vm.boot(payload, "limit-shm", [addr, int(cfg.limit_seconds * 1000), doorbell],
                     deadline=cfg.limit_seconds + 30)
        lhist = histogram(machine.mem)
    finally:
        machine.io.call_sync(echo.stop)
        vm.close()
        if ev is not None:
            machine.io.call_sync(lambda: machine.io.remove_reader(ev.fd))
            machine.bus.remove_ioeventfd(ev)
            _os.close(ev.fd)
    if lr.status != 0:
        raise RuntimeError(f"the payload's limit measurement failed ({lr.status})")
    return histogram_summary_us(lhist, HIST_BUCKET_NS)["p50"] * 1000


def run(cfg: NetBench, tick: Callable[[float], None] | None = None) -> dict[str, Any]:
    cfg.validate()
    if cfg.guest.startswith(VHOST_USER):
        return _run_vhost_user(cfg, tick)
    if cfg.guest == "kvm":
        return _run_kvm(cfg, tick)
    notify = Notify(cfg.notify)
    machine = Machine(32 << 20, poll_us=cfg.poll_us if notify is Notify.POLL else 0,
                      idle_spin_us=cfg.host_spin_us)
    backends = open_backends(cfg.backend)
    echo = EventfdEcho(machine.io)
    shm: list[ShmEcho] = []
    try:
        cores = [NetCore(b) for b in backends]
        if cfg.abi == "vbus":
            venets = [E.Venet(c) for c in cores]
            bridge = machine.add_vbus_bridge(venets, notify=notify)
            signals = bridge.totals
            broken = [(f"venet{i}", v) for i, v in enumerate(venets)] + [("vbus", bridge)]
        else:
            devs = [machine.add_virtio_mmio(N.VirtioNet(c, queue_max=cfg.queue_size),
                                            notify=notify) for c in cores]
            signals = lambda: sum_stats(d.stats for d in devs)       # noqa: E731
            broken = [(d.name, d) for d in devs]
        guest = ProcessGuest(machine)
        marks: dict[str, dict[str, Any]] = {}

        def on_mark(name: str, data: dict[str, Any]) -> None:
            if name in ("start", "end"):
                marks[name] = {"stats": signals(), "exits": guest.exits}
            else:
                _limit_marks(machine.io, machine.mem, echo, shm, name, data)

        guest.on_mark = on_mark
        t0 = time.monotonic()
        limit_s = cfg.limit_seconds if cfg.mode == "pingpong" else 0.0
        total = cfg.warmup + cfg.seconds + limit_s
        args = {k: v for k, v in asdict(cfg).items()}
        args["devices"] = len(cores)
        guest.start("alacrity.bench.net:guest_main", args, extra_fds=[echo.ping, echo.pong])
        try:
            g = guest.wait(timeout=total + 60,
                           tick=(lambda: tick(min(1.0, (time.monotonic() - t0) / total)))
                           if tick else None)
        finally:
            guest.close()
        for name, d in broken:
            if d.broken:
                why = getattr(d, "last_error", "") or getattr(bridge, "last_error", "")
                raise RuntimeError(f"{name} reported a guest error: {why}")
        counters = [c.counters.as_dict() for c in cores]
    finally:
        echo.close()
        machine.close()
        for b in backends:
            b.close()
    limit = _limit(cfg, g.get("limit_rtt_p50_ns", 0),
                   _trip(cfg, "the guest and the host process"))
    if tick:
        tick(1.0)
    return assemble(cfg, g, marks, limit, counters)


def assemble(cfg: NetBench, g: dict[str, Any], marks: dict[str, dict[str, Any]],
             limit: dict[str, Any], counters: list[dict[str, int]]) -> dict[str, Any]:
    ops = g["ops"]
    a, b = marks["start"], marks["end"]
    dq = {k: b["stats"][k] - a["stats"][k] for k in a["stats"]}
    per = (lambda x: round(x / ops, 4)) if ops else (lambda x: 0.0)
    pps = ops / g["elapsed"] if g["elapsed"] else 0.0
    return {
        "benchmark": "net",
        "abi": cfg.abi, "guest": cfg.guest, "notify": cfg.notify, "mode": cfg.mode,
        "backend": cfg.backend, "size": cfg.size,
        "seconds": round(g["elapsed"], 3),
        "ops": ops,
        "pps": round(pps, 1),
        "ops_per_s": round(pps, 1),
        "bytes_per_s": round(pps * cfg.size, 1),
        "lat_us": g["lat_us"],
        "doorbells_per_op": per(dq["doorbells"]),
        "interrupts_per_op": per(dq["interrupts"]),
        "exits_per_op": per(b["exits"] - a["exits"]),
        "errors": g["errors"],
        "lost": g.get("lost", 0),
        "counters": {"device": dq, "guest": g["counters"], "cores": counters,
                     "exits": b["exits"] - a["exits"]},
        "limit": {"ops_per_s": round(limit["ops_per_s"], 1),
                  "bytes_per_s": round(limit["bytes_per_s"], 1), "what": limit["what"],
                  **({"lat_us": limit["lat_us"]} if "lat_us" in limit else {})},
        "ratio_to_limit": round(pps / limit["ops_per_s"], 4) if limit["ops_per_s"] else 0.0,
        "machine": machine_info(),
        "config": asdict(cfg),
    }


# ---------------------------------------------------------------------------------------
# guest side
# ---------------------------------------------------------------------------------------
def _frame(mac: bytes, size: int) -> bytes:
    head = mac + mac + struct.pack(">H", ETHERTYPE)
    return head + bytes((i * 7) & 0xFF for i in range(size - ETH_HLEN))


def guest_main(machine: Any, a: dict[str, Any]) -> dict[str, Any]:
    notify = Notify(a["notify"])
    poll_us = a["poll_us"] if notify is Notify.POLL else 0.0
    drivers: list[Any] = []
    if a["abi"] == "vbus":
        bridge = find_bridge(machine)
        for i in range(a["devices"]):
            drivers.append(VenetDriver(bridge, bridge.find(E.TYPE, i), queue_size=a["queue_size"],
                                       always=notify is Notify.ALWAYS, poll_us=poll_us))
    else:
        for i in range(a["devices"]):
            t = find_device(machine, spec.ID_NET, i)
            drivers.append(VirtioNetDriver(
                t, queue_size=a["queue_size"], event_idx=notify is Notify.MITIGATED,
                packed=a["abi"] == "virtio-packed", poll_us=poll_us,
                always_kick=notify is Notify.ALWAYS, reuse=a["reuse"]))
    if a["mode"] == "stream":
        result = _stream(machine, drivers, a)
    else:
        result = _pingpong(machine, drivers, a)
        result.update(_limit_rtt(machine, a, notify))
    return result


class _Window:
    """Warm-up, then the measured window between the host's two marks."""

    def __init__(self, machine: Any, warmup: float, seconds: float, stats: list[Any]):
        self.machine = machine
        self.stats = stats
        self.clock = time.perf_counter_ns
        self.t_start = self.clock() + int(warmup * 1e9)
        self.seconds = seconds
        self.t_end = 0
        self.measuring = False
        self.done = False
        self.t0 = self.t1 = 0.0
        self.exits0 = 0
        self.g0: dict[str, int] = {}
        self.counters: dict[str, int] = {}

    def check(self, now: int) -> None:
        if not self.measuring and not self.done and now >= self.t_start:
            self.machine.mark("start")
            self.measuring = True
            self.t0 = time.perf_counter()
            self.exits0 = self.machine.exits
            self.g0 = sum_stats(self.stats)
            self.t_end = self.clock() + int(self.seconds * 1e9)
        elif self.measuring and now >= self.t_end:
            self.t1 = time.perf_counter()
            self.machine.mark("end")
            g1 = sum_stats(self.stats)
            self.counters = {k: g1[k] - self.g0[k] for k in g1}
            self.counters["exits"] = self.machine.exits - self.exits0
            self.measuring = False
            self.done = True


class _StreamOps:
    """The ring operations the stream loop needs, whatever the ABI: re-offer a tx slot
    (its frame never changes), reap sent slots, take received buffers [(i, length)] and
    hand them back, kick, wait. `hdr` is what precedes the frame in a buffer. Every slot
    is offered once here (kick_tx posts them)."""

    def __init__(self, tx_drv: Any, rx_drv: Any, frame: bytes, reuse: bool):
        self.rx_view = rx_drv.rx_view
        self.tx_again_many: Callable[[list[int]], None] | None = None   # batch form, if any
        self.kick_tx, self.kick_rx, self.wait = tx_drv.kick_tx, rx_drv.kick_rx, rx_drv.wait
        size = len(frame)
        if isinstance(tx_drv, VenetDriver):
            self.hdr = 0
            for v in tx_drv.tx_view:
                v[:size] = frame
            self.slots = len(tx_drv.tx_view)
            stage = tx_drv.stage
            self.tx_again = lambda slot: stage(slot, size)
            for slot in range(self.slots):       # every slot offered once up front
                stage(slot, size)
            self.tx_done = tx_drv.tx_done
            self.rx_take = rx_drv.rx_take
            release = rx_drv.rx_release
            self.rx_release = lambda got: release(len(got))
            return
        self.hdr = HDR_LEN
        txq, rxq = tx_drv.txq, rx_drv.rxq
        for v in tx_drv.tx_view:                 # every tx slot holds the same frame
            v[HDR_LEN:HDR_LEN + size] = frame
        bufs = [[(addr, HDR_LEN + size)] for addr in tx_drv.tx_addr]
        self.slots = len(bufs)
        # pinned chains, offered again unchanged (unless the run asks drivers not to reuse
        # descriptors)
        handles = [txq.add(bufs[i], 1, i, pin=reuse) for i in range(len(bufs))]
        txq_get, readd, add = txq.get_used, txq.readd, txq.add
        self.tx_again = ((lambda slot: readd(handles[slot], slot)) if reuse
                         else (lambda slot: add(bufs[slot], 1, slot)))
        if reuse:
            readd_many = txq.readd_many
            self.tx_again_many = lambda slots: readd_many([handles[i] for i in slots], slots)
        self.tx_done = lambda: [slot for slot, _ in txq_get()]
        self.rx_take = rxq.get_used
        repost_many = rx_drv.repost_rx_many

        def rx_release(got: list[tuple[int, int]]) -> None:
            repost_many([i for i, _ in got])

        self.rx_release = rx_release


STALL_S = 2.0     # a stream that receives nothing for this long has lost what is in flight


def _stream(machine: Any, drivers: list[Any], a: dict[str, Any]) -> dict[str, Any]:
    tx_drv = drivers[0]
    rx_drv = drivers[-1]
    size = a["size"]
    frame = _frame(tx_drv.mac, size)
    ops_ = _StreamOps(tx_drv, rx_drv, frame, a["reuse"])
    hdr = ops_.hdr
    rx_view = ops_.rx_view
    free: list[int] = []
    sent = ops_.slots
    tx_again, tx_done, rx_take, rx_release = ops_.tx_again, ops_.tx_done, ops_.rx_take, ops_.rx_release
    tx_again_many = ops_.tx_again_many
    kick_tx, kick_rx, wait = ops_.kick_tx, ops_.kick_rx, ops_.wait
    want_len = hdr + size
    stats = [s for d in drivers for s in (d.rx_stats, d.tx_stats)]
    win = _Window(machine, a["warmup"], a["seconds"], stats)
    clock = time.perf_counter_ns
    received = errors = ops = 0
    lost = 0                                     # written off after a stall (lossy peers)
    sample = 16                                  # latency of every 16th frame
    t_sent: dict[int, int] = {i: clock() for i in range(0, sent, sample)}
    lat: list[int] = []
    kick_tx()
    while True:
        free.extend(tx_done())
        if free and not win.done:
            now = clock()
            if tx_again_many is not None:
                tx_again_many(free)
            for slot in free:
                if tx_again_many is None:
                    tx_again(slot)
                if not sent % sample:
                    t_sent[sent] = now
                sent += 1
            free.clear()
            kick_tx()
        got = rx_take()
        if got:
            now = clock()
            for i, n in got:
                if n != want_len:
                    errors += 1
                elif not received & 1023 and rx_view[i][hdr:want_len] != frame:
                    errors += 1
                if not received % sample:
                    t = t_sent.pop(received, None)
                    if t is not None and win.measuring:
                        lat.append(now - t)
                received += 1
            rx_release(got)
            if win.measuring:
                ops += len(got)
            kick_rx()
            win.check(now)
        elif win.done and received + lost >= sent:
            break
        else:
            # coalesce: wake when half of what is in flight has come back (or, with a full
            # tx ring, three quarters of it has been sent)
            inflight = max(0, sent - received - lost)
            try:
                wait(tx=not free, rx_delay=max(0, min(64, inflight // 2) - 1),
                     tx_delay=max(0, ops_.slots * 3 // 4 - 1), timeout=STALL_S)
            except TimeoutError:
                # nothing for STALL_S: what is still out was dropped on the way (a peer
                # that drops what it has no rx buffers for: a served loopback, a tap);
                # write it off, stop waiting for it, and report it
                lost = sent - received
            if win.done:
                win.check(clock())
    return {"ops": ops, "elapsed": win.t1 - win.t0, "errors": errors, "lost": lost,
            "lat_us": latency_summary_us(lat), "counters": win.counters}


def _pingpong(machine: Any, drivers: list[Any], a: dict[str, Any]) -> dict[str, Any]:
    a_drv = drivers[0]
    b_drv = drivers[-1]
    frame = _frame(a_drv.mac, a["size"])
    stats = [s for d in drivers for s in (d.rx_stats, d.tx_stats)]
    win = _Window(machine, a["warmup"], a["seconds"], stats)
    clock = time.perf_counter_ns
    lat: list[int] = []
    errors = ops = 0

    def exchange(src: Any, dst: Any, data: bytes) -> bytes:
        src.send(data)
        src.kick_tx()
        while True:
            got = dst.recv()
            if got:
                dst.kick_rx()
                return got[0]
            dst.wait()

    while not win.done:
        t = clock()
        back = exchange(a_drv, b_drv, frame)
        if b_drv is not a_drv:
            back = exchange(b_drv, a_drv, back)
        now = clock()
        if back != frame:
            errors += 1
        if win.measuring:
            lat.append(now - t)
            ops += 1
        win.check(now)
    return {"ops": ops, "elapsed": win.t1 - win.t0, "errors": errors,
            "lat_us": latency_summary_us(lat), "counters": win.counters}


def _limit_rtt(machine: Any, a: dict[str, Any], notify: Notify) -> dict[str, Any]:
    """The bare round trip between this process and the host, measured now."""
    seconds = a["limit_seconds"]
    if notify is Notify.POLL:
        addr = machine.alloc.alloc(64, 64)
        machine.mem.view(addr, 8)[:] = bytes(8)
        machine.mark("limit-shm", addr=addr)
        rtts = guest_shm_rtt(machine.mem, addr, seconds)
    else:
        ping, pong = machine.extra_fds[:2]
        machine.mark("limit-eventfd")
        rtts = guest_eventfd_rtt(ping, pong, seconds)
    machine.mark("limit-end")
    rtts.sort()
    return {"limit_rtt_p50_ns": rtts[len(rtts) // 2] if rtts else 0}

