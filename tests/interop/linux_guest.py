"""A real Linux guest for interop tests: Debian's cloud kernel (fetched with apt-get download
and unpacked with dpkg -x into a cache directory; nothing under /boot changes) and a
busybox initramfs built here, booted by QEMU under TCG. Facts: ../shared/qemu-linux-guest.md.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

from tests.interop.tools import missing, need

CACHE = Path(os.environ.get("ALACRITY_CACHE", Path.home() / ".cache" / "alacrity")) / "linux"
META = "linux-image-cloud-amd64"
# the virtio drivers, in the order their dependencies need
MODULES = ["virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "virtio_blk", "failover", "net_failover", "virtio_net"]


def kernel() -> tuple[Path, dict[str, Path]]:
    """(bzImage, {module: path}) of the current Debian cloud kernel, fetched once."""
    need("apt-get", "dpkg")
    dep = subprocess.run(["apt-cache", "depends", META], capture_output=True, text=True)
    pkgs = [ln.split(":", 1)[1].strip() for ln in dep.stdout.splitlines()
            if ln.strip().startswith("Depends:") and "linux-image-" in ln]
    if not pkgs:
        missing(f"apt-cache does not know {META} (apt-get update?)")
    root = CACHE / pkgs[0]
    if not (root / "boot").is_dir():
        tmp = CACHE / (pkgs[0] + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        got = subprocess.run(["apt-get", "download", pkgs[0]], cwd=tmp, capture_output=True,
                             text=True, timeout=600)
        debs = glob.glob(str(tmp / "*.deb"))
        if got.returncode or not debs:
            missing(f"apt-get download {pkgs[0]} failed: {got.stderr.strip()[-300:]}")
        subprocess.run(["dpkg", "-x", debs[0], str(tmp / "x")], check=True, timeout=300)
        shutil.rmtree(root, ignore_errors=True)
        (tmp / "x").rename(root)
        shutil.rmtree(tmp, ignore_errors=True)
    vmlinuz = next(iter(glob.glob(str(root / "boot" / "vmlinuz-*"))))
    mods = {}
    for name in MODULES:
        found = glob.glob(str(root / "lib" / "modules" / "*" / "kernel" / "**" / f"{name}.ko"),
                          recursive=True)
        if not found:
            missing(f"{name}.ko is not in {root} (compressed modules are not supported)")
        mods[name] = Path(found[0])
    return Path(vmlinuz), _load_order(mods)


def _load_order(mods: dict[str, Path]) -> dict[str, Path]:
    """The modules ordered so each comes after what its .modinfo `depends=` names."""
    deps = {}
    for name, path in mods.items():
        data = path.read_bytes()
        at = data.find(b"\0depends=")
        value = data[at + 9:data.index(b"\0", at + 9)].decode() if at >= 0 else ""
        deps[name] = [d.replace("-", "_") for d in value.split(",") if d]
    order: list[str] = []

    def visit(n: str) -> None:
        if n in order:
            return
        for d in deps.get(n, []):
            if d not in mods:
                missing(f"module {n} needs {d}, which is not in the list")
            visit(d)
        order.append(n)

    for n in mods:
        visit(n)
    return {n: mods[n] for n in order}


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    """One entry of a newc cpio archive."""
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def initramfs(path: Path, init: str, modules: dict[str, Path]) -> None:
    """/init (a busybox shell script), /bin/busybox, /modules/NAME.ko."""
    busybox = shutil.which("busybox")
    if busybox is None:
        missing("missing busybox (apt-get install busybox-static)")
    out = bytearray()
    ino = 1
    for d in ("bin", "dev", "proc", "sys", "modules", "tmp"):
        out += _cpio_entry(d, 0o040755, ino=ino)
        ino += 1
    files = [("init", init.encode(), 0o100755),
             ("bin/busybox", Path(busybox).read_bytes(), 0o100755)]
    files += [(f"modules/{n}.ko", p.read_bytes(), 0o100644) for n, p in modules.items()]
    for name, data, mode in files:
        out += _cpio_entry(name, mode, data, ino)
        ino += 1
    out += _cpio_entry("TRAILER!!!", 0, ino=0)
    path.write_bytes(bytes(out))


INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() {{ echo "ALACRITY $*"; }}
for m in {modules}; do insmod /modules/$m.ko || say "insmod $m failed"; done
token=$(sed -n 's/.*alacrity.token=\\([A-Za-z0-9]*\\).*/\\1/p' /proc/cmdline)
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ -b /dev/vda ]; then
  say "blk-size $(cat /sys/block/vda/size)"
  say "blk-read $(dd if=/dev/vda bs=4096 count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
  printf "GUEST-WROTE-%s" "$token" > /tmp/w
  dd if=/tmp/w of=/dev/vda bs=512 seek=16 conv=notrunc,fsync 2>/dev/null && say "blk-write ok"
  sync && say "blk-sync ok"
else
  say "blk-missing"
fi
i=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up && ip addr add {guest_ip}/24 dev eth0
say "net-mac $(cat /sys/class/net/eth0/address)"
if ping -c 3 -W 5 {peer_ip} >/tmp/ping 2>&1; then say "ping ok"; else say "ping failed"; cat /tmp/ping; fi
say "features-blk $(cat /sys/block/vda/device/features 2>/dev/null)"
say "features-net $(cat /sys/class/net/eth0/device/features 2>/dev/null)"
say done
poweroff -f
"""


def qemu_command(vmlinuz: Path, initrd: Path, blk_sock: str, net_sock: str, token: str,
                 packed: bool, mac: str) -> list[str]:
    need("qemu-system-x86_64")
    p = ",packed=on" if packed else ""
    # vectors=0: INTx, not MSI-X (QEMU 7.2 under TCG crashes with MSI-X and vhost-user)
    return ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc,memory-backend=mem",
            "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-m", "512",
            "-smp", "1", "-nodefaults", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-no-reboot", "-kernel", str(vmlinuz), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet panic=-1 alacrity.token={token}",
            "-chardev", f"socket,id=blk0,path={blk_sock}",
            "-device", f"vhost-user-blk-pci,chardev=blk0,vectors=0{p}",
            "-chardev", f"socket,id=net0,path={net_sock}",
            "-netdev", "vhost-user,id=n0,chardev=net0",
            "-device", f"virtio-net-pci,netdev=n0,vectors=0,romfile=,mac={mac}{p}"]
