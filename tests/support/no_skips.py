"""A skipped or xfailed test is a failed one in this suite: a missing tool, module or
service, or a behaviour known to be broken, must fail the run rather than pass unnoticed
(install what is missing). Registered by `tests/conftest.py`."""

from __future__ import annotations

from collections.abc import Generator

import pytest


def _failed(report: pytest.TestReport | pytest.CollectReport, what: str) -> None:
    longrepr = report.longrepr
    skipped = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)  # (path, line, why)
    reason = getattr(report, "wasxfail", "") or skipped
    report.outcome = "failed"
    report.longrepr = f"{what} is a failure in this suite: {reason}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if hasattr(report, "wasxfail"):
        _failed(report, "an xfail marker")
    elif report.skipped:
        _failed(report, "a skip")
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    if report.skipped:
        _failed(report, "a skipped module")
    return report
