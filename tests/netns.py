"""Network namespaces for tests: made fresh, removed in every case."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from typing import Iterator

import pytest

REQUIRE = os.environ.get("ALACRITY_REQUIRE_INTEROP") == "1"


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        msg = f"missing tools: {', '.join(missing)} (install iproute2 and iputils-ping)"
        if REQUIRE:
            pytest.fail(msg)
        pytest.skip(msg)


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check,
                          timeout=timeout)


@contextmanager
def netns(name: str) -> Iterator[str]:
    need_tools("ip")
    p = sh("ip", "netns", "add", name, check=False)
    if p.returncode != 0:
        msg = f"ip netns add refused here: {p.stderr.strip()}"
        if REQUIRE and os.geteuid() == 0:
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)
