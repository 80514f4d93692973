# SPDX-License-Identifier: LGPL-3.0-only
"""What a sweep's scores were computed from, so a resumed sweep never mixes old scores
with new inputs, and the eval data checked before any candidate is built.

``sweep.json`` records the recipe text, each model's weight files (size, mtime_ns, inode
and ctime_ns: a rewrite that keeps the size and sets the mtime back still changes the
ctime, which ``utime`` cannot set, or the inode when written to a new file), the
evaluator's settings, the eval file's sha256, the strategy and its rung schedule. A
resume whose record differs is refused in one line naming what changed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from typing import Any, Dict, List, Optional

from mergekit_layerswap.core.errors import DataError, OptionError
from mergekit_layerswap.core.files import file_identity

FORMAT = 2
# files a model's weights and shapes come from; tokenizer files do not change a score's
# weights but do change its text, so they are recorded too
MODEL_FILE_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".index.json",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
)
# words for the keys of sweep.json in the refusal message
WHAT = {
    "format": "the sweep file format",
    "recipe": "the recipe text",
    "models": "the models' weight files",
    "evaluator": "the evaluator settings",
    "eval_data": "the eval file's contents",
    "limit": "--limit",
    "strategy": "the strategy or its rung schedule",
    "grid": "the grid",
    "baselines": "--baselines",
    "device": "the device",
}


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_files(model) -> Dict[str, Any]:
    """Identity of every weight/config file of a mergekit ModelReference (local or Hub cache)."""
    from mergekit_layerswap.adapter.mergekit_parts import model_directory

    base = model_directory(model)
    files = {}
    for name in sorted(os.listdir(base)):
        full = os.path.join(base, name)
        if name.endswith(MODEL_FILE_SUFFIXES) and os.path.isfile(full):
            files[name] = file_identity(os.path.realpath(full))
    return {"path": os.path.realpath(base), "files": files}


def eval_argument(evaluator) -> tuple:
    kind, _, argument = evaluator.spec.partition(":")
    return kind, argument


def eval_data_fingerprint(evaluator) -> Dict[str, str]:
    """sha256 of the eval file, or of every file of an lm-eval ``tasks_path`` directory."""
    kind, argument = eval_argument(evaluator)
    if kind in ("exact-match", "perplexity") and os.path.isfile(argument):
        return {os.path.abspath(argument): sha256_file(argument)}
    tasks_path = evaluator.settings().get("tasks_path")
    out = {}
    if tasks_path and os.path.isdir(tasks_path):
        for root, _dirs, names in os.walk(tasks_path):
            for name in sorted(names):
                full = os.path.join(root, name)
                out[os.path.abspath(full)] = sha256_file(full)
    return out


def sweep_record(
    recipe_path: str,
    models: List[Any],
    evaluator,
    strategy: Dict[str, Any],
    grid: Dict[str, List[Any]],
    baselines: bool,
    device: str,
) -> Dict[str, Any]:
    """The contents of sweep.json: everything a row of results.csv depends on."""
    with open(recipe_path, encoding="utf-8") as handle:
        recipe_text = handle.read()
    return {
        "format": FORMAT,
        "recipe": recipe_text,
        "models": {str(m): model_files(m) for m in models},
        "evaluator": json.loads(json.dumps(evaluator.settings(), default=str)),
        "eval_data": eval_data_fingerprint(evaluator),
        "limit": evaluator.limit,
        "strategy": strategy,
        "grid": grid,
        "baselines": baselines,
        "device": device,
    }


def differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """Words for each part of a sweep record that changed (models named one by one)."""
    changed = []
    for key in new:
        if old.get(key) == new[key]:
            continue
        if key == "models" and isinstance(old.get(key), dict):
            for model, files in new[key].items():
                before = old[key].get(model)
                if before is None:
                    changed.append(f"model {model} is new")
                elif before != files:
                    names = sorted(
                        n
                        for n in set(files["files"]) | set(before.get("files", {}))
                        if files["files"].get(n) != before.get("files", {}).get(n)
                    )
                    changed.append(f"the weight files of {model} changed ({', '.join(names) or 'path'})")
            changed += [f"model {m} is gone" for m in old[key] if m not in new[key]]
        else:
            changed.append(f"{WHAT.get(key, key)} changed")
    changed += [f"{WHAT.get(k, k)} changed" for k in old if k not in new]
    return changed


def check_resume(path: str, record: Dict[str, Any], out_option: str = "--out") -> None:
    """Refuse, in one line, a results directory computed from other inputs."""
    try:
        with open(path, encoding="utf-8") as handle:
            old = json.load(handle)
    except (OSError, ValueError):
        old = {}
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        changed = ["it was written by an older or unknown sweep format"]
    else:
        changed = differences(old, json.loads(json.dumps(record)))
    if changed:
        raise OptionError(
            f"{os.path.dirname(path) or '.'} holds results of a different sweep ({'; '.join(changed)}); "
            "add --restart to start over, or use a new --out directory",
            out_option,
        )


def check_eval_data(evaluator) -> None:
    """Refuse an eval file with no usable item, before any candidate is built."""
    eval_items(evaluator)


def eval_items(evaluator, tokenizer=None) -> Optional[int]:
    """The number of items (``--limit``'s unit) the evaluator scores when it is known:
    problems of an exact-match file, 512-token windows of a perplexity text (with the
    donor's ``tokenizer``). It bounds successive halving's slices."""
    kind, argument = eval_argument(evaluator)
    if kind == "exact-match":
        from mergekit_layerswap.tools.evaluate import read_problems

        problems = read_problems(argument)
        if not problems:
            raise DataError(f"{argument} has no problems; write one JSON object per line with 'question' and 'answer'")
        count = len(problems)
        return count if evaluator.limit is None else min(count, evaluator.limit)
    if kind == "perplexity":
        try:
            with open(argument, encoding="utf-8-sig") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read {argument} as UTF-8 text: {error}") from None
        if not text.strip():
            raise DataError(f"{argument} has no text to score")
        if tokenizer is not None:
            from mergekit_layerswap.tools.evaluate import perplexity

            window = inspect.signature(perplexity).parameters["window"].default
            tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            count = len(range(0, max(tokens - 1, 0), window))
            return count if evaluator.limit is None else min(count, evaluator.limit)
    if kind == "lm-eval":
        from mergekit_layerswap.tools.evaluate import check_lm_eval_task

        check_lm_eval_task(argument, getattr(evaluator, "tasks_path", None))
    return None


def is_finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
