"""Suite-wide rules: where /dev/kvm exists and CI asks for everything
(ALACRITY_REQUIRE_INTEROP=1), a skipped KVM test fails the run."""

from __future__ import annotations

import os

import pytest

_kvm_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "tests/kvm/" in report.nodeid.replace(os.sep, "/"):
        _kvm_skipped.append(f"{report.nodeid}: {report.longrepr}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if (_kvm_skipped and os.path.exists("/dev/kvm")
            and os.environ.get("ALACRITY_REQUIRE_INTEROP") == "1"):
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"FAILED: /dev/kvm exists but {len(_kvm_skipped)} KVM tests were "
                          f"skipped:", red=True)
            for line in _kvm_skipped:
                tr.write_line(f"  {line}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
