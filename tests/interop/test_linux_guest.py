"""A driver nobody here wrote: Linux's own virtio-blk and virtio-net drivers, in a guest that
QEMU runs under TCG, on devices served by `alacrity serve vhost-user`. One boot per ring
layout does every check: read what the host wrote, write something the host checks, flush
(`sync`), bring eth0 up and ping an address in a network namespace behind our tap."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess

import pytest

from alacrity.virtio import spec
from tests.interop.tools import Served, need, need_root
from tests.interop.linux_guest import INIT, initramfs, kernel, qemu_command
from tests.netns import netns, sh

GUEST_IP, NS_IP = "10.79.0.2", "10.79.0.1"
MAC = "52:54:00:a1:ac:77"


@pytest.fixture(scope="module")
def linux():
    need("qemu-system-x86_64", "busybox", "ip")
    return kernel()


def results(console: str) -> dict[str, str]:
    out = {}
    for line in console.splitlines():
        if line.startswith("ALACRITY "):
            key, _, value = line[9:].partition(" ")
            out[key] = value.strip()
    return out


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_linux_guest_on_our_vhost_user_blk_and_net(linux, tmp_path, packed):
    need_root("a tap device in a network namespace")
    vmlinuz, modules = linux
    initrd = tmp_path / "initrd"
    initramfs(initrd, INIT.format(modules=" ".join(modules), guest_ip=GUEST_IP, peer_ip=NS_IP),
              modules)
    img = tmp_path / "disk.raw"
    pattern = os.urandom(4096)
    img.write_bytes(pattern + bytes((8 << 20) - 4096))
    token = secrets.token_hex(8)
    tap = f"alq{os.getpid() % 100000}{int(packed)}"
    with netns(f"alacrity-linux-{os.getpid()}-{int(packed)}") as ns:
        sh("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        blk = net = None
        try:
            blk = Served(str(tmp_path / "blk.sock"), "--device", "blk", "--image", str(img))
            net = Served(str(tmp_path / "net.sock"), "--device", "net", "--backend", f"tap:{tap}")
            # the tap moves into the namespace, attached: the kernel there answers the ping
            sh("ip", "link", "set", tap, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{NS_IP}/24", "dev", tap)
            sh("ip", "-n", ns, "link", "set", tap, "up")
            q = subprocess.run(qemu_command(vmlinuz, initrd, blk.sock, net.sock, token, packed,
                                            MAC), capture_output=True, text=True, timeout=240)
            console = q.stdout
            bc, nc = blk.stop(), net.stop()
        finally:
            for s in (blk, net):
                if s is not None:
                    s.kill()
            sh("ip", "link", "del", tap, check=False)
    r = results(console)
    info = f"qemu exit {q.returncode}\n{console[-4000:]}\n{q.stderr[-2000:]}"
    assert q.returncode == 0 and r.get("done") == "", info
    # block: the guest saw the host's pattern, and the host sees the guest's write
    assert r["blk-size"] == str((8 << 20) // 512), info
    assert r["blk-read"] == hashlib.md5(pattern).hexdigest(), info
    assert r["blk-write"] == "ok" and r["blk-sync"] == "ok", info
    want = f"GUEST-WROTE-{token}".encode()
    assert img.read_bytes()[16 * 512:16 * 512 + len(want)] == want
    assert bc["blk"]["flushes"] >= 1 and bc["blk"]["errors"] == 0
    # network: the guest's eth0 has our MAC and the kernel in the namespace answered
    assert r["net-mac"] == MAC and r["ping"] == "ok", info
    assert nc["net"]["tx_frames"] >= 3 and nc["net"]["rx_frames"] >= 3
    # both devices ran on the ring layout asked for, with no protocol error
    for c in (bc, nc):
        assert c["protocol_errors"] == 0 and c["connections"] == 1, c
        feats = int(c["features"], 16)
        assert bool(feats & spec.bit(spec.F_RING_PACKED)) == packed
        assert feats & spec.bit(spec.F_EVENT_IDX)
    # the guest kernel's own view agrees (sysfs features: one character per bit)
    assert r["features-blk"][spec.F_RING_PACKED] == ("1" if packed else "0"), info
