# SPDX-License-Identifier: LGPL-3.0-only
"""``.ci/mergekit_suite.py``: mergekit's own tests with and without this package. The run
itself (about 2 minutes, with a download of mergekit's sdist) is in ``.ci/run``; here are
the two things it relies on: the "without" interpreter really lacks the package, and a case
that fails only with the package is reported."""

from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", ".ci", "mergekit_suite.py")


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("mergekit_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("with_package", [True, False])
def test_the_two_interpreters_differ_only_by_the_package(suite, tmp_path, with_package):
    python, env = suite.plain_env(with_package)
    probe = (
        "import sys, mergekit.merge_methods as m; "
        "print('layer_swap' in {x.spec.name for x in m.registered_methods()}, 'mergekit_layerswap' in sys.modules)"
    )
    done = subprocess.run([*python, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ([str(with_package)] * 2)


def _junit(path, cases):
    body = []
    for name, state in cases.items():
        inner = {"passed": "", "failed": "<failure message='x'/>", "error": "<error message='x'/>"}.get(
            state, "<skipped message='x'/>"
        )
        body.append(f"<testcase classname='tests.test_m' name='{name}'>{inner}</testcase>")
    path.write_text(f"<testsuites><testsuite name='pytest'>{''.join(body)}</testsuite></testsuites>")
    return str(path)


def test_a_case_failing_only_with_the_package_is_reported(suite, tmp_path):
    with_package = suite.outcomes(
        _junit(
            tmp_path / "with.xml",
            {"a": "passed", "b": "failed", "c[layer_swap]": "error", "d": "failed", "e": "skipped"},
        )
    )
    without = suite.outcomes(
        _junit(tmp_path / "without.xml", {"a": "passed", "b": "passed", "d": "failed", "e": "passed"})
    )
    assert with_package["tests.test_m::c[layer_swap]"] == "error" and with_package["tests.test_m::e"] == "skipped"
    found = suite.regressions(with_package, without)
    assert found == [
        "tests.test_m::b: failed with the package, passed without",
        "tests.test_m::c[layer_swap]: error with the package, absent without",
    ]  # d fails either way: mergekit's own failure, not this package's


def test_files_needing_helpers_the_sdist_lacks_are_left_out_or_get_ours(suite, tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_plain.py").write_text("def test_x():\n    pass\n")
    (tests / "test_needs.py").write_text("from tests.common import make_picollama\n")
    (tests / "test_tok.py").write_text("import os\nfrom tests.test_tokenizer import make_tokenizer\n")
    assert suite.runnable_files(str(tmp_path), []) == (["test_plain.py"], ["test_needs.py", "test_tok.py"])
    kept = suite.runnable_files(str(tmp_path), [], factories=True)  # tests/common.py: this repository's factories
    assert kept == (["test_needs.py", "test_plain.py", "test_tok.py"], [])
    assert "def make_picollama" in (tests / "common.py").read_text()
