"""Guest programs: what a process guest runs besides benchmarks (self-tests and data
checks used by `alacrity run` and the test suite).

The data checks split the disk region into one lane per request slot, so requests in
flight never overlap, and draw offsets, sizes and bytes from a per-lane random stream
that the host can replay to know exactly what the disk must hold.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Iterator

from alacrity.guest.drivers.virtio_blk import VirtioBlkDriver
from alacrity.guest.drivers.virtio_mmio import MmioTransport
from alacrity.virtio import blk as B
from alacrity.virtio import spec


def find_device(machine: Any, device_id: int, index: int = 0) -> MmioTransport:
    """The index-th virtio device of a type, probed like a guest kernel would (virtio-mmio
    windows, or vhost-user connections whose type the user named)."""
    n = 0
    for d in machine.devices:
        if d["kind"] == "vhost-user":
            if d["device_id"] != device_id:
                continue
            from alacrity.vhost_user.frontend import VhostUserTransport
            if n == index:
                return VhostUserTransport(machine, d)   # type: ignore[return-value]
            n += 1
            continue
        if d["kind"] != "virtio-mmio":
            continue
        t = MmioTransport(machine, d)
        if t.device_id == device_id:
            if n == index:
                return t
            n += 1
    raise LookupError(f"no virtio device with id {device_id}")


def lane_requests(seed: int, lane: int, count: int, lane_start: int, lane_sectors: int,
                  max_sectors: int) -> Iterator[tuple[int, int, random.Random]]:
    """(sector, sectors, rng) for each request of one lane; the caller draws its data
    bytes from rng right away, so host and guest see the same sequence."""
    rng = random.Random(seed * 1_000_003 + lane)
    for _ in range(count):
        n = rng.randint(1, min(max_sectors, lane_sectors))
        s = lane_start + rng.randrange(0, lane_sectors - n + 1)
        yield s, n, rng


def _open_blk(machine: Any, args: dict[str, Any]) -> Any:
    """A block driver: virtio-blk, or vblock when args["abi"] is "vbus"."""
    if args.get("abi") == "vbus":
        from alacrity.guest.drivers.vbus_bridge import find_bridge
        from alacrity.guest.drivers.vblock import VblockDriver
        return VblockDriver(find_bridge(machine), depth=args.get("depth", 1),
                            max_bytes=args.get("max_sectors", 8) * 512,
                            queue_size=args.get("queue_size", 256))
    t = find_device(machine, spec.ID_BLOCK)
    return VirtioBlkDriver(t, depth=args.get("depth", 1),
                           max_bytes=args.get("max_sectors", 8) * 512,
                           queue_size=args.get("queue_size", 256),
                           event_idx=args.get("event_idx", True),
                           indirect=args.get("indirect", False))


def _run_lanes(drv: Any, args: dict[str, Any], write: bool) -> list[str]:
    depth = drv.depth
    lane_sectors = args["region_sectors"] // depth
    per_lane = args["count"] // depth
    lanes = [lane_requests(args["seed"], i, per_lane, i * lane_sectors, lane_sectors,
                           args["max_sectors"]) for i in range(depth)]
    digests = [hashlib.sha256() for _ in range(depth)]
    pending: dict[int, tuple[int, int]] = {}

    def issue(slot: int) -> bool:
        try:
            sector, n, rng = next(lanes[slot])
        except StopIteration:
            return False
        nbytes = n * 512
        if write:
            drv.data_v[slot][:nbytes] = rng.randbytes(nbytes)
            drv.submit(slot, B.T_OUT, sector, nbytes)
        else:
            drv.submit(slot, B.T_IN, sector, nbytes)
        pending[slot] = (sector, nbytes)
        return True

    for slot in range(depth):
        issue(slot)
    drv.kick()
    while pending:
        drv.wait()
        for slot, status, *written in drv.reap():    # virtio also says what it wrote
            sector, nbytes = pending.pop(slot)
            if status != B.S_OK:
                raise IOError(f"request at sector {sector} failed with status {status}")
            if not write:
                if written and written[0] != nbytes + 1:
                    raise IOError(f"read at {sector}: device wrote {written}, wanted {nbytes + 1}")
                digests[slot].update(sector.to_bytes(8, "little"))
                digests[slot].update(drv.data_v[slot][:nbytes])
            issue(slot)
        drv.kick()
        drv.ack()
    if write and args.get("flush", True):
        drv.flush()
    return [d.hexdigest() for d in digests]


def blk_write_lanes(machine: Any, args: dict[str, Any]) -> dict[str, Any]:
    drv = _open_blk(machine, args)
    _run_lanes(drv, args, write=True)
    return {"requests": (args["count"] // drv.depth) * drv.depth, "exits": machine.exits,
            "last_used": getattr(drv.q, "last_used", None)}


def blk_read_lanes(machine: Any, args: dict[str, Any]) -> dict[str, Any]:
    drv = _open_blk(machine, args)
    digests = _run_lanes(drv, args, write=False)
    return {"digests": digests, "last_used": getattr(drv.q, "last_used", None)}


def blk_selftest(machine: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Initialise virtio-blk, write, flush, read back, get the id."""
    drv = _open_blk(machine, {"depth": 1, "max_sectors": 8})
    out: dict[str, Any] = {"capacity": drv.capacity, "read_only": drv.read_only,
                           "features": drv.t.features, "id": drv.get_id().decode()}
    if not drv.read_only:
        pattern = bytes(range(256)) * 16
        drv.write(0, pattern)
        drv.flush()
        out["readback_ok"] = drv.read(0, len(pattern)) == pattern
    else:
        out["readback_ok"] = len(drv.read(0, 512)) == 512
    return out


