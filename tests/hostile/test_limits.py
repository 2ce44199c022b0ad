"""What a guest hands us is copied only after its size was checked: a huge transmit buffer
is the guest's error (dropped and counted), never a host allocation of its size."""

from __future__ import annotations

import tracemalloc

import pytest

from alacrity.bus import IrqLine
from alacrity.devices.console import ConsoleCore, FileChar
from alacrity.devices.net import LoopbackBackend, NetCore
from alacrity.memory import GuestMemory
from alacrity.virtio import spec
from alacrity.virtio.console import VirtioConsole
from alacrity.virtio.mmio import VirtioMmioDevice
from alacrity.virtio.net import VirtioNet
from tests.helpers import RawRing, mmio_bring_up

MiB = 1 << 20
HUGE = 24 * MiB


def serve_tx(model, qi: int, lens: list[int], tmp_path=None):
    """A guest that offers one device-readable buffer per length on queue qi; returns the
    device and the peak of Python allocations while the device served them."""
    mem = GuestMemory.create([(0, 32 * MiB)])
    irq = IrqLine(5)
    dev = VirtioMmioDevice(model, mem, irq)
    rings = [RawRing(mem, 8, base=0x10000 + 0x2000 * i) for i in range(model.num_queues)]
    mmio_bring_up(dev, spec.bit(spec.F_VERSION_1),
                  [(8, r.desc, r.avail, r.used) for r in rings])
    r = rings[qi]
    for i, n in enumerate(lens):
        r.set_desc(i, 0x100000, n)
        r.make_available(i)
    tracemalloc.start()
    try:
        dev.notify(qi)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    used = r.used_idx()
    irq.close()
    mem.close()
    return dev, peak, used


@pytest.mark.parametrize("n", [HUGE, 12 + 1514 + 1, 64 * 1024])
def test_virtio_net_huge_tx_buffer_is_dropped_without_a_copy(n):
    core = NetCore(LoopbackBackend())
    dev, peak, used = serve_tx(VirtioNet(core), 1, [n, n, 12 + 60])
    assert not dev.broken and used == 3                    # all three completed
    assert core.counters.tx_dropped == 2 and core.counters.tx_frames == 1
    assert peak < 2 * MiB, f"the host allocated {peak} bytes for a guest's buffer"


def test_virtio_console_output_is_written_from_guest_memory(tmp_path):
    out = tmp_path / "console.out"
    char = FileChar(str(out))
    try:
        dev, peak, used = serve_tx(VirtioConsole(ConsoleCore(char)), 1, [HUGE])
    finally:
        char.close()
    assert not dev.broken and used == 1
    assert out.stat().st_size == HUGE
    assert peak < 2 * MiB, f"the host allocated {peak} bytes for a guest's buffer"


@pytest.mark.parametrize("rtype", [11, 13])          # DISCARD, WRITE_ZEROES
def test_virtio_blk_huge_discard_is_refused_without_a_copy(tmp_path, rtype):
    import struct

    from alacrity.devices.block import BlockCore, FileBackend
    from alacrity.virtio.blk import VirtioBlk
    img = tmp_path / "disk"
    img.write_bytes(bytes(1 << 20))
    be = FileBackend(str(img))
    mem = GuestMemory.create([(0, 32 * MiB)])
    irq = IrqLine(5)
    try:
        dev = VirtioMmioDevice(VirtioBlk(BlockCore(be)), mem, irq)
        r = RawRing(mem, 8)
        mmio_bring_up(dev, spec.bit(spec.F_VERSION_1) | spec.bit(13) | spec.bit(14),
                      [(8, r.desc, r.avail, r.used)])
        mem.write(0x100000, struct.pack("<IIQ", rtype, 0, 0))
        # header, a 24 MiB "segment list", the status byte
        r.set_desc(0, 0x100000, 16, 1, 1)
        r.set_desc(1, 0x200000, HUGE, 1, 2)
        r.set_desc(2, 0x300, 1, 2)
        r.make_available(0)
        tracemalloc.start()
        try:
            dev.notify(0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert r.used_idx() == 1 and mem.read(0x300, 1) == b"\x01"   # IOERR
        assert peak < 2 * MiB, f"the host allocated {peak} bytes for a guest's request"
    finally:
        irq.close()
        mem.close()
        be.close()


# -- limits set on the command line and on a vhost-user server ------------------------------------
def test_cli_rejects_a_limit_below_one(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "alacrity", "run", "--device", "blk:null",
                        "--max-segments", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "max_segments" in r.stderr


def test_run_with_limits_a_guest_stays_within(tmp_path):
    """`alacrity run` with small limits: the drivers read QueueNumMax and seg_max and
    stay within them, so the self-test passes."""
    import json
    import subprocess
    import sys
    img = tmp_path / "disk"
    img.write_bytes(bytes(1 << 20))
    r = subprocess.run([sys.executable, "-m", "alacrity", "run", "--device", f"blk:{img}",
                        "--device", "net:loopback", "--max-queue-size", "16",
                        "--max-segments", "8", "--max-request-bytes", "64k", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(d["ok"] for d in json.loads(r.stdout)["devices"])


def test_vhost_user_ring_above_the_limit_closes_the_connection(tmp_path):
    from alacrity.devices.block import BlockCore, NullBackend
    from alacrity.iothread import IoThread
    from alacrity.limits import Limits
    from alacrity.vhost_user import protocol as P
    from alacrity.vhost_user.backend import VhostUserDevice, VhostUserServer
    from alacrity.virtio.blk import VirtioBlk
    from tests.helpers import until
    from tests.test_vhost_user import OWNER, closed_by_peer, raw_client, send_fds
    io = IoThread(0.0).start()
    dev = VhostUserDevice(VirtioBlk(BlockCore(NullBackend())), io,
                          limits=Limits(max_queue_size=16))
    srv = VhostUserServer(str(tmp_path / "sock"), dev, io)
    try:
        s = raw_client(srv.path)
        send_fds(s, OWNER + P.encode(P.Req.SET_VRING_NUM, P.VRING_STATE.pack(0, 16)), [])
        send_fds(s, P.encode(P.Req.SET_VRING_NUM, P.VRING_STATE.pack(0, 32)), [])
        assert closed_by_peer(s)
        s.close()
        until(lambda: srv.protocol_errors == 1)
        assert "(1..16)" in srv.last_error
    finally:
        srv.close()
        io.close()
