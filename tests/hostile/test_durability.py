"""No lost acknowledged writes: a guest writes and FLUSHes; once a FLUSH has completed,
the backend process is killed with SIGKILL; every write completed before that FLUSH must be
in the image. For virtio-blk and vblock (process guests) and virtio-blk over vhost-user.
Writes after the last completed FLUSH may be lost (README "Durability")."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from alacrity.guest.drivers.virtio_blk import VirtioBlkDriver
from alacrity.guest.programs import find_device
from alacrity.vhost_user.frontend import VhostUserGuest
from alacrity.virtio import spec
from tests.hostile.durability_host import writes
from tests.interop.tools import Served

IMAGE = 4 << 20
TRIALS = 4


def expected(image_before: bytes, seed: int, acked: int) -> bytearray:
    """The image after the first `acked` writes of the replayed sequence."""
    img = bytearray(image_before)
    for i, (sector, data) in zip(range(acked), writes(seed, IMAGE // 512)):
        img[sector * 512:sector * 512 + len(data)] = data
    return img


def fresh_image(path: str) -> bytes:
    before = os.urandom(IMAGE)
    with open(path, "wb") as f:
        f.write(before)
    return before


def check(path: str, before: bytes, seed: int, acked: int) -> None:
    """Every acknowledged write is there. Later writes (not flushed) may or may not be:
    only bytes no later write touched are compared with the acknowledged state."""
    want = expected(before, seed, acked)
    later = bytearray(IMAGE // 512)            # sectors a later (unacknowledged) write touched
    for i, (sector, data) in enumerate(writes(seed, IMAGE // 512)):
        if i < acked:
            continue
        if i >= acked + 64:                    # the guest cannot have gone further
            break
        for s in range(sector, sector + len(data) // 512):
            later[s] = 1
    got = open(path, "rb").read()
    for s in range(IMAGE // 512):
        if not later[s]:
            assert got[s * 512:(s + 1) * 512] == want[s * 512:(s + 1) * 512], \
                f"sector {s}: an acknowledged write is missing after {acked} writes"


@pytest.mark.parametrize("abi", ["virtio-split", "vbus"])
def test_acknowledged_writes_survive_kill_9_process_guest(tmp_path, abi):
    rng = random.Random(abi)
    for trial in range(TRIALS):
        path = str(tmp_path / f"disk{trial}")
        before = fresh_image(path)
        seed = rng.randrange(1 << 30)
        target = rng.randint(1, 12)             # FLUSHes to wait for before the kill
        p = subprocess.Popen([sys.executable, "-m", "tests.hostile.durability_host", path,
                              abi, str(seed)], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
        acked = 0
        try:
            deadline = time.monotonic() + 60
            while acked < 3 * target:
                line = p.stdout.readline()
                assert line, f"the host ended early (exit {p.poll()})"
                acked = int(line.split()[1])
                assert time.monotonic() < deadline
        finally:
            os.killpg(p.pid, signal.SIGKILL)     # the host and its guest, at once
            p.wait()
        # acknowledgements printed before the kill that we had not read yet count too: the
        # guest is then at most a few writes past the last one (`check` allows 64)
        for line in p.stdout.read().splitlines():
            acked = max(acked, int(line.split()[1]))
        check(path, before, seed, acked)


def test_acknowledged_writes_survive_kill_9_vhost_user(tmp_path):
    rng = random.Random(6)
    for trial in range(TRIALS):
        path = str(tmp_path / f"disk{trial}")
        before = fresh_image(path)
        seed = rng.randrange(1 << 30)
        served = Served(str(tmp_path / f"s{trial}"), "--device", "blk", "--image", path)
        g = VhostUserGuest(served.sock, spec.ID_BLOCK, 16 << 20)
        acked = 0
        try:
            drv = VirtioBlkDriver(find_device(g, spec.ID_BLOCK), depth=1, max_bytes=4096)
            stop_after = rng.randint(3, 40)
            for i, (sector, data) in enumerate(writes(seed, IMAGE // 512)):
                drv.write(sector, data)
                if (i + 1) % 3 == 0:
                    drv.flush()
                    acked = i + 1
                if i + 1 >= stop_after:
                    break
            # one more write the device may or may not have done: then SIGKILL
            sector, data = next(w for j, w in enumerate(writes(seed, IMAGE // 512))
                                if j == stop_after)
            drv.write(sector, data)
            served.p.send_signal(signal.SIGKILL)
            served.p.wait()
        finally:
            served.kill()
            g.close()
        check(path, before, seed, acked)