def net_peer(machine: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Be an IPv4 host on the first virtio-net device: answer ARP and ping for args["ip"];
    if args["send"] is given, send it as UDP to args["peer"]:args["peer_port"] every half
    second once the peer is reachable; stop at a UDP datagram saying "stop" or after
    args["seconds"]."""
    import time

    from alacrity.guest.drivers.virtio_net import VirtioNetDriver
    from alacrity.guest.netstack import TinyHost

    if args.get("abi") == "vbus":
        from alacrity.guest.drivers.vbus_bridge import find_bridge
        from alacrity.guest.drivers.venet import VenetDriver
        drv: Any = VenetDriver(find_bridge(machine), sg=args.get("sg", False),
                               pmtd=args.get("pmtd", False), evq=args.get("evq", False))
    else:
        drv = VirtioNetDriver(find_device(machine, spec.ID_NET),
                              packed=args.get("abi") == "virtio-packed")
    host = TinyHost(drv, args["ip"])
    deadline = time.monotonic() + args.get("seconds", 30)
    next_send = 0.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        if args.get("send") and now >= next_send:
            host.send_udp(args["peer"], args.get("port", 7000), args["peer_port"],
                          args["send"].encode())
            next_send = now + 0.5
        host.poll(0.1)
        if any(d == b"stop" for *_, d in host.udp_inbox):
            break
    return {**host.counts, "mac": drv.mac.hex(),
            "udp": [[src, sport, dport, data.decode(errors="replace")]
                    for src, sport, dport, data in host.udp_inbox]}


def selftest(machine: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Initialise every virtio device and move some data through it, without harming
    anything: block data is read and written back unchanged, then flushed."""
    import os as _os

    from alacrity.guest.drivers.virtio_console import VirtioConsoleDriver
    from alacrity.guest.drivers.virtio_net import VirtioNetDriver
    from alacrity.guest.drivers.virtio_rng import VirtioRngDriver

    packed = args.get("abi") == "virtio-packed"
    report: list[dict[str, Any]] = []
    nets = []
    for d in machine.devices:
        if d["kind"] != "virtio-mmio":
            continue
        t = MmioTransport(machine, d)
        entry: dict[str, Any] = {"device": d["name"], "id": t.device_id}
        try:
            if t.device_id == spec.ID_BLOCK:
                drv = VirtioBlkDriver(t, depth=1, max_bytes=4096, packed=packed)
                n = min(8, drv.capacity) * 512
                before = drv.read(0, n)
                if not drv.read_only:
                    drv.write(0, before)
                    drv.flush()
                ok = drv.read(0, n) == before
                entry.update(kind="blk", capacity=drv.capacity * 512, read_only=drv.read_only,
                             serial=drv.get_id().decode(errors="replace"), ok=ok)
            elif t.device_id == spec.ID_NET:
                nd = VirtioNetDriver(t, packed=packed)
                nets.append((nd, entry))
                entry.update(kind="net", mac=nd.mac.hex(":"), mtu=nd.mtu, link_up=nd.link_up)
            elif t.device_id == spec.ID_CONSOLE:
                cd = VirtioConsoleDriver(t, packed=packed)
                cd.write(b"alacrity: console self-test\r\n")
                entry.update(kind="console", ok=True)
            elif t.device_id == spec.ID_RNG:
                rd = VirtioRngDriver(t, packed=packed)
                entry.update(kind="rng", ok=len(set(rd.read(64))) > 16)
            else:
                entry.update(kind="unknown")
        except Exception as e:   # one device failing does not hide the others
            entry.update(ok=False, error=f"{type(e).__name__}: {e}")
        report.append(entry)
    net_mode = args.get("net", "")
    if net_mode in ("loopback", "pair") and nets:
        src, dst = nets[0][0], nets[-1][0]
        frames = [src.mac * 2 + b"\x88\xb5" + _os.urandom(50) for _ in range(16)]
        got: list[bytes] = []
        for f in frames:
            src.send(f)
        src.kick_tx()
        while len(got) < len(frames):
            got += dst.recv()
            dst.kick_rx()
            if len(got) < len(frames):
                dst.wait(timeout=5)
        for _, entry in nets:
            entry["ok"] = got == frames
    elif args.get("ip") and nets:
        from alacrity.guest.netstack import TinyHost
        import time as _time
        host = TinyHost(nets[0][0], args["ip"])
        end = _time.monotonic() + args.get("seconds", 10)
        while _time.monotonic() < end:
            host.poll(min(0.5, max(0.0, end - _time.monotonic())))
        nets[0][1].update(ok=True, ip=args["ip"], **host.counts)
    else:
        for _, entry in nets:
            entry.setdefault("ok", True)
    return {"devices": report}
