"""`alacrity shootout`: a reduced quick matrix end to end (results.json against the schema
kept in the repo, the PNG read back), a failing cell kept and shown, Ctrl-C leaving no
child process and no scratch file behind, and bad options."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from alacrity.bench import shootout as so
from alacrity.bench.plot import figure_size, plot
from alacrity.bench.report import shootout_table

SCHEMA = Path(__file__).resolve().parent.parent / "alacrity" / "bench" / "shootout.schema.json"


def no_nan(text):
    def bad(name):
        raise AssertionError(f"{name} in results.json")
    return json.loads(text, parse_constant=bad)


def validate(results):
    import jsonschema          # in the test extra: CI has it
    jsonschema.validate(results, json.loads(SCHEMA.read_text()))


def png_size(path):
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        return im.size


def test_quick_reduced_matrix(tmp_path):
    scratch_dir = tmp_path / "tmp"
    scratch_dir.mkdir()
    out = tmp_path / "out"
    env = dict(os.environ, TMPDIR=str(scratch_dir))
    p = subprocess.run([sys.executable, "-m", "alacrity", "shootout", "--quick",
                        "--abi", "virtio-split,virtio-packed,vbus", "--notify", "mitigated,poll",
                        "--workloads", "blk-null-d32,blk-file-64k-seq,net-pingpong",
                        "--out", str(out), "--low-latency", "--json"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    printed = no_nan(p.stdout)
    results = no_nan((out / "results.json").read_text())
    assert printed == results
    validate(results)
    assert results["complete"] and not results["interrupted"]
    cells = results["cells"]
    assert len(cells) == 3 * 2 * 3                      # every cell present
    assert {(c["workload"], c["notify"], c["abi"]) for c in cells} == {
        (w, n, a) for w in ("blk-null-d32", "blk-file-64k-seq", "net-pingpong")
        for n in ("mitigated", "poll") for a in ("virtio-split", "virtio-packed", "vbus")}
    for c in cells:
        assert c["status"] == "ok", c
        assert c["metrics"]["ops_per_s"]["median"] > 0 and c["limit"]["ops_per_s"] > 0
    # the limits measured in this run: preadv, the null loop, both round trips
    assert {"preadv_bytes_per_s", "null_loop_ops_per_s", "eventfd_rtt_us", "shm_rtt_us"} <= \
        results["limits"].keys()
    ll = results["machine"]["low_latency"]
    assert ll["requested"] is True and ll["why"]
    if os.access("/dev/cpu_dma_latency", os.W_OK):
        assert ll["effective"] is True
    assert png_size(out / "shootout.png") == figure_size(results)
    assert list(scratch_dir.iterdir()) == []            # the scratch image is gone


def test_a_failing_cell_is_kept_and_shown(tmp_path, monkeypatch):
    real = so.run_one

    def flaky(cfg, workload, notify, abi, guest, scratch, tick=None):
        if abi == "vbus":
            raise RuntimeError("vbus went sideways\nsecond line")
        return real(cfg, workload, notify, abi, guest, scratch, tick)

    monkeypatch.setattr(so, "run_one", flaky)
    cfg = so.Shootout.quick_config(abis=("virtio-split", "vbus"), notify=("mitigated",),
                                   workloads=("blk-null-d1",), out=str(tmp_path), repeat=2)
    results = so.run(cfg)
    validate(results)
    by_abi = {c["abi"]: c for c in results["cells"]}
    assert by_abi["virtio-split"]["status"] == "ok" and by_abi["virtio-split"]["runs"] == 2
    assert by_abi["vbus"]["status"] == "failed"
    assert by_abi["vbus"]["errors"] == ["RuntimeError: vbus went sideways"] * 2
    assert results["complete"]                          # measured or failed: nothing missing
    from rich.console import Console
    console = Console(record=True, width=200)
    console.print(shootout_table(results))
    assert "failed" in console.export_text()
    png = plot(results, str(tmp_path / "p.png"))
    assert png_size(png) == figure_size(results)


def descendants_with(marker):
    """Processes whose environment carries `marker` (the shootout and anything it started)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_ctrl_c_leaves_no_children_and_no_scratch(tmp_path):
    scratch_dir = tmp_path / "tmp"
    scratch_dir.mkdir()
    out = tmp_path / "out"
    marker = f"ALACRITY_TEST_MARK={uuid.uuid4().hex}"
    key, value = marker.split("=")
    env = dict(os.environ, TMPDIR=str(scratch_dir), **{key: value})
    proc = subprocess.Popen([sys.executable, "-m", "alacrity", "shootout", "--quick",
                             "--workloads", "blk-file-64k-seq,net-pingpong", "--repeat", "3",
                             "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # wait until a few cells are measured and a guest is running
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            try:
                r = json.loads((out / "results.json").read_text())
            except (OSError, ValueError):
                r = None
            if r and sum(c["status"] == "ok" for c in r["cells"]) >= 3 \
                    and len(descendants_with(marker)) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    results = no_nan((out / "results.json").read_text())
    validate(results)
    assert results["interrupted"] and not results["complete"]
    statuses = [c["status"] for c in results["cells"]]
    assert statuses.count("ok") >= 3 and "not-run" in statuses
    assert (out / "shootout.png").exists()
    time.sleep(0.2)
    assert descendants_with(marker) == []                # no guest process left behind
    assert list(scratch_dir.iterdir()) == []             # no scratch image left behind


@pytest.mark.parametrize("args,needle", [
    (["--abi", "virtio-split,vhost"], "--abi"),
    (["--notify", ""], "--notify"),
    (["--guest", "xen"], "not available yet"),
    (["--workloads", "blk-tape"], "--workloads"),
    (["--repeat", "0"], "--repeat"),
    (["--seconds", "-2"], "--seconds"),
])
def test_bad_options_one_line_exit_2(args, needle):
    p = subprocess.run([sys.executable, "-m", "alacrity", "shootout", *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and p.stdout == ""
