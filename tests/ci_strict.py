"""CI mode: a test that would be skipped fails instead.

`.ci/run` sets ``CI=1`` and ``MSR_CI=1``; with either set (to anything but ``0``/``false``/empty),
every skip (``skipif``, ``pytest.skip``, ``importorskip``, at run or collection time) becomes a
failure naming the skip's reason, so a missing real component (Chromium, vLLM, a server binary,
shipped weights) can never let CI go green. Loaded from ``conftest.py`` via ``pytest_plugins``.
"""
from __future__ import annotations

import os

import pytest

CI_VARIABLES = ("CI", "MSR_CI")


def ci_mode() -> bool:
    """True when CI (or MSR_CI) is set to a true-ish value."""
    return any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no") for v in CI_VARIABLES)


def _reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return f"{longrepr[2]} ({longrepr[0]}:{longrepr[1]})"
    return str(longrepr)


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and ci_mode():
        report.outcome = "failed"
        report.longrepr = (f"CI mode ({'/'.join(CI_VARIABLES)} set): a skip is a failure, a real component "
                           f"is missing: {_reason(report.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ARG001
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # noqa: ARG001
    outcome = yield
    _fail_skip(outcome.get_result())
