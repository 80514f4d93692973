#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-3.0-only
"""mergekit's own test suite, with and without mergekit-layerswap: no case may fail only
with the package installed.

mergekit's sdist ships its tests (not its wheel). This script downloads the sdist of the
installed mergekit version with pip (or takes ``--sdist``), copies its ``tests/`` into a
scratch directory and runs them twice with this interpreter:

* with the package: a plain ``python -m pytest``, as a user's interpreter runs (the
  package's ``.pth`` registers ``layer_swap`` and the adapters at start-up);
* without it: ``python -S`` with only the site-packages directories on ``PYTHONPATH``, so
  no ``.pth`` file runs and nothing imports ``mergekit_layerswap`` (checked first).

Test files that import helpers the sdist does not ship (``tests/common.py`` and the files
importing it) are left out and listed, unless ``--with-factories`` puts this repository's
own factories (``mergekit_test_factories.py``) in place of ``tests/common.py``. Each
case's outcome comes from pytest's JUnit XML; the script exits 1 if any case fails (or
errors) with the package and passes or is absent without it (every case of ``layer_swap``
itself is absent without it), listing them.
mergekit's test files are never copied into this repository.

    python .ci/mergekit_suite.py [--with-factories] [--sdist mergekit-0.1.5.tar.gz] [--keep DIR] [FILE ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
from importlib.metadata import version
from typing import Dict, List, Tuple

FACTORIES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mergekit_test_factories.py")
HELPER_IMPORT = re.compile(r"^\s*from tests\.(common|test_tokenizer) import", re.MULTILINE)
BAD = ("failed", "error")


def download_sdist(where: str) -> str:
    wanted = version("mergekit")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*command, f"mergekit=={wanted}", "-d", where], check=True)
    (name,) = [n for n in os.listdir(where) if n.startswith("mergekit-") and n.endswith(".tar.gz")]
    return os.path.join(where, name)


def extract_tests(sdist: str, where: str) -> str:
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if "/tests/" in m.name and m.isfile()]
        try:
            archive.extractall(where, members=members, filter="data")
        except TypeError:  # Python without extraction filters (before 3.10.12 / 3.11.4)
            archive.extractall(where, members=members)
    (top,) = {m.name.split("/")[0] for m in members}
    return os.path.join(where, top)


def runnable_files(root: str, wanted: List[str], factories: bool = False) -> Tuple[List[str], List[str]]:
    """(test files to run, those left out): with ``factories``, ``tests/common.py`` is this
    repository's ``mergekit_test_factories.py`` and every file runs; without, the files that
    import it (directly or through ``tests.test_tokenizer``) are left out."""
    tests = os.path.join(root, "tests")
    if factories:
        shutil.copy(FACTORIES, os.path.join(tests, "common.py"))
    keep, left_out = [], []
    for name in sorted(os.listdir(tests)):
        if not (name.startswith("test_") and name.endswith(".py")) or (wanted and name not in wanted):
            continue
        with open(os.path.join(tests, name), encoding="utf-8") as handle:
            (left_out if HELPER_IMPORT.search(handle.read()) and not factories else keep).append(name)
    return keep, left_out


def _site_dirs() -> List[str]:
    return sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})


def plain_env(with_package: bool) -> Tuple[List[str], Dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    if with_package:
        return [sys.executable], env
    env["PYTHONPATH"] = os.pathsep.join(_site_dirs())
    return [sys.executable, "-S"], env


def check_isolation(root: str) -> None:
    """Without the package, mergekit's registry must not know layer_swap (and with it, must)."""
    probe = (
        "import sys, mergekit.merge_methods as m; names = {x.spec.name for x in m.registered_methods()}; "
        "print('layer_swap' in names, 'mergekit_layerswap' in sys.modules)"
    )
    for with_package, expected in ((True, "True True"), (False, "False False")):
        python, env = plain_env(with_package)
        done = subprocess.run([*python, "-c", probe], cwd=root, env=env, capture_output=True, text=True)
        if done.stdout.strip() != expected:
            sys.exit(
                f"cannot run mergekit {'with' if with_package else 'without'} the package: {done.stdout}{done.stderr}"
            )


def run_suite(root: str, files: List[str], with_package: bool) -> Dict[str, str]:
    """case id -> passed / failed / error / skipped."""
    report = os.path.join(root, f"junit-{'with' if with_package else 'without'}.xml")
    python, env = plain_env(with_package)
    command = [*python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", "-o", "addopts="]
    label = "with mergekit-layerswap" if with_package else "without mergekit-layerswap"
    print(f"== mergekit's tests {label}: {' '.join(files)}", flush=True)
    done = subprocess.run([*command, *[os.path.join("tests", f) for f in files]], cwd=root, env=env)
    if done.returncode not in (0, 1) or not os.path.exists(report):
        sys.exit(f"pytest {label} did not run to the end (exit {done.returncode})")
    return outcomes(report)


def outcomes(report: str) -> Dict[str, str]:
    result = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        key = f"{case.get('classname')}::{case.get('name')}"
        state = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                state = {"failure": "failed"}.get(child.tag, child.tag)
                break
        result[key] = state
    return result


def regressions(with_package: Dict[str, str], without: Dict[str, str]) -> List[str]:
    """Cases that fail only with the package (absent without it counts as not failing)."""
    return sorted(
        f"{case}: {state} with the package, {without.get(case, 'absent')} without"
        for case, state in with_package.items()
        if state in BAD and without.get(case) not in BAD
    )


def summary(states: Dict[str, str]) -> str:
    counts = {s: sum(v == s for v in states.values()) for s in ("passed", "failed", "error", "skipped")}
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="only these test files (e.g. test_merge_method_regressions.py)")
    parser.add_argument("--sdist", help="mergekit's sdist (default: downloaded with pip)")
    parser.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    parser.add_argument(
        "--with-factories",
        action="store_true",
        help="also run the files importing tests/common.py, with this repository's factories in its place",
    )
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="mergekit-suite-")
    os.makedirs(work, exist_ok=True)
    try:
        sdist = args.sdist or download_sdist(work)
        root = extract_tests(sdist, work)
        files, left_out = runnable_files(root, args.files, args.with_factories)
        if not files:
            print("no runnable test files", file=sys.stderr)
            return 1
        check_isolation(root)
        with_package = run_suite(root, files, True)
        without = run_suite(root, files, False)
        print(f"with the package:    {summary(with_package)}")
        print(f"without the package: {summary(without)}")
        if left_out:
            print(f"left out (they import tests/common.py, which the sdist lacks): {', '.join(left_out)}")
        only_with = regressions(with_package, without)
        for line in only_with:  # layer_swap's own cases exist only with the package: any failure is here
            print(f"FAILS ONLY WITH THE PACKAGE: {line}")
        if only_with:
            return 1
        cases = sorted(c for c in with_package if "layer_swap" in c)
        print(f"no case fails only with the package; layer_swap's own cases: {len(cases)}, all passing or skipped")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
