"""The `alacrity` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, NoReturn, Sequence

from alacrity.errors import ConfigError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one clear line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def size(text: str) -> int:
    """'4096', '4k', '64K', '1M', '1G' -> bytes."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    try:
        value = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4096, 4k, 1M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def add_limit_options(p: argparse.ArgumentParser) -> None:
    from alacrity.limits import DEFAULT
    g = p.add_argument_group("guest limits (exceeding one is a guest error: the device "
                             "needs a reset, or the vhost-user connection closes)")
    g.add_argument("--max-queue-size", type=int, default=DEFAULT.max_queue_size, metavar="N",
                   help=f"largest ring a guest may set up (default {DEFAULT.max_queue_size})")
    g.add_argument("--max-segments", type=int, default=DEFAULT.max_segments, metavar="N",
                   help=f"most buffers in one request (default {DEFAULT.max_segments})")
    g.add_argument("--max-request-bytes", type=size, default=DEFAULT.max_request_bytes,
                   metavar="BYTES",
                   help=f"largest request, all its buffers together (default "
                        f"{DEFAULT.max_request_bytes >> 20}M)")


def limits_from(args: Any) -> Any:
    from alacrity.limits import Limits
    try:
        return Limits(args.max_queue_size, args.max_segments, args.max_request_bytes)
    except ValueError as e:
        raise ConfigError(f"--max-*: {e}") from None


