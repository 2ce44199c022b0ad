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
    """The index-th virtio-mmio device of a type, probed like a guest kernel would."""
    n = 0
    for d in machine.devices:
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


def _open_blk(machine: Any, args: dict[str, Any]) -> VirtioBlkDriver:
    t = find_device(machine, spec.ID_BLOCK)
    return VirtioBlkDriver(t, depth=args.get("depth", 1),
                           max_bytes=args.get("max_sectors", 8) * 512,
                           queue_size=args.get("queue_size", 256),
                           event_idx=args.get("event_idx", True),
                           indirect=args.get("indirect", False))


def _run_lanes(drv: VirtioBlkDriver, args: dict[str, Any], write: bool) -> list[str]:
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
        for slot, status, written in drv.reap():
            sector, nbytes = pending.pop(slot)
            if status != B.S_OK:
                raise IOError(f"request at sector {sector} failed with status {status}")
            if not write:
                if written != nbytes + 1:
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
            "last_used": drv.q.last_used}


def blk_read_lanes(machine: Any, args: dict[str, Any]) -> dict[str, Any]:
    drv = _open_blk(machine, args)
    digests = _run_lanes(drv, args, write=False)
    return {"digests": digests, "last_used": drv.q.last_used}


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
