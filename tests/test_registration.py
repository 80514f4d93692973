# SPDX-License-Identifier: LGPL-3.0-only
"""Installed as a user installs it: plain mergekit entry points find layer_swap."""

import os
import shutil
import subprocess
import sys

from expectations import check_swap
from helpers import write_recipe


def python(code, env=None):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_interpreter_start_imports_neither_torch_nor_mergekit():
    result = python(
        "import sys; print(sorted(m for m in ('torch', 'mergekit', 'mergekit_layerswap') if m in sys.modules))"
    )
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.strip() == "['mergekit_layerswap']"


def test_registry_has_layer_swap_without_importing_this_package():
    result = python("from mergekit.merge_methods import registry; print(registry.get('layer_swap').spec.pretty_name)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Layer Swapping"


def test_silent_when_mergekit_is_missing(tmp_path):
    fake = tmp_path / "mergekit"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('mergekit is not installed here')\n")
    result = python("print('started')", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0 and result.stdout == "started\n" and result.stderr == ""


def test_import_registers_idempotently():
    from mergekit.merge_methods import registry

    import mergekit_layerswap
    from mergekit_layerswap.adapter.registration import on_registry

    on_registry(registry)
    on_registry(registry)
    assert [m.spec.name for m in registry.registered_methods()].count("layer_swap") == 1
    assert mergekit_layerswap.layer_swap is registry.get("layer_swap")


def test_relative_paths_offline_and_identical_bytes_across_hash_seeds(families, tmp_path):
    fam = families("gpt2")
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    for name, src in (("task", fam.task), ("lang", fam.lang), ("base", fam.base)):
        shutil.copytree(src, work / "models" / name)
    recipe = {
        "merge_method": "layer_swap",
        "base_model": "models/base",
        "models": [
            {"model": "models/task", "parameters": {"role": "task"}},
            {"model": "models/lang", "parameters": {"role": "language"}},
        ],
        "parameters": {
            "bottom_layers": 2,
            "top_layers": 1,
            "bottom_transition": 1,
            "top_transition": 1,
            "weighting": "magnitude",
        },
        "dtype": "float32",
    }
    write_recipe(work / "recipe.yaml", recipe)
    # no HF_HUB_OFFLINE: a Hub probe for "models/task" would fail on this offline machine
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    outputs = []
    for seed in ("1", "2"):
        result = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), "recipe.yaml", f"run{seed}/out"],
            cwd=work,
            capture_output=True,
            text=True,
            env={**env, "PYTHONHASHSEED": seed},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(work / f"run{seed}" / "out")
    files = sorted(os.listdir(outputs[0]))
    assert files == sorted(os.listdir(outputs[1])) and "model.safetensors" in files and "README.md" in files
    for name in files:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name
    from expectations import row_mav_mean

    m_task, m_lang = row_mav_mean(fam.task, fam.base), row_mav_mean(fam.lang, fam.base)
    check_swap(str(outputs[0]), fam, "LLBTBL", w_task=1 / m_task, w_lang=1 / m_lang, rtol=1e-4)
    assert "huggingface.co" not in (outputs[0] / "README.md").read_text()
