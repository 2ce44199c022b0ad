"""What the interop tests share: tools that must exist in CI, hugepages for DPDK, testpmd,
and our `alacrity serve vhost-user` as a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

REQUIRE = os.environ.get("ALACRITY_REQUIRE_INTEROP") == "1"
PACKAGES = {"dpdk-testpmd": "dpdk dpdk-dev", "qemu-storage-daemon": "qemu-utils",
            "qemu-io": "qemu-utils", "qemu-img": "qemu-utils",
            "qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static",
            "cpio": "cpio", "apt-get": "apt", "dpkg": "dpkg", "ip": "iproute2"}


def missing(why: str) -> None:
    """Skip where tools may be absent; fail where CI says they are required."""
    if REQUIRE:
        pytest.fail(f"{why} (ALACRITY_REQUIRE_INTEROP=1: CI must provide it)")
    pytest.skip(why)


def need(*tools: str) -> None:
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        pkgs = sorted({PACKAGES.get(t, t) for t in absent})
        missing(f"missing {', '.join(absent)} (apt-get install {' '.join(pkgs)})")


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        missing(f"{what} needs root")


@contextmanager
def hugepages(pages: int = 512) -> Iterator[str]:
    """A hugetlbfs mount of our own, with at least `pages` 2 MiB pages reserved."""
    need_root("DPDK's hugepages")
    d = tempfile.mkdtemp(prefix="alacrity-huge-")
    nr = "/proc/sys/vm/nr_hugepages"
    with open(nr) as f:
        before = int(f.read())
    if before < pages:
        with open(nr, "w") as f:
            f.write(str(pages))
    p = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "nodev", d],
                       capture_output=True, text=True)
    if p.returncode:
        os.rmdir(d)
        missing(f"cannot mount hugetlbfs: {p.stderr.strip()}")
    try:
        with open(nr) as f:
            if int(f.read()) < pages // 2:
                missing(f"the kernel gave fewer than {pages // 2} hugepages")
        yield d
    finally:
        subprocess.run(["umount", d], capture_output=True)
        os.rmdir(d)


STATS = re.compile(r"Accumulated forward statistics for all ports.*?RX-packets:\s*(\d+).*?"
                   r"TX-packets:\s*(\d+)", re.S)


def run_testpmd(huge: str, prefix: str, vdev: str, fwd: str, *extra: str,
            main_lcore: int = 0) -> subprocess.Popen:
    """Start dpdk-testpmd (no PCI, our hugepages, one vdev); stop it with `stop_testpmd`."""
    return subprocess.Popen(
        ["dpdk-testpmd", "-l", "0-1", "--main-lcore", str(main_lcore), "--no-pci",
         "--single-file-segments", "--huge-dir", huge, "--file-prefix", prefix, "-m", "256",
         "--vdev", vdev, "--", f"--forward-mode={fwd}", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_testpmd(p: subprocess.Popen, timeout: float = 30) -> tuple[int, int, str]:
    """Press enter (testpmd's "Press enter to exit"); returns (rx, tx, output)."""
    try:
        out, _ = p.communicate("\n", timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        pytest.fail(f"dpdk-testpmd did not stop:\n{out[-3000:]}")
    m = STATS.search(out)
    assert m, f"no statistics from dpdk-testpmd:\n{out[-3000:]}"
    return int(m.group(1)), int(m.group(2)), out


class Served:
    """`alacrity serve vhost-user ...` as a subprocess; stop() returns its counters."""

    def __init__(self, sock: str, *args: str):
        self.sock = sock
        self.p = subprocess.Popen([sys.executable, "-m", "alacrity", "-v", "serve", "vhost-user",
                                   "--socket", sock, *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 20
        while not os.path.exists(sock):
            if self.p.poll() is not None or time.monotonic() > end:
                self.p.kill()
                pytest.fail(f"alacrity serve did not start: {self.p.communicate()[1]}")
            time.sleep(0.05)

    def stop(self) -> dict:
        self.p.send_signal(signal.SIGTERM)
        _, err = self.p.communicate(timeout=30)
        self.log = err
        assert self.p.returncode == 0, err
        line = [ln for ln in err.splitlines() if "stopped: " in ln][-1]
        return json.loads(line.split("stopped: ", 1)[1])

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.communicate()
