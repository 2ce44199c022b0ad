"""The `alacrity` command: bench blk end to end, and one clear line + exit 2 on bad input."""

import json
import os
import subprocess
import sys

import pytest


def alacrity(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "alacrity", *args], capture_output=True,
                          text=True, timeout=timeout)


REQUIRED = {"ops_per_s", "bytes_per_s", "lat_us", "doorbells_per_op", "interrupts_per_op",
            "abi", "guest", "notify", "limit", "ratio_to_limit"}


@pytest.mark.parametrize("abi", ["virtio-split", "vbus"])
@pytest.mark.parametrize("notify,depth", [("always", 1), ("mitigated", 8), ("poll", 1)])
def test_bench_blk_json_null(abi, notify, depth):
    p = alacrity("bench", "blk", "--abi", abi, "--seconds", "0.5", "--warmup", "0.2",
                 "--depth", str(depth), "--notify", notify, "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert REQUIRED <= r.keys()
    assert (r["abi"], r["guest"], r["notify"]) == (abi, "process", notify)
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
    (["--abi", "vhost-user"], "--abi"),
    (["--abi", "vbus", "--depth", "300"], "--depth"),
    (["--abi", "virtio-packed", "--depth", "100"], "--depth"),
    (["--guest", "xen"], "--guest"),
    (["--guest", "kvm", "--bs", "131072"], "--guest kvm"),
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


NET_REQUIRED = {"pps", "bytes_per_s", "lat_us", "doorbells_per_op", "interrupts_per_op",
                "limit", "ratio_to_limit", "abi", "guest", "notify", "mode", "backend"}


@pytest.mark.parametrize("abi,mode,backend,notify", [
    ("virtio-split", "stream", "loopback", "mitigated"),
    ("virtio-packed", "stream", "pair", "always"),
    ("virtio-split", "pingpong", "pair", "poll"),
    ("virtio-packed", "pingpong", "loopback", "mitigated"),
    ("vbus", "stream", "pair", "mitigated"),
    ("vbus", "stream", "loopback", "always"),
    ("vbus", "pingpong", "loopback", "poll"),
    ("vbus", "pingpong", "pair", "mitigated"),
])
def test_bench_net_json(abi, mode, backend, notify):
    p = alacrity("bench", "net", "--abi", abi, "--mode", mode, "--backend", backend,
                 "--notify", notify, "--seconds", "0.5", "--warmup", "0.2", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert NET_REQUIRED <= r.keys()
    assert (r["abi"], r["mode"], r["backend"], r["notify"]) == (abi, mode, backend, notify)
    assert r["pps"] > 100 and r["errors"] == 0
    assert r["lost"] == 0                      # our loopback and pair lose nothing
    assert r["bytes_per_s"] == pytest.approx(r["pps"] * 64, rel=1e-3)
    assert 0 < r["lat_us"]["p50"] <= r["lat_us"]["p99"]
    assert r["limit"]["ops_per_s"] > 0
    assert r["ratio_to_limit"] == pytest.approx(r["pps"] / r["limit"]["ops_per_s"], rel=1e-2)
    if mode == "pingpong":
        trips = 2 if backend == "pair" else 1
        assert f"{trips} x" in r["limit"]["what"]
        kind = "shared-memory" if notify == "poll" else "eventfd"
        assert kind in r["limit"]["what"]
    for core in r["counters"]["cores"]:
        assert core["rx_dropped"] == 0


def test_bench_blk_packed():
    p = alacrity("bench", "blk", "--abi", "virtio-packed", "--depth", "4", "--seconds", "0.5",
                 "--warmup", "0.1", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["abi"] == "virtio-packed" and r["ops"] > 100 and r["errors"] == 0


@pytest.mark.parametrize("args,needle", [
    (["bench", "net", "--size", "5"], "--size"),
    (["bench", "net", "--mode", "flood"], "--mode"),
    (["bench", "net", "--backend", "tap:x"], "--backend"),
    (["bench", "net", "--abi", "virtio-split", "--queue-size", "100"], "--queue-size"),
    (["run", "--device", "floppy:a"], "--device"),
    (["run", "--device", "blk:/nonexistent/img"], "no such file"),
    (["run", "--device", "net:tap:alacrity-none"], "no such network device"),
    (["run", "--device", "net:loopback", "--ip", "300.1.1.1"], "--ip"),
    (["run"], "--device"),
])
def test_bad_options_everywhere_one_line_exit_2(args, needle):
    p = alacrity(*args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_run_selftest_all_devices(tmp_path):
    img = tmp_path / "img"
    data = os.urandom(1 << 20)
    img.write_bytes(data)
    log = tmp_path / "console.log"
    p = alacrity("run", "--device", f"blk:{img}", "--device", "net:pair", "--device",
                 f"console:file:{log}", "--device", "rng", "--json")
    assert p.returncode == 0, p.stderr
    kinds = [d["kind"] for d in json.loads(p.stdout)["devices"]]
    assert kinds == ["blk", "net", "net", "console", "rng"]
    assert img.read_bytes() == data                      # the self-test harms nothing
    assert b"self-test" in log.read_bytes()
