"""Build a machine from `--device` specs and run a guest on it (`alacrity run`).

Specs: blk:PATH, blk:null, net:loopback, net:pair, net:tap:NAME, console:pty,
console:file:PATH, console:socket:PATH, rng.
"""

from __future__ import annotations

import os
from typing import Any

from alacrity.devices.block import BlockCore, open_backend
from alacrity.devices.console import ConsoleCore, open_char
from alacrity.devices.net import NetCore, open_backends
from alacrity.errors import ConfigError
from alacrity.machine import Machine
from alacrity.virtio.blk import VirtioBlk
from alacrity.virtio.console import VirtioConsole
from alacrity.virtio.net import VirtioNet
from alacrity.virtio.rng import VirtioRng


def build(machine: Machine, specs: list[str], read_only: bool = False) -> dict[str, Any]:
    """Add one device per spec; returns what the guest program needs to know."""
    info: dict[str, Any] = {"net": "", "consoles": []}
    for spec in specs:
        kind, _, arg = spec.partition(":")
        if kind == "blk":
            if not arg:
                raise ConfigError("--device blk: needs :PATH or :null")
            if arg != "null" and not os.path.exists(arg):
                raise ConfigError(f"--device blk:{arg}: no such file")
            backend = open_backend(arg, read_only=read_only)
            machine.own(backend)
            machine.add_virtio_mmio(VirtioBlk(BlockCore(backend)))
        elif kind == "net":
            backends = open_backends(arg or "loopback")
            for b in backends:
                machine.attach(b)
                machine.add_virtio_mmio(VirtioNet(NetCore(b)))
            info["net"] = "tap" if arg.startswith("tap:") else arg or "loopback"
        elif kind == "console":
            char = machine.attach(open_char(arg or "pty"))
            machine.add_virtio_mmio(VirtioConsole(ConsoleCore(char)))
            info["consoles"].append({"kind": char.kind, "path": getattr(char, "path", "")})
        elif kind == "rng":
            machine.add_virtio_mmio(VirtioRng())
        else:
            raise ConfigError(f"--device {spec}: expected blk:, net:, console: or rng")
    return info
