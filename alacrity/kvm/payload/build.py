"""Build the payload with the system gcc on first use, cached by a hash of its sources."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = ["start.S", "rt.c", "virtio.c", "ring.c", "net.c", "vbus.c", "irq.c", "bench.c", "main.c"]
HEADERS = ["rt.h", "virtio.h", "ring.h", "net.h", "vbus.h", "irq.h", "bench.h", "link.ld"]
CFLAGS = ["-O2", "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-mno-red-zone", "-mgeneral-regs-only",
          "-fcf-protection=none", "-Wall", "-Werror"]
CACHE = Path(os.environ.get("ALACRITY_CACHE", Path.home() / ".cache" / "alacrity")) / "payload"


class BuildError(RuntimeError):
    pass


def build(*, test_programs: bool = False) -> bytes:
    """The flat binary, loaded at 0x100000 with its entry first. `test_programs` adds the
    programs only tests run (a hostile driver, a guest that spins, one that faults)."""
    cflags = CFLAGS + (["-DALACRITY_TEST_PROGRAMS"] if test_programs else [])
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    h.update(" ".join(cflags).encode())
    out = CACHE / h.hexdigest()[:16] / "payload.bin"
    if out.exists():
        return out.read_bytes()
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError("the KVM payload needs gcc (apt-get install gcc binutils)")
    with tempfile.TemporaryDirectory() as d:
        objs = []
        for src in SOURCES:
            obj = os.path.join(d, src + ".o")
            r = subprocess.run([gcc, *cflags, "-c", str(HERE / src), "-o", obj],
                               capture_output=True, text=True)
            if r.returncode:
                raise BuildError(f"gcc {src}: {r.stderr.strip()}")
            objs.append(obj)
        elf = os.path.join(d, "payload.elf")
        r = subprocess.run([gcc, "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
                            "-T", str(HERE / "link.ld"), *objs, "-o", elf],
                           capture_output=True, text=True)
        if r.returncode:
            raise BuildError(f"link: {r.stderr.strip()}")
        r = subprocess.run(["objcopy", "-O", "binary", elf, os.path.join(d, "payload.bin")],
                           capture_output=True, text=True)
        if r.returncode:
            raise BuildError(f"objcopy: {r.stderr.strip()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        shutil.copy(os.path.join(d, "payload.bin"), tmp)
        tmp.rename(out)
    return out.read_bytes()
