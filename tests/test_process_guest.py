"""Process guests: real processes, a real image file, data checked byte for byte in both
directions, and guests that die or misbehave while the host keeps working."""

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from alacrity.devices.block import BlockCore, FileBackend
from alacrity.guest.process import GuestDied, ProcessGuest
from alacrity.guest.programs import lane_requests
from alacrity.machine import Machine
from alacrity.vbus.vblock import Vblock
from alacrity.virtio.blk import VirtioBlk

ROOT = str(Path(__file__).resolve().parent.parent)


@pytest.fixture(autouse=True)
def guest_can_import_tests(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def host(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 << 20))
    m = Machine(32 << 20)
    backend = FileBackend(str(img))
    dev = m.add_virtio_mmio(VirtioBlk(BlockCore(backend), queue_max=64))
    yield m, dev, img
    m.close()
    backend.close()


def expected_image(size, seed, depth, count, region, max_sectors):
    img = bytearray(size)
    lane = region // depth
    for i in range(depth):
        for sector, n, rng in lane_requests(seed, i, count // depth, i * lane, lane, max_sectors):
            img[sector * 512:(sector + n) * 512] = rng.randbytes(n * 512)
    return bytes(img)


@pytest.fixture(params=["virtio", "vbus"])
def disk_host(request, tmp_path):
    """A machine with one disk on a real image: virtio-blk, or vblock behind the vbus
    bridge; (machine, abi, requests served, broken?, image path)."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 << 20))
    m = Machine(32 << 20)
    backend = FileBackend(str(img))
    if request.param == "vbus":
        dev = Vblock(BlockCore(backend))
        bridge = m.add_vbus_bridge([dev])
        served = lambda: dev.requests                                 # noqa: E731
        broken = lambda: dev.broken or bridge.broken                   # noqa: E731
    else:
        mmio = m.add_virtio_mmio(VirtioBlk(BlockCore(backend), queue_max=64))
        served = lambda: mmio.stats[0].requests                       # noqa: E731
        broken = lambda: mmio.broken                                   # noqa: E731
    yield m, request.param, served, broken, img
    m.close()
    backend.close()


def test_guest_writes_land_in_the_file_across_the_index_wrap(disk_host):
    m, abi, served, broken, img = disk_host
    args = {"depth": 8, "count": 70_000, "seed": 7, "region_sectors": 2048, "max_sectors": 2,
            "queue_size": 64, "abi": abi}
    g = ProcessGuest(m).start("alacrity.guest.programs:blk_write_lanes", args)
    r = g.wait(timeout=120)
    g.close()
    assert r["requests"] == 70_000
    if abi == "virtio":
        assert r["last_used"] == (70_000 + 1) & 0xFFFF   # + the final FLUSH: the index wrapped
    want = expected_image(4 << 20, 7, 8, 70_000, 2048, 2)
    got = img.read_bytes()
    assert got[:2048 * 512] == want[:2048 * 512]
    assert got[2048 * 512:] == bytes(len(got) - 2048 * 512)   # nothing written elsewhere
    assert served() == 70_001 and not broken()


def test_host_data_reads_back_in_the_guest_across_the_index_wrap(disk_host):
    m, abi, served, broken, img = disk_host
    data = os.urandom(4 << 20)
    img.write_bytes(data)
    args = {"depth": 6, "count": 67_200, "seed": 3, "region_sectors": 8190, "max_sectors": 8,
            "queue_size": 32, "abi": abi}
    g = ProcessGuest(m).start("alacrity.guest.programs:blk_read_lanes", args)
    r = g.wait(timeout=120)
    g.close()
    lane = 8190 // 6
    for i, digest in enumerate(r["digests"]):
        h = hashlib.sha256()
        for sector, n, _ in lane_requests(3, i, 67_200 // 6, i * lane, lane, 8):
            h.update(sector.to_bytes(8, "little"))
            h.update(data[sector * 512:(sector + n) * 512])
        assert digest == h.hexdigest(), f"lane {i}"
    if abi == "virtio":
        assert r["last_used"] == 67_200 & 0xFFFF
    assert served() == 67_200 and not broken()


def test_selftest_reports_device_facts(host):
    m, _, _ = host
    g = ProcessGuest(m).start("alacrity.guest.programs:blk_selftest", {})
    r = g.wait(timeout=30)
    g.close()
    assert r == {**r, "capacity": (4 << 20) // 512, "read_only": False, "id": "alacrity",
                 "readback_ok": True}


def test_killing_the_guest_mid_run_leaves_the_host_usable(host):
    m, dev, _ = host
    g = ProcessGuest(m).start("alacrity.bench.blk:guest_main", {
        "abi": "virtio-split", "rw": "randwrite", "bs": 4096, "depth": 8, "seconds": 30, "warmup": 0.0,
        "notify": "mitigated", "queue_size": 64, "poll_us": 0})
    deadline = time.monotonic() + 20
    while dev.stats[0].requests < 2000:                 # it is really working
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(g.pid, signal.SIGKILL)
    with pytest.raises(GuestDied, match="SIGKILL"):
        g.wait(timeout=20)
    g.close()
    assert m.io.alive                                   # the I/O thread is still running
    # the same machine takes a new guest, which finds a working device
    g2 = ProcessGuest(m).start("alacrity.guest.programs:blk_selftest", {})
    assert g2.wait(timeout=30)["readback_ok"] is True
    g2.close()


@pytest.mark.parametrize("program,message", [
    ("crash", "the guest program fell over"),
    ("garbage_on_the_control_socket", "bad control message"),
    ("access_of_bad_size", "bad control message"),
    ("exit_quietly", "exited with code 3"),
    ("sock_closed", "closed its control socket"),
])
def test_misbehaving_guests_are_reported(host, program, message):
    m, _, _ = host
    g = ProcessGuest(m).start(f"tests.guest_programs:{program}", {})
    with pytest.raises(GuestDied, match=message):
        g.wait(timeout=30)
    g.close()
    g2 = ProcessGuest(m).start("alacrity.guest.programs:blk_selftest", {})
    assert g2.wait(timeout=30)["readback_ok"] is True
    g2.close()


def test_guest_that_never_finishes_is_stopped_at_the_deadline(host):
    m, _, _ = host
    g = ProcessGuest(m).start("tests.guest_programs:sleep_forever", {})
    t = time.monotonic()
    with pytest.raises(GuestDied, match="did not finish"):
        g.wait(timeout=1)
    assert time.monotonic() - t < 10
    g.close()
