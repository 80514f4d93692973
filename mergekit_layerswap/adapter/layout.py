# SPDX-License-Identifier: LGPL-3.0-only
"""Checkpoint layout versus model layout (mixture-of-experts checkpoints).

transformers 5 holds a mixture-of-experts layer's experts as fused 3-D tensors
(``mlp.experts.gate_up_proj``: experts x rows x columns) and renames some modules
(Mixtral's ``block_sparse_moe`` is ``mlp``), but ``save_pretrained`` and published
checkpoints store one 2-D tensor per expert under the old names. mergekit 0.1.5's
architecture definitions name the model layout, and its loader
(``mergekit.io.tasks.LoadTensor``) converts stored tensors with transformers' own
conversion mapping when a name is not stored as is; its writer writes the model layout.

This module answers, from names alone, which stored tensors make up one tensor of the
model layout, so checks, ``explain`` and ``analyze`` see a per-expert checkpoint and a
fused one alike. It uses the same mapping (``transformers.conversion_mapping``) and
mergekit's own ``can_convert_checkpoint_keys``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence


@lru_cache(maxsize=None)
def _transforms(model_type: Optional[str]):
    if not model_type:
        return ()
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return tuple(get_checkpoint_conversion_mapping(model_type) or ())


def model_layout_name(model_type: Optional[str], stored_name: str) -> str:
    """The model-layout name a stored tensor becomes (itself when no conversion applies)."""
    name = stored_name
    for transform in _transforms(model_type):
        renamed, pattern = transform.rename_source_key(name)
        if pattern is not None:
            name = renamed
    return name


def sources_by_target(model_type: Optional[str], stored_names: Iterable[str]) -> Dict[str, List[str]]:
    """Model-layout name -> the stored names it is made of (sorted), for every stored name."""
    out: Dict[str, List[str]] = {}
    for name in stored_names:
        out.setdefault(model_layout_name(model_type, name), []).append(name)
    return {target: sorted(names) for target, names in out.items()}


def loader_sources(loader, model_type: Optional[str]) -> Dict[str, List[str]]:
    """``sources_by_target`` of a mergekit loader's checkpoint, computed once per loader."""
    cached = getattr(loader, "_layer_swap_sources", None)
    if cached is None or cached[0] != model_type:
        cached = (model_type, sources_by_target(model_type, loader.index.tensor_paths))
        loader._layer_swap_sources = cached
    return cached[1]


def weight_sources(
    weight, stored: Sequence[str], model_type: Optional[str], with_tied: bool, by_target=None
) -> Optional[List[str]]:
    """The stored names ``weight`` is read from: ``[name]`` when stored as is (or under an
    alias / tied name if ``with_tied``), the converted sources otherwise, None when absent."""
    names = [weight.name] + list(weight.aliases or [])
    if with_tied:
        names += list(weight.tied_names or [])
    direct = next((n for n in names if n in stored), None)
    if direct is not None:
        return [direct]
    by_target = by_target if by_target is not None else sources_by_target(model_type, stored)
    for name in [weight.name] + list(weight.aliases or []):
        sources = by_target.get(name)
        if sources and name not in sources and _convertible(model_type, sources, name):
            return sources
    return None


def _convertible(model_type, sources, target) -> bool:
    """mergekit's own test, given only the stored names that map to ``target`` (they are
    all it reads; the whole checkpoint's names would make every test O(tensors))."""
    from mergekit.architecture.conversion import can_convert_checkpoint_keys

    return can_convert_checkpoint_keys(model_type, set(sources), target)


def load_converted(loader, model_type: Optional[str], sources: Sequence[str], target: str, device: str = "cpu"):
    """``target`` converted from its stored ``sources`` by mergekit's own
    ``convert_checkpoint_tensors`` (what ``LoadTensor`` does, offered only the sources:
    mergekit offers every tensor of the checkpoint, which costs O(tensors) per expert
    tensor, minutes for a 128-expert model stored one 2-D tensor per expert)."""
    from mergekit.architecture.conversion import convert_checkpoint_tensors

    lazy = {name: (lambda name=name: loader.get_tensor(name, device=device)) for name in sources}
    tensor = convert_checkpoint_tensors(model_type, lazy, target)
    return tensor.to(device) if tensor is not None else None


def load_weight(model, loader, weight, device: str, by_target: Dict[str, List[str]], model_type: Optional[str]):
    """``weight`` of ``model`` as mergekit's loader gives it (None when not stored): stored
    as is, or converted from one 2-D tensor per expert into the fused model layout."""
    from mergekit.io.tasks import LoadTensor

    stored = loader.index.tensor_paths
    names = [weight.name, *(weight.aliases or ()), *((weight.tied_names or ()) if weight.optional else ())]
    name = next((n for n in names if n in stored), None)
    if name is not None:
        return loader.get_tensor(name, device=device)
    sources = by_target.get(weight.name)
    if not sources:
        return None
    tensor = load_converted(loader, model_type, sources, weight.name, device)
    if tensor is None:  # mergekit's loader, offered every stored tensor
        tensor = LoadTensor(model=model, tensor=weight.name, device=device, optional=True).execute()
    return tensor
