"""The suite's own rules: every form of skip and xfail fails it
(`tests/support/no_skips.py`); every test module is in exactly one group
(`tests/support/groups.py`), a registered marker the README says how to run."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.support.groups import GROUP_OF, GROUPS

REPO = Path(__file__).resolve().parent.parent

pytest_plugins = ["pytester"]

FORMS = """
import pytest

def test_skip():
    pytest.skip("a tool is missing")

@pytest.mark.skip(reason="later")
def test_skip_marker():
    pass

@pytest.mark.skipif(True, reason="no accelerator")
def test_skipif():
    pass

@pytest.mark.xfail(reason="known to be broken")
def test_xfail():
    assert False

@pytest.mark.xfail(reason="known to be broken")
def test_xpass():
    pass

def test_plain():
    pass
"""
MODULE_SKIP = """
import pytest

pytest.importorskip("a_module_that_is_not_installed")

def test_never_collected():
    pass
"""


def test_skips_and_xfails_fail(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_forms=FORMS, test_module_skip=MODULE_SKIP)
    result = pytester.runpytest_inprocess(
        "-p", "tests.support.no_skips", "--continue-on-collection-errors"
    )
    # Skips in a test's body and xfails fail its call; skip markers fail its setup (an
    # error); a module skipped as it is imported fails its collection (an error).
    result.assert_outcomes(passed=1, failed=3, errors=3)
    result.stdout.fnmatch_lines_random(
        [
            "a skip is a failure in this suite: Skipped: a tool is missing",
            "a skip is a failure in this suite: Skipped: later",
            "a skip is a failure in this suite: Skipped: no accelerator",
            "an xfail marker is a failure in this suite: known to be broken",
            "a skipped module is a failure in this suite: *could not import*",
        ]
    )


def test_this_suite_runs_with_both_rules(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.has_plugin("tests.support.no_skips")
    assert pytestconfig.pluginmanager.has_plugin("tests.support.groups")


def test_every_test_module_is_in_exactly_one_group() -> None:
    on_disk = {path.stem for path in (REPO / "tests").glob("test_*.py")}
    assert sorted(GROUP_OF) == sorted(on_disk)
    assert sum(len(modules) for modules in GROUPS.values()) == len(GROUP_OF)


def test_groups_are_registered_and_the_readme_says_how_to_run_each() -> None:
    pytest_options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]
    registered = {marker.split(":")[0] for marker in pytest_options["ini_options"]["markers"]}
    assert set(GROUPS) <= registered
    readme = (REPO / "README.md").read_text()
    for group in GROUPS:
        assert f"pytest -m {group}" in readme, group
