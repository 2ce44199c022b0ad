"""Fuzzing alacrity's guest-facing parsers with atheris (libFuzzer for Python).

    python -m alacrity.fuzz --list
    python -m alacrity.fuzz TARGET --seconds 60 [--corpus DIR] [--jobs N]
    python -m alacrity.fuzz TARGET --replay FILE...

The targets live in `alacrity.fuzz.targets`; SECURITY.md says what each one checks.
"""

from alacrity.fuzz.targets import TARGETS

__all__ = ["TARGETS"]
