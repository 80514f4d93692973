import os
import subprocess
import sys

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))

from checkpoints import ARCHS, make_model  # noqa: E402

# the Hub is never needed: every model in these tests is a local directory
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["MERGEKIT_LAYERSWAP_CACHE"] = str(tmp_path_factory.mktemp("magnitude-cache"))


class Family:
    """A base model and two experts fine-tuned from it (base + seeded noise)."""

    def __init__(self, root, arch):
        self.arch = arch
        self.root = str(root)
        self.base = make_model(arch, os.path.join(self.root, "base"), seed=1)
        self.task = make_model(arch, os.path.join(self.root, "task"), seed=2, base_path=self.base, noise=0.02)
        self.lang = make_model(arch, os.path.join(self.root, "lang"), seed=3, base_path=self.base, noise=0.05)


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Family(tmp_path_factory.mktemp(name), ARCHS[name])
        return cache[name]

    return get


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

    result = CliRunner().invoke(main, [str(recipe_path), str(out_path), "--quiet", *options])
    return result


def run_yaml_subprocess(recipe_path, out_path, *options, cwd=None, env=None):
    """The installed ``mergekit-yaml`` console script, as a user runs it."""
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    return subprocess.run(
        [exe, str(recipe_path), str(out_path), *options],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})},
    )