def build_parser() -> Parser:
    from alacrity.bench import blk

    p = Parser(prog="alacrity", description="Paravirtual I/O (virtio and vbus), side by side, measured.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the devices do")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    bench = sub.add_parser("bench", help="run one benchmark")
    bsub = bench.add_subparsers(dest="what", required=True, parser_class=Parser)

    b = bsub.add_parser("blk", help="block I/O through a guest, a ring and a device",
                        description="Block I/O from a guest through a ring to a block device. "
                                    "Write workloads overwrite the image.")
    b.add_argument("--abi", default="virtio-split", choices=blk.ABIS)
    b.add_argument("--guest", default="process", metavar="process|vhost-user:PATH",
                   help="process (default): a guest process on our device; vhost-user:PATH: "
                        "our driver against the vhost-user backend listening on PATH")
    b.add_argument("--rw", default="read", choices=blk.RWS)
    b.add_argument("--bs", type=size, default=4096, help="request size in bytes (default 4096)")
    b.add_argument("--depth", type=int, default=1, help="requests in flight (default 1)")
    b.add_argument("--seconds", type=positive_float, default=5.0, help="measured time (default 5)")
    b.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds, not measured (default 1)")
    b.add_argument("--image", default="null", help="image file, or null (default)")
    b.add_argument("--notify", default="mitigated", choices=blk.NOTIFY,
                   help="always: no suppression; mitigated: EVENT_IDX; poll: both sides poll")
    b.add_argument("--queue-size", type=int, default=256)
    b.add_argument("--poll-us", type=positive_float, default=200.0,
                   help="busy-poll budget before sleeping, with --notify poll (default 200)")
    b.add_argument("--host-spin-us", type=float, default=50.0,
                   help="the host I/O thread looks at its fds this long before sleeping "
                        "(default 50; 0: sleep at once)")
    b.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    from alacrity.bench import net
    n = bsub.add_parser("net", help="frames through a guest, a ring and a network device",
                        description="Ethernet frames from a guest through rings to the net "
                                    "device core and back.")
    n.add_argument("--abi", default="virtio-split", choices=net.ABIS)
    n.add_argument("--guest", default="process", metavar="process|vhost-user:PATH",
                   help="process (default), or vhost-user:PATH: our driver against the "
                        "backend on PATH, which must send every frame back (loopback)")
    n.add_argument("--mode", default="stream", choices=net.MODES,
                   help="stream: keep the tx ring full; pingpong: one frame in flight")
    n.add_argument("--size", type=size, default=64, help="frame size in bytes (default 64)")
    n.add_argument("--seconds", type=positive_float, default=5.0, help="measured time (default 5)")
    n.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds (default 1)")
    n.add_argument("--notify", default="mitigated", choices=net.NOTIFY)
    n.add_argument("--backend", default="loopback", choices=net.BACKENDS,
                   help="loopback: frames come back to the sender; pair: two devices on a wire")
    n.add_argument("--queue-size", type=int, default=256)
    n.add_argument("--poll-us", type=positive_float, default=200.0)
    n.add_argument("--host-spin-us", type=float, default=50.0)
    n.add_argument("--no-reuse", action="store_true",
                   help="drivers write every descriptor anew instead of offering unchanged "
                        "buffers again (pinned chains)")
    n.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    from alacrity.bench import shootout as so
    s = sub.add_parser("shootout", help="the matrix ABI x notify mode x workload, side by side",
                       description="Run every workload on every ABI and notify mode, "
                                   "interleaved and repeated, next to the physical limits "
                                   "measured in the same run. Writes DIR/results.json and "
                                   "DIR/shootout.png.")
    s.add_argument("--quick", action="store_true",
                   help="short runs, one round (about 2 minutes); the default takes about 10")
    s.add_argument("--guest", type=csv, default="process",
                   help=f"comma-separated, of: {', '.join(so.GUESTS)} (default process)")
    s.add_argument("--abi", type=csv, default=",".join(so.ABIS),
                   help=f"comma-separated, of: {', '.join(so.ABIS)} (default all)")
    s.add_argument("--notify", type=csv, default=",".join(so.NOTIFY),
                   help=f"comma-separated, of: {', '.join(so.NOTIFY)} (default all)")
    s.add_argument("--workloads", type=csv, default=",".join(w.name for w in so.WORKLOADS),
                   help="comma-separated, of: " + ", ".join(w.name for w in so.WORKLOADS)
                        + " (default all)")
    s.add_argument("--repeat", type=int, help="interleaved rounds (default 3; 1 with --quick)")
    s.add_argument("--seconds", type=positive_float,
                   help="measured seconds per run (default 1.5; 0.4 with --quick)")
    s.add_argument("--out", default="shootout-out", help="output directory (default shootout-out)")
    s.add_argument("--json", action="store_true", help="print the results object on stdout")
    s.add_argument("--low-latency", action="store_true",
                   help="hold /dev/cpu_dma_latency at 0 during the run, where writable")

    sv = sub.add_parser("serve", help="serve a device to another process")
    svsub = sv.add_subparsers(dest="what", required=True, parser_class=Parser)
    vu = svsub.add_parser("vhost-user", help="a virtio device over a vhost-user socket",
                          description="Serve a virtio device model to a vhost-user frontend "
                                      "(QEMU, DPDK virtio-user, alacrity's own) until SIGINT "
                                      "or SIGTERM. The socket is created with mode 0600.")
    vu.add_argument("--socket", required=True, help="path of the unix socket to create")
    vu.add_argument("--device", required=True, choices=("blk", "net"))
    vu.add_argument("--image", default="null", help="blk: image file, or null (default)")
    vu.add_argument("--read-only", action="store_true", help="blk: serve the image read-only")
    vu.add_argument("--backend", default="loopback",
                    help="net: loopback (default; frames the frontend has no rx buffers "
                         "for are dropped and counted) or tap:NAME")
    vu.add_argument("--notify", default="mitigated", choices=blk.NOTIFY)
    vu.add_argument("--no-packed", action="store_true", help="do not offer packed rings")
    add_limit_options(vu)

    r = sub.add_parser("run", help="boot a guest with devices and run its self-test",
                       description="Boot a guest with the given devices. Each driver "
                                   "initialises its device and moves data (block data is read "
                                   "and written back unchanged). With --ip and a net device the "
                                   "guest is an IPv4 host answering ARP and ping for --seconds.")
    r.add_argument("--guest", default="process", choices=("process", "kvm"),
                   help="process (default): a Python guest process; kvm: a VM on /dev/kvm "
                        "running the C payload (blk and net:loopback devices, for now)")
    r.add_argument("--abi", default="virtio-split", choices=("virtio-split", "virtio-packed"))
    r.add_argument("--device", action="append", required=True, metavar="SPEC",
                   help="blk:PATH|blk:null, net:loopback|net:pair|net:tap:NAME, "
                        "console:pty|console:file:PATH|console:socket:PATH, rng (repeatable)")
    r.add_argument("--ip", help="IPv4 address for the guest on its first net device")
    r.add_argument("--seconds", type=positive_float, default=10.0,
                   help="how long the guest answers on the network, with --ip (default 10)")
    r.add_argument("--read-only", action="store_true", help="open block images read-only")
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_limit_options(r)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING
    if args.verbose:
        level = logging.DEBUG if os.environ.get("ALACRITY_DEBUG") else logging.INFO
    logging.basicConfig(level=level,
                        format="alacrity: %(name)s: %(message)s")
    try:
        if args.command == "bench" and args.what == "blk":
            return bench_blk(args)
        if args.command == "bench" and args.what == "net":
            return bench_net(args)
        if args.command == "run":
            return run_guest(args)
        if args.command == "shootout":
            return shootout(args)
        if args.command == "serve" and args.what == "vhost-user":
            return serve_vhost_user(args)
    except ConfigError as e:
        sys.stderr.write(f"alacrity: error: {e}\n")
        return EXIT_USAGE
    parser.error(f"unknown command {args.command}")


