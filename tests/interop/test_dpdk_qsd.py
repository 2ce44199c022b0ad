"""Interop with programs nobody here wrote: DPDK's virtio-user PMD against our backend, our
virtio-net driver against DPDK's vhost PMD, our virtio-blk driver against
qemu-storage-daemon. CI installs them (`.ci/run`); elsewhere they skip when missing."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from alacrity.guest.drivers.virtio_blk import VirtioBlkDriver
from alacrity.guest.drivers.virtio_net import VirtioNetDriver
from alacrity.guest.programs import find_device
from alacrity.vhost_user.frontend import VhostUserGuest
from alacrity.virtio import spec
from tests.interop.tools import Served, hugepages, need, run_testpmd, stop_testpmd

RING = 256          # testpmd's and our ring size: the most either side can hold back


@pytest.fixture(scope="module")
def huge():
    need("dpdk-testpmd")
    with hugepages() as d:
        yield d


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("fwd", ["txonly", "rxonly", "io"])
def test_testpmd_virtio_user_against_our_backend(huge, tmp_path, fwd, packed):
    sock = str(tmp_path / "net.sock")
    served = Served(sock, "--device", "net", "--backend", "loopback")
    try:
        vdev = f"net_virtio_user0,path={sock}" + (",packed_vq=1" if packed else "")
        # rxonly and io need frames to start with: one burst first, then the loop carries on
        p = run_testpmd(huge, f"alacrity-vu-{fwd}-{packed}", vdev, fwd,
                    *([] if fwd == "txonly" else ["--tx-first"]))
        time.sleep(4)
        rx, tx, out = stop_testpmd(p)
        c = served.stop()
    finally:
        served.kill()
    net = c["net"]
    assert c["protocol_errors"] == 0 and c["connections"] == 1, served.log
    assert bool(int(c["features"], 16) & spec.bit(spec.F_RING_PACKED)) == packed
    assert net["tx_malformed"] == 0 and net["tx_dropped"] == 0
    if fwd == "txonly":
        # testpmd counts what it put in the ring; at most a ring's worth was still there
        # when it stopped the device. Frames came back on rx (into the buffers testpmd
        # posted; txonly never takes them, so the rest wait in the device's backlog of 1024
        # or were dropped and counted)
        assert tx > 10_000
        assert 0 <= tx - net["tx_frames"] <= RING, (tx, net)
        assert net["rx_frames"] > 0
        assert 0 <= net["tx_frames"] - net["rx_frames"] - net["rx_dropped"] <= 1024, net
    elif fwd == "rxonly":
        assert rx == tx == 32                   # one burst out, the same burst back
        assert net["tx_frames"] == net["rx_frames"] == 32 and net["rx_dropped"] == 0
    else:
        # io: every frame testpmd receives it sends again, round and round
        assert rx > 10_000 and tx > 10_000, out[-2000:]
        assert 0 <= tx - net["tx_frames"] <= RING, (tx, net)
        assert 0 <= net["rx_frames"] - rx <= RING + 32, (rx, net)
        assert net["rx_dropped"] == 0


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_our_virtio_net_driver_against_dpdk_vhost(huge, tmp_path, packed):
    sock = str(tmp_path / "vhost.sock")
    p = run_testpmd(huge, f"alacrity-vh-{packed}", f"net_vhost0,iface={sock}", "macswap", "-a",
                main_lcore=1)
    g = None
    try:
        end = time.monotonic() + 30
        while not os.path.exists(sock):
            assert p.poll() is None and time.monotonic() < end, p.communicate()[0][-3000:]
            time.sleep(0.05)
        g = VhostUserGuest(sock, spec.ID_NET, 32 << 20)
        t = find_device(g, spec.ID_NET)
        drv = VirtioNetDriver(t, packed=packed)
        assert t.has(spec.F_RING_PACKED) == packed
        frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(range(50))
        sent = got = bad = 0
        stalled = ""
        end = time.monotonic() + 2
        while time.monotonic() < end or got < sent:
            assert time.monotonic() < end + 10, (sent, got)
            # never more in flight than we have rx buffers: a NIC drops what has no room
            while time.monotonic() < end and sent - got < 96 and drv.send(frame):
                sent += 1
            drv.kick_tx()
            try:
                drv.wait(5.0)
            except TimeoutError:
                # told apart below by testpmd's own counters: frames it dropped, or frames
                # it forwarded that we never saw (a lost wake-up on our side)
                stalled = f"nothing came back for 5 s with {sent - got} frames out; "
                break
            for f in drv.recv():
                got += 1
                # macswap: destination and source exchanged, the rest untouched
                bad += f != frame[6:12] + frame[:6] + frame[12:]
            drv.kick_rx()
    finally:
        if g is not None:
            g.close()
        rx, tx, out = stop_testpmd(p)
    assert not stalled and sent > 1000 and got == sent and bad == 0, \
        f"{stalled}sent {sent}, got {got}, bad {bad}; testpmd rx {rx} tx {tx}:\n{out[-2000:]}"
    assert rx == tx == sent, out[-2000:]


@pytest.fixture
def qsd(tmp_path):
    need("qemu-storage-daemon", "qemu-io")
    img = str(tmp_path / "disk.raw")
    sock = str(tmp_path / "qsd.sock")
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    # the host writes a pattern before the daemon opens the image
    w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5c 65536 8192", img],
                       capture_output=True, text=True, timeout=30)
    assert w.returncode == 0, w.stderr
    p = subprocess.Popen(["qemu-storage-daemon",
                          "--blockdev", f"driver=file,node-name=file0,filename={img}",
                          "--blockdev", "driver=raw,node-name=disk0,file=file0",
                          "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,"
                                      f"addr.type=unix,addr.path={sock},writable=on"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + 20
    while not os.path.exists(sock):
        assert p.poll() is None and time.monotonic() < end, p.communicate()[0]
        time.sleep(0.05)
    yield sock, img, p
    p.terminate()
    p.wait(timeout=20)


def test_our_virtio_blk_driver_against_qemu_storage_daemon(qsd):
    sock, img, p = qsd
    g = VhostUserGuest(sock, spec.ID_BLOCK, 16 << 20)
    try:
        t = find_device(g, spec.ID_BLOCK)
        drv = VirtioBlkDriver(t, depth=4)
        assert drv.capacity == (8 << 20) // 512
        # what the host wrote, read through our driver
        assert drv.read(128, 4096) == b"\x5c" * 4096
        assert drv.read(136, 4096) == b"\x5c" * 4096
        # what our driver writes and flushes, on the host's side
        drv.write(2048, b"\xab" * 4096)
        drv.write(4000, bytes(range(256)) * 16)
        drv.flush()
        assert drv.get_id() is not None
    finally:
        g.close()
    r = subprocess.run(["qemu-io", "-r", "-U", "-f", "raw", "-c", "read -P 0xab 1048576 4096",
                        img], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
    with open(img, "rb") as f:
        f.seek(4000 * 512)
        assert f.read(4096) == bytes(range(256)) * 16
    assert p.poll() is None                     # the daemon is fine with us
