# SPDX-License-Identifier: LGPL-3.0-only
"""Helpers shared by the tests: checkpoint families, recipes, merges through the real
``mergekit-yaml`` and the one-line refusal every bad input must get."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import yaml
from checkpoints import Arch, make_model


@dataclass
class Family:
    """A base model and two experts fine-tuned from it (base + seeded noise)."""

    arch: Arch
    base: str
    task: str
    lang: str
    root: Optional[str] = None

    @classmethod
    def build(cls, root, arch: Arch) -> "Family":
        root = str(root)
        base = make_model(arch, os.path.join(root, "base"), seed=1)
        task = make_model(arch, os.path.join(root, "task"), seed=2, base_path=base, noise=0.02)
        lang = make_model(arch, os.path.join(root, "lang"), seed=3, base_path=base, noise=0.05)
        return cls(arch=arch, base=base, task=task, lang=lang, root=root)


def write_recipe(path, recipe: dict) -> str:
    with open(path, "w") as handle:
        yaml.safe_dump(recipe, handle, sort_keys=False)
    return str(path)


def swap_recipe(family, base=False, models=None, **parameters) -> dict:
    recipe = {
        "merge_method": "layer_swap",
        "models": models
        or [
            {"model": family.task, "parameters": {"role": "task"}},
            {"model": family.lang, "parameters": {"role": "language"}},
        ],
        "dtype": "float32",
    }
    if base:
        recipe["base_model"] = family.base
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def run_yaml_inprocess(recipe_path, out_path, *options):
    """mergekit-yaml's own click command, run in this process."""
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main

    return CliRunner().invoke(main, [str(recipe_path), str(out_path), "--quiet", *options])


def run_yaml_subprocess(recipe_path, out_path, *options, cwd=None, env=None):
    """The installed ``mergekit-yaml`` console script, as a user runs it."""
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    return subprocess.run(
        [exe, str(recipe_path), str(out_path), *options],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def merge(tmp_path, recipe, *options) -> str:
    """Merge ``recipe`` in-process into ``tmp_path/out``; fail the test if it fails."""
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "out"
    result = run_yaml_inprocess(path, out, *options)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return str(out)


def assert_one_line_error(result, *expected_words) -> str:
    """A click result that failed with exactly one ``Error:`` line holding every word."""
    message = result.output.strip()
    assert result.exit_code not in (0, None), message
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert message.startswith("Error: ") and "\n" not in message, message
    for word in expected_words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def refused(tmp_path, recipe, *expected_words) -> str:
    """``mergekit-yaml`` refuses ``recipe`` in one line and writes no output directory."""
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "out"
    message = assert_one_line_error(run_yaml_inprocess(path, out), *expected_words)
    assert not out.exists(), "a refused recipe left an output directory"
    return message
