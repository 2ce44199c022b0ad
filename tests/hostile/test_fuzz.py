"""The fuzzers: `python -m alacrity.fuzz` runs each atheris target for a short, bounded time
(CI's budget), saved crash inputs are replayed as corpus tests, and hypothesis drives the
same targets, plus a structured vhost-user message-stream property.

The number of executions each target reached is printed (`-s` shows it; the closing note
and README quote it)."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alacrity
from alacrity.fuzz.seeds import SEEDS
from alacrity.fuzz.targets import TARGETS
from alacrity.vhost_user import protocol as P
from alacrity.virtio import spec

SECONDS = float(os.environ.get("ALACRITY_FUZZ_SECONDS", "5"))
CORPUS = Path(__file__).parent / "fuzz_corpus"


def atheris_or_skip() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        if os.environ.get("ALACRITY_REQUIRE_INTEROP") == "1":
            pytest.fail("atheris is not installed (it is in the test extra: pip install '.[test]')")
        pytest.skip("atheris is not installed")


ROOT = str(Path(alacrity.__file__).resolve().parent.parent)   # the alacrity under test


def fuzz(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "alacrity.fuzz", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_list_prints_one_target_per_line(tmp_path):
    r = fuzz("--list", cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout.split() == list(TARGETS)
    assert set(TARGETS) >= {"split", "packed", "ioq", "vbus-bridge", "venet", "vhost-user"}


def test_unknown_target_is_a_usage_error(tmp_path):
    r = fuzz("nosuch", "--seconds", "1", cwd=tmp_path)
    assert r.returncode == 2 and "unknown target" in r.stderr


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_target_runs_clean(tmp_path, target):
    """Each target under atheris for SECONDS: no crash, and it really executed inputs."""
    atheris_or_skip()
    r = fuzz(target, "--seconds", str(SECONDS), "--seed", "1", "--corpus", str(tmp_path / "c"),
             "--artifacts", str(tmp_path), cwd=tmp_path, timeout=SECONDS + 120)
    crashes = list(tmp_path.glob("crash-*")) + list(tmp_path.glob("timeout-*"))
    assert r.returncode == 0 and not crashes, \
        f"{target} crashed (input saved as {crashes}):\n{r.stderr[-3000:]}"
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", r.stderr)
    assert m, r.stderr[-2000:]
    runs = int(m.group(1))
    print(f"\nfuzz {target}: {runs} executions in {SECONDS:g} s")
    assert runs >= 1000, f"{target}: only {runs} executions"


def corpus_cases():
    for target, seeds in SEEDS.items():
        for i, data in enumerate(seeds()):
            yield pytest.param(target, data, id=f"{target}/seed-{i}")
    for target in TARGETS:
        d = CORPUS / target
        if d.is_dir():
            for f in sorted(d.iterdir()):
                yield pytest.param(target, f.read_bytes(), id=f"{target}/{f.name}")


@pytest.mark.parametrize("target,data", list(corpus_cases()))
def test_seeds_and_saved_inputs_replay_clean(target, data):
    """The seeds, and inputs that once crashed a target (fixed since), run clean."""
    TARGETS[target](data)


def test_the_bridge_seed_reaches_the_devices():
    """The bridge seed is a whole session: negotiate, register the event queue, open
    vblock, register its queue, ring its doorbell (a request is served), open venet, call
    it, and the same call as a fastcall."""
    from alacrity.fuzz import targets
    TARGETS["vbus-bridge"](b"")                       # the bus exists from here on
    bridge = targets._bus.bridge
    before = bridge.devices[1].requests
    TARGETS["vbus-bridge"](SEEDS["vbus-bridge"]()[0])
    assert bridge.negotiated and bridge.eventq is not None and len(bridge.opened) == 2
    assert bridge.devices[1].requests == before + 1 and 0 in bridge.fastcalls


def test_replay_command(tmp_path):
    f = tmp_path / "input"
    f.write_bytes(b"\x01" + bytes(100))
    r = fuzz("split", "--replay", str(f), cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout


# -- hypothesis over the same parsers ------------------------------------------------------------
FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@FAST
@given(st.binary(max_size=2048))
def test_property_ioq(data):
    TARGETS["ioq"](data)


@FAST
@given(st.binary(max_size=2048))
def test_property_venet_tx(data):
    TARGETS["venet"](data)


@FAST
@given(st.binary(max_size=2048))
def test_property_vbus_bridge(data):
    TARGETS["vbus-bridge"](data)


R = P.Req
_SIZES = {R.SET_FEATURES: 8, R.SET_PROTOCOL_FEATURES: 8, R.SET_VRING_NUM: 8,
          R.SET_VRING_BASE: 8, R.GET_VRING_BASE: 8, R.SET_VRING_ENABLE: 8,
          R.SET_VRING_ADDR: P.VRING_ADDR.size, R.SET_VRING_KICK: 8, R.SET_VRING_CALL: 8,
          R.SET_VRING_ERR: 8, R.SET_MEM_TABLE: P.MEM_HDR.size + P.MEM_REGION.size,
          R.GET_CONFIG: 12 + 8, R.SET_CONFIG: 12 + 8}


@st.composite
def messages(draw):
    """One message: mostly a known request with a payload of the right size and plausible
    numbers (small ring indexes and sizes, addresses near each other), sometimes anything."""
    request = draw(st.sampled_from(list(R)) | st.integers(0, 60))
    size = _SIZES.get(request, 0)
    if draw(st.booleans()) and size:
        small = st.integers(0, 4) | st.integers(0, 1 << 16) | st.integers(0, (1 << 64) - 1)
        words = [draw(small) for _ in range((size + 7) // 8)]
        payload = b"".join(struct.pack("<Q", w & ((1 << 64) - 1)) for w in words)[:size]
    else:
        payload = draw(st.binary(max_size=size + 16))
    flags = draw(st.sampled_from([P.VERSION, P.VERSION | P.FLAG_NEED_REPLY]) | st.integers(0, 15))
    nfds = draw(st.integers(0, 2))
    return request, flags, payload, nfds


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(messages(), max_size=12), st.integers(1, 64), st.booleans())
def test_property_vhost_user_message_streams(msgs, chunk, owner_first):
    """Any stream of messages, cut into any chunks: the session answers or raises
    ProtocolError (the server then closes the connection); nothing else escapes."""
    session = P.BackendSession(
        features=spec.bit(spec.F_VERSION_1) | spec.bit(spec.F_RING_PACKED)
        | spec.bit(spec.F_EVENT_IDX), protocol_features=P.bit(P.PF.MQ) | P.bit(P.PF.REPLY_ACK)
        | P.bit(P.PF.CONFIG), num_queues=2, queue_max=256)
    reader = P.Reader()
    stream = b""
    fd_at: list[tuple[int, int]] = []
    if owner_first:
        stream += P.encode(R.SET_OWNER)
    for request, flags, payload, nfds in msgs:
        stream += P.HEADER.pack(request, flags, len(payload)) + payload
        fd_at.append((len(stream), nfds))
    try:
        for pos in range(0, len(stream), chunk):
            end = min(pos + chunk, len(stream))
            fds = [1000 + i for at, n in fd_at if pos < at <= end for i in range(n)]
            for m in reader.feed(stream[pos:end], fds):
                for ev in session.receive(m):
                    assert ev is not None
    except P.ProtocolError as e:
        assert str(e)
    reader.fds.clear()