def _run_bench(module: Any, cfg: Any, desc: str, as_json: bool) -> int:
    from alacrity.bench.report import bench_table, progress
    from alacrity.errors import DeviceError
    from alacrity.guest.process import GuestDied

    cfg.validate()
    try:
        with progress(desc, enabled=sys.stderr.isatty() or not as_json) as tick:
            result = module.run(cfg, tick)
    except (GuestDied, RuntimeError, DeviceError, OSError) as e:
        sys.stderr.write(f"alacrity: bench failed: {e}\n")
        return 1
    if as_json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        from rich.console import Console
        Console().print(bench_table(result))
    return 0


def run_guest(args: Any) -> int:
    import ipaddress

    from alacrity.guest.process import GuestDied, ProcessGuest
    from alacrity.launch import build
    from alacrity.machine import Machine

    if args.ip:
        try:
            ipaddress.IPv4Address(args.ip)
        except ValueError:
            raise ConfigError(f"--ip {args.ip}: not an IPv4 address") from None
    if args.guest == "kvm":
        return run_kvm(args)
    machine = Machine(64 << 20, limits=limits_from(args))
    try:
        info = build(machine, args.device, read_only=args.read_only)
        for c in info["consoles"]:
            if c["path"]:
                sys.stderr.write(f"alacrity: console ({c['kind']}) at {c['path']}\n")
        guest = ProcessGuest(machine).start("alacrity.guest.programs:selftest", {
            "abi": args.abi, "net": info["net"], "ip": args.ip, "seconds": args.seconds})
        try:
            result = guest.wait(timeout=args.seconds + 60)
        except GuestDied as e:
            sys.stderr.write(f"alacrity: guest failed: {e}\n")
            return 1
        finally:
            guest.close()
    finally:
        machine.close()
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        from rich.console import Console
        from rich.table import Table
        t = Table(title=f"alacrity run: {args.guest} guest, {args.abi}")
        for col in ("device", "kind", "ok", "details"):
            t.add_column(col)
        for d in result["devices"]:
            details = ", ".join(f"{k}={v}" for k, v in d.items()
                                if k not in ("device", "kind", "ok", "id"))
            t.add_row(d["device"], d.get("kind", "?"), str(d.get("ok", "")), details)
        Console().print(t)
    return 0 if all(d.get("ok") for d in result["devices"]) else 1


def run_kvm(args: Any) -> int:
    from alacrity.kvm import api
    from alacrity.kvm.payload.build import BuildError
    from alacrity.kvm.vm import GuestFailed, run_selftest
    from alacrity.launch import build
    from alacrity.machine import Machine

    if any(not (d.startswith("blk:") or d in ("net:loopback", "net")) for d in args.device):
        raise ConfigError("--guest kvm: only blk:PATH|null and net:loopback devices have "
                          "payload drivers, for now")
    why = api.usable()
    if why:
        raise ConfigError(f"--guest kvm: {why}")
    machine = Machine(64 << 20, limits=limits_from(args))
    try:
        build(machine, args.device, read_only=args.read_only)
        try:
            r, devices = run_selftest(machine, deadline=args.seconds + 60,
                                      packed=args.abi == "virtio-packed")
        except (GuestFailed, BuildError) as e:
            sys.stderr.write(f"alacrity: guest failed: {e}\n")
            return 1
    finally:
        machine.close()
    sys.stderr.write(r.console)
    result = {"guest": "kvm", "mode": r.mode, "cpl": r.cpl, "status": r.status,
              "exits": r.exits, "devices": devices}
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        from rich.console import Console
        from rich.table import Table
        t = Table(title=f"alacrity run: kvm guest ({r.mode}), {args.abi}")
        for col in ("device", "kind", "ok", "details"):
            t.add_column(col)
        for d in devices:
            t.add_row(d["device"], d["kind"], str(d["ok"]),
                      f"ops={d['ops']}, errors={d['errors']}")
        Console().print(t)
    return 0 if r.status == 0 and all(d["ok"] for d in devices) else 1


