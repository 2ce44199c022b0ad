"""`python -m alacrity.fuzz`: run one fuzz target under atheris, list them, or replay inputs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import types


def _instrument(atheris) -> int:
    """Add coverage instrumentation to every function and method defined in alacrity's
    loaded modules (the fuzz harness itself excepted)."""
    done = 0

    def one(f: object) -> None:
        nonlocal done
        if isinstance(f, types.FunctionType):
            atheris.instrument_func(f)
            done += 1

    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] != "alacrity" or name.startswith("alacrity.fuzz"):
            continue
        for obj in list(vars(mod).values()):
            if getattr(obj, "__module__", None) != name:
                continue
            if isinstance(obj, type):
                for a in vars(obj).values():
                    if isinstance(a, (staticmethod, classmethod)):
                        a = a.__func__
                    if isinstance(a, property):
                        one(a.fget)
                        one(a.fset)
                    else:
                        one(a)
            else:
                one(obj)
    return done


def main(argv: list[str] | None = None) -> int:
    from alacrity.fuzz.seeds import SEEDS
    from alacrity.fuzz.targets import TARGETS

    p = argparse.ArgumentParser(prog="python -m alacrity.fuzz",
                                description="Fuzz a guest-facing parser with atheris "
                                            "(coverage-guided; crashes are saved as files).")
    p.add_argument("target", nargs="?", help="what to fuzz (see --list)")
    p.add_argument("--list", action="store_true", help="print the target names, one per line")
    p.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    p.add_argument("--corpus", help="a directory of inputs to start from and to grow "
                                    "(default: a new temporary directory); the target's "
                                    "seeds are added to it")
    p.add_argument("--artifacts", default=".",
                   help="where a crashing input is saved (default: the current directory)")
    p.add_argument("--replay", nargs="+", metavar="FILE",
                   help="run these inputs once each (a saved crash, a corpus) and stop")
    p.add_argument("--seed", type=int, help="libFuzzer's random seed (default: random)")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(TARGETS))
        return 0
    if args.target not in TARGETS:
        sys.stderr.write(f"alacrity.fuzz: unknown target {args.target!r}; "
                         f"one of: {', '.join(TARGETS)}\n")
        return 2
    fn = TARGETS[args.target]
    logging.disable(logging.CRITICAL)     # a guest error's log line, 10^5 times a second
    if args.replay:
        for path in args.replay:
            with open(path, "rb") as f:
                fn(f.read())
            print(f"{path}: ok")
        return 0
    try:
        import atheris
    except ImportError:
        sys.stderr.write("alacrity.fuzz: atheris is not installed (pip install atheris, or "
                         "pip install '.[test]')\n")
        return 2
    if args.seconds <= 0:
        sys.stderr.write("alacrity.fuzz: --seconds must be positive\n")
        return 2
    # load what the target exercises (its imports run once), instrument alacrity's own
    # functions (all of Python's would take 16 s), then hand over to libFuzzer
    for prime in (b"", bytes(64)):
        fn(prime)
    _instrument(atheris)
    lf = [sys.argv[0], f"-max_total_time={max(1, round(args.seconds))}",
          "-print_final_stats=1", f"-artifact_prefix={os.path.join(args.artifacts, '')}",
          "-timeout=5", "-rss_limit_mb=4096"]
    if args.seed is not None:
        lf.append(f"-seed={args.seed}")
    # the corpus starts from well-formed inputs (alacrity/fuzz/seeds.py) and grows there
    corpus = args.corpus or tempfile.mkdtemp(prefix=f"alacrity-fuzz-{args.target}-")
    os.makedirs(corpus, exist_ok=True)
    for i, seed in enumerate(SEEDS[args.target]()):
        path = os.path.join(corpus, f"seed-{i}")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(seed)
    lf.append(corpus)
    sys.stderr.write(f"alacrity.fuzz: {args.target} for {args.seconds:g} s, corpus in "
                     f"{corpus} (libFuzzer prints progress below)\n")
    sys.stderr.flush()
    started = time.monotonic()
    atheris.Setup(lf, fn)
    atheris.Fuzz()          # exits the process: 0 when the time is up, 1 on a crash
    return 0 if time.monotonic() >= started else 1


if __name__ == "__main__":
    sys.exit(main())
