# SPDX-License-Identifier: LGPL-3.0-only
"""The public parts of mergekit that ``tools/`` and ``cli/`` use, in one place.

Only ``adapter/`` imports mergekit (``tests/test_layout.py`` checks it), so what the
package needs from mergekit's public API, and which version of it, is visible here:
its loader cache, dtype names, parameter settings, tensor groups, ``run_merge`` and
model references. Each import happens when the function is called: a tool that never
reaches mergekit never pays the 5-8 s ``import mergekit.merge`` takes.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple


def loader(model):
    """mergekit's (cached) lazy loader of ``model``'s tensors."""
    from mergekit.io.tasks import LoaderCache

    return LoaderCache().get(model)


def model_directory(model) -> str:
    """The local directory ``model``'s files are in (downloaded first for a hub id)."""
    return loader(model).index.base_path


def dtype_from_name(name: Optional[str]):
    from mergekit.common import dtype_from_name as from_name

    return from_name(name)


def setting_at(setting, tensor_name: str, t: float) -> float:
    """A parameter setting (a number, a gradient list, filters) for one tensor at ``t``."""
    from mergekit.config import evaluate_setting

    return float(evaluate_setting(tensor_name, setting, t, validate=float))


def gradient_t(layer: Optional[int], num_layers: int) -> float:
    """Where a tensor sits for mergekit's gradient settings (``weight: [0.2, 0.8]``):
    ``MergePlanner.plan_slice`` gives decoder layer ``i`` of ``L`` t = i / (L - 1) (1 for
    a single layer) and the tensors before and after the layers t = 0. mergekit 0.1.5
    computes this inline, with no function to call; ``tests/test_mergekit_api.py``
    compares this with the t a real plan hands every tensor."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def tensor_group(entries: Iterable[Tuple[str, Any, bool]], weight):
    """mergekit's TensorGroup of ``(id, tensor, is_base)`` entries for output tensor ``weight``."""
    from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata

    return TensorGroup(
        entries=tuple(TensorEntry(id=key, tensor=tensor, is_base=is_base) for key, tensor, is_base in entries),
        metadata=TensorMetadata.from_weight_info(weight),
    )


def run_merge_quietly(recipe: Dict[str, Any], out_path: str) -> None:
    """``run_merge`` of a recipe given as data: no tokenizer, no card, no progress bar."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(recipe),
        out_path,
        MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
    )


def parse_model_reference(text: str):
    """mergekit's ModelReference for ``text`` (a directory, a hub id, ``base+lora``)."""
    from mergekit.common import ModelReference

    return ModelReference.parse(text)
