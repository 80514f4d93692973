# SPDX-License-Identifier: LGPL-3.0-only
"""Run the demo recipe through mergekit's own ``mergekit-yaml`` console script.

The recipe names its models ``.demo/base`` etc. The demo writes a copy next to the
checkpoints (in the root) with those paths made relative to the root, and runs
``mergekit-yaml`` from there, so the copy works for any ``--root``.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import subprocess
import sys
from typing import Optional

import yaml

from mergekit_layerswap.core.errors import LayerSwapError

RECIPE_NAME = "demo_swh_math.yaml"
RECIPE_IN_REPO = os.path.join("recipes", RECIPE_NAME)
RECIPE_PREFIX = ".demo/"


def find_recipe() -> str:
    """``recipes/demo_swh_math.yaml`` in the current directory (a repo checkout), else
    the copy shipped inside the installed package."""
    if os.path.isfile(RECIPE_IN_REPO):
        return RECIPE_IN_REPO
    shipped = importlib.resources.files("mergekit_layerswap.demo").joinpath(RECIPE_NAME)
    if not shipped.is_file():
        raise LayerSwapError(
            f"cannot find {RECIPE_IN_REPO} here nor inside the installed package; run the demo "
            f"from the repository root or reinstall with `pip install '.[demo]'`"
        )
    return str(shipped)


def _local(path: str) -> str:
    return path[len(RECIPE_PREFIX) :] if path.startswith(RECIPE_PREFIX) else path


def write_recipe_copy(recipe: str, root: str) -> str:
    """Copy the recipe into ``root`` with its model paths relative to ``root``."""
    with open(recipe) as handle:
        config = yaml.safe_load(handle)
    if config.get("base_model"):
        config["base_model"] = _local(config["base_model"])
    for entry in config.get("models", []):
        entry["model"] = _local(entry["model"])
    copy = os.path.join(root, RECIPE_NAME)
    with open(copy, "w") as handle:
        handle.write(f"# written by `mergekit-layerswap demo` from {recipe}; paths are relative to this folder\n")
        yaml.safe_dump(config, handle, sort_keys=False)
    return copy


def mergekit_yaml_command() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    if not os.path.isfile(exe):
        raise LayerSwapError(f"mergekit-yaml is not installed next to {sys.executable}; `pip install mergekit`")
    return exe


def run_merge(recipe_copy: str, out_dir: str, progress: bool = False) -> None:
    """``mergekit-yaml <recipe> <out>`` with the Hub switched off; raises on failure.
    With ``progress`` its own progress bar (stderr) is passed through as it runs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [mergekit_yaml_command(), os.path.basename(recipe_copy), os.path.abspath(out_dir)]
    process = subprocess.Popen(
        command,
        cwd=os.path.dirname(os.path.abspath(recipe_copy)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output = bytearray()
    while chunk := process.stdout.read1(1 << 16):
        output += chunk
        if progress:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
    if process.wait() != 0:
        lines = output.decode("utf-8", "replace").replace("\r", "\n").strip().splitlines() or ["no output"]
        raise LayerSwapError(f"mergekit-yaml failed: {lines[-1]}")


def layer_section(out_dir: str) -> Optional[str]:
    """The "Where each layer comes from" section of the merged model's README.md."""
    card = os.path.join(out_dir, "README.md")
    if not os.path.isfile(card):
        return None
    with open(card) as handle:
        text = handle.read()
    match = re.search(r"## Where each layer comes from\n(.*?)(?=\n## |\Z)", text, re.S)
    return match.group(1).strip() if match else None