def shootout(args: Any) -> int:
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from alacrity.bench import shootout as so
    from alacrity.bench.plot import plot
    from alacrity.bench.report import shootout_table

    kw = dict(abis=args.abi, notify=args.notify, guests=args.guest, workloads=args.workloads,
              repeat=args.repeat, seconds=args.seconds, out=args.out,
              low_latency=args.low_latency)
    cfg = (so.Shootout.quick_config(**kw) if args.quick
           else so.Shootout(**{k: v for k, v in kw.items() if v is not None}))
    cfg.validate()
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description:<40}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console,
                  transient=True) as p:
        task = p.add_task("shootout", total=1.0)
        results = so.run(cfg, lambda d, f: p.update(task, description=d, completed=f))
    png = plot(results, os.path.join(cfg.out, "shootout.png"))
    if args.json:
        json.dump(results, sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
    else:
        Console().print(shootout_table(results))
        Console().print(f"results: {os.path.join(cfg.out, 'results.json')}, plot: {png}")
    if results["interrupted"]:
        sys.stderr.write("alacrity: shootout interrupted; partial results written\n")
        return 130
    failed = [c for c in results["cells"] if c["status"] == "failed"]
    return 1 if failed else 0


def serve_vhost_user(args: Any) -> int:
    import signal
    import threading

    from alacrity.devices.block import BlockCore, open_backend
    from alacrity.devices.net import LoopbackBackend, NetCore, open_backends
    from alacrity.iothread import IoThread
    from alacrity.vhost_user.backend import VhostUserDevice, VhostUserServer
    from alacrity.virtio.blk import VirtioBlk
    from alacrity.virtio.device import Notify
    from alacrity.virtio.net import VirtioNet

    notify = Notify(args.notify)
    io = IoThread(200.0 if notify is Notify.POLL else 0.0).start()
    resources: list[Any] = []
    try:
        if args.device == "blk":
            if args.image != "null" and not os.path.exists(args.image):
                raise ConfigError(f"--image {args.image}: no such file")
            bbe = open_backend(args.image, read_only=args.read_only)
            resources.append(bbe)
            model: Any = VirtioBlk(BlockCore(bbe))
        else:
            if args.backend == "pair" or not (args.backend == "loopback"
                                              or args.backend.startswith("tap:")):
                raise ConfigError(f"--backend {args.backend}: expected loopback or tap:NAME")
            # served to peers we do not control: a loopback drops what the frontend has no
            # rx buffers for (as a NIC does) instead of stalling its transmit
            nbe = LoopbackBackend(lossy=True) if args.backend == "loopback" \
                else open_backends(args.backend)[0]
            nbe.start(io)
            resources.append(nbe)
            # peers such as DPDK keep a whole ring of frames posted: take half a ring per
            # pass (testpmd txonly: 0.45-0.57 -> 0.59-0.74 Mpps). Our own process guests
            # keep 32 (their 128 tx slots drain in smaller bites better).
            model = VirtioNet(NetCore(nbe), tx_budget=128)
        device = VhostUserDevice(model, io, notify=notify, offer_packed=not args.no_packed,
                                 limits=limits_from(args))
        try:
            server = VhostUserServer(args.socket, device, io)
        except OSError as e:
            raise ConfigError(f"--socket {args.socket}: {e.strerror or e}") from None
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        sys.stderr.write(f"alacrity: serving {args.device} ({model.name}) on {args.socket}; "
                         f"SIGINT or SIGTERM stops\n")
        sys.stderr.flush()
        while not stop.wait(0.5):
            pass
        server.close()
        counters = {"device": args.device, "socket": args.socket, **server.info(),
                    "queues": device.queue_stats()}
        if args.device == "net":
            counters["net"] = model.core.counters.as_dict()
        else:
            counters["blk"] = {"flushes": model.core.flushes, "errors": model.core.errors}
        sys.stderr.write(f"alacrity: stopped: {json.dumps(counters)}\n")
        return 0
    finally:
        io.close()
        for r in resources:
            r.close()


def bench_net(args: Any) -> int:
    from alacrity.bench import net

    cfg = net.NetBench(abi=args.abi, guest=args.guest, mode=args.mode, size=args.size,
                       seconds=args.seconds, warmup=max(0.0, args.warmup), notify=args.notify,
                       backend=args.backend, queue_size=args.queue_size, poll_us=args.poll_us,
                       host_spin_us=args.host_spin_us, reuse=not args.no_reuse)
    desc = f"net {cfg.mode} {cfg.size} B {cfg.backend} {cfg.abi} {cfg.notify}"
    return _run_bench(net, cfg, desc, args.json)


def bench_blk(args: Any) -> int:
    from alacrity.bench import blk

    cfg = blk.BlkBench(abi=args.abi, guest=args.guest, rw=args.rw, bs=args.bs, depth=args.depth,
                       seconds=args.seconds, warmup=max(0.0, args.warmup), image=args.image,
                       notify=args.notify, queue_size=args.queue_size, poll_us=args.poll_us,
                       host_spin_us=args.host_spin_us)
    desc = f"blk {cfg.rw} {cfg.bs} B depth {cfg.depth} {cfg.abi} {cfg.notify}"
    return _run_bench(blk, cfg, desc, args.json)


if __name__ == "__main__":
    sys.exit(main())
