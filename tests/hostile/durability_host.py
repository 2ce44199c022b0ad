"""A host process for the durability test: a machine with one block device (virtio-blk, or
vblock behind the vbus bridge) on an image file, and a process guest that writes, FLUSHes
and reports each completed FLUSH. This process prints "acked N" once the guest has seen
the FLUSH after its first N writes complete; the test then kills it with SIGKILL.

    python -m tests.hostile.durability_host IMAGE ABI SEED
"""

from __future__ import annotations

import random
import sys
from typing import Any

from alacrity.devices.block import BlockCore, open_backend
from alacrity.guest.process import ProcessGuest
from alacrity.machine import Machine
from alacrity.vbus.vblock import Vblock
from alacrity.virtio.blk import VirtioBlk

MAX_SECTORS = 8


def writes(seed: int, capacity_sectors: int):
    """The guest's writes, replayable by the test: (sector, data), forever."""
    rng = random.Random(seed)
    while True:
        n = rng.randint(1, MAX_SECTORS)
        sector = rng.randrange(0, capacity_sectors - n + 1)
        yield sector, rng.randbytes(512 * n)


def guest_main(machine: Any, a: dict[str, Any]) -> dict[str, Any]:
    from alacrity.guest.programs import _open_blk
    drv = _open_blk(machine, {"abi": a["abi"], "max_sectors": MAX_SECTORS})
    done = 0
    for sector, data in writes(a["seed"], a["sectors"]):
        drv.write(sector, data)
        done += 1
        if done % a["every"] == 0:
            drv.flush()
            machine.mark("acked", n=done)
    return {}


def main() -> None:
    image, abi, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    machine = Machine(32 << 20)
    backend = machine.own(open_backend(image))
    if abi == "vbus":
        machine.add_vbus_bridge([Vblock(BlockCore(backend))])
    else:
        machine.add_virtio_mmio(VirtioBlk(BlockCore(backend)))
    guest = ProcessGuest(machine)

    def on_mark(name: str, data: dict[str, Any]) -> None:
        sys.stdout.write(f"acked {data['n']}\n")
        sys.stdout.flush()

    guest.on_mark = on_mark
    guest.start("tests.hostile.durability_host:guest_main",
                {"abi": abi, "seed": seed, "sectors": backend.capacity // 512, "every": 3})
    guest.wait(timeout=600)


if __name__ == "__main__":
    main()
