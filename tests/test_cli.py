"""The `alacrity` command: bench blk end to end, and one clear line + exit 2 on bad input."""

import json
import subprocess
import sys

import pytest


def alacrity(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "alacrity", *args], capture_output=True,
                          text=True, timeout=timeout)


REQUIRED = {"ops_per_s", "bytes_per_s", "lat_us", "doorbells_per_op", "interrupts_per_op",
            "abi", "guest", "notify", "limit", "ratio_to_limit"}


@pytest.mark.parametrize("notify,depth", [("always", 1), ("mitigated", 8), ("poll", 1)])
def test_bench_blk_json_null(notify, depth):
    p = alacrity("bench", "blk", "--seconds", "0.5", "--warmup", "0.2", "--depth", str(depth),
                 "--notify", notify, "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert REQUIRED <= r.keys()
    assert (r["abi"], r["guest"], r["notify"]) == ("virtio-split", "process", notify)
    assert r["ops"] > 100 and r["errors"] == 0
    assert r["bytes_per_s"] == pytest.approx(r["ops_per_s"] * 4096, rel=1e-3)
    assert 0 < r["lat_us"]["p50"] <= r["lat_us"]["p99"]
    assert r["limit"]["ops_per_s"] > 0 and r["limit"]["bytes_per_s"] > 0
    assert r["ratio_to_limit"] == pytest.approx(r["ops_per_s"] / r["limit"]["ops_per_s"], rel=1e-2)
    if notify == "always":
        assert r["doorbells_per_op"] >= 0.9          # every request rang
        assert r["interrupts_per_op"] >= 0.9
    if notify == "poll":
        assert r["doorbells_per_op"] < 0.05 and r["interrupts_per_op"] < 0.05


def test_bench_blk_on_a_file_with_a_table(tmp_path):
    img = tmp_path / "img"
    img.write_bytes(bytes(8 << 20))
    p = alacrity("bench", "blk", "--image", str(img), "--rw", "randread", "--bs", "64k",
                 "--depth", "4", "--seconds", "0.5", "--warmup", "0.1")
    assert p.returncode == 0, p.stderr
    assert "ops/s" in p.stdout and "ratio to limit" in p.stdout and "preadv" in p.stdout


@pytest.mark.parametrize("args,needle", [
    (["--bs", "1000"], "--bs"),
    (["--bs", "banana"], "--bs"),
    (["--depth", "0"], "--depth"),
    (["--depth", "200"], "--depth"),
    (["--rw", "sideways"], "--rw"),
    (["--notify", "sometimes"], "--notify"),
    (["--abi", "vbus"], "--abi"),
    (["--abi", "virtio-packed", "--depth", "100"], "--depth"),
    (["--guest", "kvm"], "--guest"),
    (["--seconds", "-1"], "--seconds"),
    (["--image", "/nonexistent/disk.img"], "no such file"),
    (["--queue-size", "100"], "--queue-size"),
    (["--frobnicate"], "unrecognized"),
])
def test_bad_options_one_line_exit_2(args, needle):
    p = alacrity("bench", "blk", *args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert needle in lines[0] and lines[0].startswith("alacrity")
    assert p.stdout == ""


def test_missing_subcommand_and_help():
    p = alacrity()
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    h = alacrity("bench", "blk", "--help")
    assert h.returncode == 0 and "--notify" in h.stdout
