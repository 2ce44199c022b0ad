"""A Python VMM on /dev/kvm running the C payload: the API, the build, data integrity
through the payload's virtio-blk driver, and guests that misbehave (a hostile driver, a
triple fault, a guest that never exits) against a VMM that must survive them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alacrity.devices.block import BlockCore, open_backend
from alacrity.kvm import api
from alacrity.kvm.payload.build import build
from alacrity.kvm.vm import GuestFailed, KvmVm, run_selftest
from alacrity.machine import Machine
from alacrity.virtio import spec
from alacrity.virtio.blk import VirtioBlk

WHY = api.usable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"KVM is not usable here: {WHY}")


def pattern(seed: int, sector: int, i: int) -> int:
    """payload/main.c pattern()"""
    return (seed * 7 + sector * 31 + i) & 0xFF


@pytest.fixture
def blk_machine(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    m = Machine(64 << 20)
    be = m.own(open_backend(str(img)))
    dev = m.add_virtio_mmio(VirtioBlk(BlockCore(be)))
    yield m, dev, img
    m.close()


def test_ioctl_errors_name_the_ioctl():
    kvm = api.open_kvm()
    vm = api.ioctl(kvm, api.CREATE_VM, 0)
    try:
        with pytest.raises(api.KvmError, match="KVM_SET_USER_MEMORY_REGION"):
            api.ioctl(vm, api.SET_USER_MEMORY_REGION, api.UserspaceMemoryRegion(
                slot=0, guest_phys_addr=0x1001, memory_size=4096, userspace_addr=0x1001))
        assert api.ioctl(kvm, api.CHECK_EXTENSION, api.CAP_IOEVENTFD) > 0
    finally:
        os.close(vm)
        os.close(kvm)


def test_irqchip_gsi_routing_and_msi():
    """The interrupt ioctls a VMX/SVM guest with MSI would use: routing a GSI to an
    IOAPIC pin and another to an MSI, an irqfd on it, and KVM_SIGNAL_MSI."""
    kvm = api.open_kvm()
    vm = api.ioctl(kvm, api.CREATE_VM, 0)
    efd = os.eventfd(0)
    try:
        assert api.ioctl(kvm, api.CHECK_EXTENSION, api.CAP_IRQCHIP) > 0
        api.ioctl(vm, api.CREATE_IRQCHIP, 0)
        api.set_gsi_routing(vm, [api.irqchip_route(5, 2, 5),
                                 api.msi_route(24, 0xFEE00000, 0x31)])
        api.ioctl(vm, api.IRQFD, api.IrqFd(fd=efd, gsi=24))
        vcpu = api.ioctl(vm, api.CREATE_VCPU, 0)      # an MSI needs someone to deliver to
        assert api.ioctl(vm, api.SIGNAL_MSI, api.Msi(address_lo=0xFEE00000, data=0x31)) >= 0
        os.close(vcpu)
        with pytest.raises(api.KvmError, match="KVM_SET_GSI_ROUTING"):
            api.set_gsi_routing(vm, [api.irqchip_route(1 << 30, 2, 99)])
    finally:
        os.close(efd)
        os.close(vm)
        os.close(kvm)


def test_payload_build_is_cached():
    a = build()
    assert a == build() and len(a) > 1000
    assert build(test_programs=True) != a


@pytest.mark.parametrize("packed", [False, True], ids=["virtio-split", "virtio-packed"])
def test_pattern_written_by_the_guest_is_on_disk(blk_machine, packed):
    m, dev, img = blk_machine
    r, devices = run_selftest(m, test="pattern", seed=9, sectors=256, packed=packed)
    assert r.status == 0, r.console
    assert bool(dev.model.features & spec.bit(spec.F_RING_PACKED)) == packed
    assert devices[0]["ok"] and devices[0]["ops"] == 3 * 32 and devices[0]["errors"] == 0
    data = img.read_bytes()
    for sector in range(256):
        want = bytes(pattern(9, sector, i) for i in range(512))
        assert data[sector * 512:(sector + 1) * 512] == want, f"sector {sector}"
    # the rest of the image is untouched by the guest
    assert len(data) == 1 << 20
    # write, flush, read for each 4 KiB: every request rang a doorbell that stayed in the
    # kernel (the device saw it on its eventfd; no register exit carried a QueueNotify)
    stats = dev.stats[0]
    assert stats.requests == 3 * 32 and stats.doorbells >= 1
    assert m.bus.exits()["virtio-blk0"] < 40 <= stats.requests
    assert r.exits < stats.requests
    if api.pvm_host():
        assert (r.mode, r.cpl) == ("cpl3-poll", 3)


def test_selftest_leaves_the_image_unchanged(blk_machine):
    m, _, img = blk_machine
    before = img.read_bytes()
    r, devices = run_selftest(m, sectors=128)
    assert r.status == 0 and "blk: ok" in r.console
    assert devices[0]["ok"] and img.read_bytes() == before


def test_vblock_pattern_on_disk(tmp_path):
    from alacrity.vbus.vblock import Vblock
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(1 << 20))
    m = Machine(64 << 20)
    try:
        bridge = m.add_vbus_bridge([Vblock(BlockCore(m.own(open_backend(str(img)))))])
        r, devices = run_selftest(m, test="pattern", seed=6, sectors=128)
        assert r.status == 0 and "vbus: ok" in r.console, r.console
        assert devices[0]["ok"] and devices[0]["ops"] == 3 * 16 and not bridge.broken
        data = img.read_bytes()
        for sector in range(128):
            want = bytes(pattern(6, sector, i) for i in range(512))
            assert data[sector * 512:(sector + 1) * 512] == want, f"sector {sector}"
    finally:
        m.close()


def test_venet_frames_through_loopback():
    from alacrity.devices.net import LoopbackBackend, NetCore
    from alacrity.vbus.venet import Venet
    m = Machine(64 << 20)
    try:
        core = NetCore(LoopbackBackend())
        bridge = m.add_vbus_bridge([Venet(core)])
        r, devices = run_selftest(m)
        assert r.status == 0 and "vbus: ok" in r.console, r.console
        assert devices[0]["ok"] and devices[0]["ops"] == 32 and not bridge.broken
        assert core.counters.tx_frames == core.counters.rx_frames == 32
    finally:
        m.close()


def test_cpl0_mode_takes_interrupts_and_halts(tmp_path):
    """The VMX/SVM path: CPL0, the in-kernel irqchip, irqfd per device, an IDT, the
    IOAPIC routing each pin, `sti; hlt` while waiting. On PVM it runs too (emulated)."""
    from alacrity.devices.net import LoopbackBackend, NetCore
    from alacrity.kvm.vm import MB_OFF_RESULTS
    from alacrity.virtio.net import VirtioNet
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    m = Machine(64 << 20)
    try:
        dev = m.add_virtio_mmio(VirtioBlk(BlockCore(m.own(open_backend(str(img))))))
        core = NetCore(LoopbackBackend())
        m.add_virtio_mmio(VirtioNet(core))
        r, devices = run_selftest(m, test="pattern", seed=2, sectors=16, user_mode=False,
                                  deadline=120)
        assert (r.status, r.mode, r.cpl) == (0, "cpl0-irq", 0), r.console
        assert [d["ok"] for d in devices] == [True, True]
        taken = int.from_bytes(r.mailbox[MB_OFF_RESULTS + 8 * 15:][:8], "little")
        assert taken >= 1 and dev.stats[0].interrupts >= 1       # woken by interrupts
        assert img.read_bytes()[512 * 3 + 5] == pattern(2, 3, 5)
        assert core.counters.rx_frames == 32
    finally:
        m.close()


def test_cpl0_mode_vbus_sleeps_on_the_bus_interrupt(tmp_path):
    from alacrity.devices.net import LoopbackBackend, NetCore
    from alacrity.kvm.vm import MB_OFF_RESULTS
    from alacrity.vbus.vblock import Vblock
    from alacrity.vbus.venet import Venet
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    m = Machine(64 << 20)
    try:
        core = NetCore(LoopbackBackend())
        bridge = m.add_vbus_bridge([Vblock(BlockCore(m.own(open_backend(str(img))))),
                                    Venet(core)])
        r, devices = run_selftest(m, test="pattern", seed=8, sectors=16, user_mode=False,
                                  deadline=120)
        assert (r.status, r.mode) == (0, "cpl0-irq") and "vbus: ok" in r.console
        assert devices[0]["ok"] and devices[0]["ops"] == 3 * 2 + 32 and not bridge.broken
        assert int.from_bytes(r.mailbox[MB_OFF_RESULTS + 8 * 15:][:8], "little") >= 1
        assert img.read_bytes()[512 * 9 + 1] == pattern(8, 9, 1)
        assert core.counters.rx_frames == 32
    finally:
        m.close()


def test_two_disks(tmp_path):
    m = Machine(64 << 20)
    try:
        for name in ("a", "b"):
            (tmp_path / name).write_bytes(bytes(1 << 20))
            m.add_virtio_mmio(VirtioBlk(BlockCore(m.own(open_backend(str(tmp_path / name))))))
        r, devices = run_selftest(m, test="pattern", seed=3, sectors=64)
        assert r.status == 0 and [d["ok"] for d in devices] == [True, True]
        for name in ("a", "b"):
            assert (tmp_path / name).read_bytes()[512 * 5 + 7] == pattern(3, 5, 7)
    finally:
        m.close()


def test_selftest_on_null():
    m = Machine(64 << 20)
    try:
        m.add_virtio_mmio(VirtioBlk(BlockCore(m.own(open_backend("null")))))
        r, devices = run_selftest(m)
        assert r.status == 0 and devices[0]["ok"] and devices[0]["ops"] == 4 * 8
    finally:
        m.close()


def boot_test_program(m: Machine, test: str, deadline: float = 30.0):
    vm = KvmVm(m)
    try:
        return vm.boot(build(test_programs=True), test, [], deadline=deadline)
    finally:
        vm.close()


def test_hostile_payload_gets_needs_reset_and_the_vmm_lives_on(blk_machine):
    m, dev, img = blk_machine
    before = img.read_bytes()
    r = boot_test_program(m, "hostile")
    assert r.status == 0, r.console                  # it saw DEVICE_NEEDS_RESET
    assert dev.broken and "available index" in dev.last_error
    status = int.from_bytes(r.mailbox[4 * 4 + 16 * 8 + 24 + 64:][:8], "little")
    assert status & spec.DEVICE_NEEDS_RESET
    assert img.read_bytes() == before                 # nothing written anywhere
    # the same machine, a fresh VM and a well-behaved guest: the device works again
    r2, devices = run_selftest(m, test="pattern", seed=1, sectors=16)
    assert r2.status == 0 and devices[0]["ok"]


def test_triple_fault_is_a_clear_error(blk_machine):
    m, _, _ = blk_machine
    with pytest.raises(GuestFailed, match=r"SHUTDOWN.*triple fault.*RIP 0x"):
        boot_test_program(m, "fault")


def test_guest_past_its_deadline_is_stopped(blk_machine):
    m, _, _ = blk_machine
    with pytest.raises(GuestFailed, match=r"deadline \(RIP 0x10"):
        boot_test_program(m, "spin", deadline=1.0)


@pytest.mark.parametrize("packed", [False, True], ids=["virtio-split", "virtio-packed"])
def test_frames_through_net_loopback(packed):
    from alacrity.devices.net import LoopbackBackend, NetCore
    from alacrity.virtio.net import VirtioNet
    m = Machine(64 << 20)
    try:
        core = NetCore(LoopbackBackend())
        dev = m.add_virtio_mmio(VirtioNet(core))
        r, devices = run_selftest(m, packed=packed)
        assert r.status == 0 and "net: ok" in r.console, r.console
        assert devices[0]["ok"] and devices[0]["ops"] == 32
        assert core.counters.tx_frames == core.counters.rx_frames == 32
        assert bool(dev.model.features & spec.bit(spec.F_RING_PACKED)) == packed
    finally:
        m.close()


def test_devices_without_payload_drivers_are_refused():
    from alacrity.virtio.rng import VirtioRng
    m = Machine(64 << 20)
    try:
        m.add_virtio_mmio(VirtioRng())
        with pytest.raises(NotImplementedError, match="virtio-rng"):
            run_selftest(m)
    finally:
        m.close()


def test_alacrity_run_guest_kvm(tmp_path):
    img = tmp_path / "disk.img"
    data = os.urandom(1 << 20)
    img.write_bytes(data)
    p = subprocess.run([sys.executable, "-m", "alacrity", "run", "--guest", "kvm", "--device",
                        f"blk:{img}", "--device", "blk:null", "--json"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["guest"] == "kvm" and r["status"] == 0 and len(r["devices"]) == 2
    assert all(d["ok"] for d in r["devices"]) and "blk: ok" in p.stderr
    assert img.read_bytes() == data
    p = subprocess.run([sys.executable, "-m", "alacrity", "run", "--guest", "kvm", "--device",
                        "rng"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("abi", ["virtio-split", "virtio-packed", "vbus"])
@pytest.mark.parametrize("notify,depth,rw", [("always", 1, "write"), ("mitigated", 8, "randwrite"),
                                            ("poll", 1, "randread")])
def test_bench_blk_guest_kvm(notify, depth, rw, abi, tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 << 20))
    p = subprocess.run([sys.executable, "-m", "alacrity", "bench", "blk", "--guest", "kvm",
                        "--abi", abi, "--notify", notify, "--depth", str(depth),
                        "--seconds", "0.5",
                        "--warmup", "0.2", "--image", str(img), "--rw", rw, "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["guest"] == "kvm" and r["kvm_mode"] in ("cpl3-poll", "cpl0")
    assert r["ops"] > 100 and r["errors"] == 0
    assert 0 < r["lat_us"]["p50"] <= r["lat_us"]["p99"]
    # doorbells are ioeventfds: a request never costs a userspace exit
    assert r["exits_per_op"] < 0.01
    if notify == "always":
        assert r["doorbells_per_op"] >= 0.9
        if abi != "vbus":       # vbus: completions travel as events on the bus's queue
            assert r["interrupts_per_op"] >= 0.9
    elif abi != "vbus" or notify == "poll":
        assert r["doorbells_per_op"] < 0.2 and r["interrupts_per_op"] < 0.05
    # the device saw exactly the doorbells the driver rang (eventfd counts can merge)
    assert r["counters"]["device"]["doorbells"] <= r["counters"]["guest"]["doorbells"] + 1
    # the device's own count of requests agrees (vbus counts signals, not requests)
    if abi != "vbus":
        assert r["counters"]["device"]["requests"] >= r["ops"]


def test_bench_guest_kvm_bad_input():
    p = subprocess.run([sys.executable, "-m", "alacrity", "bench", "blk", "--guest", "kvm",
                        "--bs", "131072"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("abi", ["virtio-split", "virtio-packed", "vbus"])
@pytest.mark.parametrize("mode,notify", [("stream", "mitigated"), ("pingpong", "always"),
                                         ("pingpong", "poll")])
def test_bench_net_guest_kvm(mode, notify, abi):
    p = subprocess.run([sys.executable, "-m", "alacrity", "bench", "net", "--guest", "kvm",
                        "--abi", abi, "--mode", mode, "--notify", notify, "--seconds", "0.5",
                        "--warmup", "0.2", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["guest"] == "kvm" and r["mode"] == mode and r["errors"] == 0
    assert r["ops"] > 100 and r["exits_per_op"] < 0.01
    core = r["counters"]["cores"][0]
    assert core["tx_frames"] == core["rx_frames"] >= r["ops"]     # every frame came back
    assert 0 < r["lat_us"]["p50"] <= r["lat_us"]["p99"]
    assert r["limit"]["ops_per_s"] > 0
    if mode == "pingpong" and notify == "always":
        # tx and rx kicks (venet: rx buffers need no doorbell, the device takes them)
        assert r["doorbells_per_op"] >= (0.9 if abi == "vbus" else 1.9)
    if notify == "poll":
        assert r["doorbells_per_op"] < 0.01 and r["interrupts_per_op"] < 0.01


def test_shootout_with_kvm_guests(tmp_path):
    out = tmp_path / "so"
    p = subprocess.run([sys.executable, "-m", "alacrity", "shootout", "--quick", "--guest",
                        "process,kvm", "--workloads", "blk-null-d32,net-pingpong", "--notify",
                        "mitigated", "--out", str(out), "--json"], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    kvm = [c for c in r["cells"] if c["guest"] == "kvm"]
    assert {(c["workload"], c["abi"]) for c in kvm} == {
        (w, a) for w in ("blk-null-d32", "net-pingpong")
        for a in ("virtio-split", "virtio-packed", "vbus")}
    assert all(c["status"] == "ok" for c in r["cells"])
    for c in kvm:
        assert c["metrics"]["exits_per_op"]["median"] < 0.01
    assert (out / "shootout.png").stat().st_size > 10_000


@pytest.mark.parametrize("abi", ["virtio-split", "vbus"])
@pytest.mark.parametrize("what", ["blk", "net"])
def test_bench_in_cpl0_mode_sleeps_on_interrupts(what, abi):
    """The benchmark loops of a VMX/SVM host (CPL0: halt until the device's interrupt),
    run here by asking for them (emulated on PVM, so slow: this checks the path)."""
    extra = ["--depth", "4"] if what == "blk" else ["--mode", "pingpong"]
    p = subprocess.run([sys.executable, "-m", "alacrity", "bench", what, "--guest", "kvm",
                        "--abi", abi, "--notify", "mitigated", "--seconds", "0.5",
                        "--warmup", "0.2", "--json", *extra], capture_output=True, text=True,
                       timeout=180, env={**os.environ, "ALACRITY_KVM_MODE": "cpl0"})
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["kvm_mode"] == "cpl0-irq" and r["errors"] == 0 and r["ops"] > 10
    if what == "blk":
        assert r["interrupts_per_op"] > 0           # it asked for them and slept on them
