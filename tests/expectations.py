# SPDX-License-Identifier: LGPL-3.0-only
"""Expected outputs, computed by the tests from the input files alone.

Each test writes out the expected source of every decoder layer itself
("L" language expert, "T" task expert, "B" blend); nothing here imports the package.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch
from checkpoints import load_tensors, model_tensors

Weight = Union[float, Callable[[str, Optional[int]], float]]


def _w(weight: Weight, name: str, layer: Optional[int]) -> float:
    return weight(name, layer) if callable(weight) else float(weight)


def row_mav_mean(expert_dir: str, base_dir: str) -> float:
    """Mean over all rows of every stored float 1-D/2-D/3-D tensor of mean |expert - base|
    (a 3-D tensor holds one matrix per expert: its rows are those matrices' rows)."""
    expert, base = load_tensors(expert_dir), load_tensors(base_dir)
    total, rows = 0.0, 0
    for name, x in expert.items():
        if not x.is_floating_point() or x.dim() not in (1, 2, 3):
            continue
        d = (x.float() - base[name].float()).abs()
        if d.dim() == 3:
            d = torch.cat(list(d))  # each expert's matrix, one below the other
        if d.dim() == 1:
            total += d.mean().item()
            rows += 1
        else:
            total += d.mean(dim=1).double().sum().item()
            rows += d.shape[0]
    return total / rows


def check_swap(
    out_dir: str,
    family,
    sources: str,
    w_task: Weight = 1.0,
    w_lang: Weight = 1.0,
    non_layer: str = "B",
    blend_share: Optional[Callable[[int], float]] = None,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    model_layout: bool = False,
    vision: str = "L",
) -> Dict[str, int]:
    """Compare every output tensor with its expectation; return counts per kind.

    ``sources`` has one letter per decoder layer; ``non_layer`` is the letter for
    tensors outside the layers; ``blend_share(layer)`` is the task share of a
    transition layer (default 1/2, the paper's flat transition). ``model_layout``
    compares the tensors as transformers' own class loads each checkpoint (so an
    expert stored one 2-D tensor per expert and a fused 3-D output compare alike,
    and the output must load). ``vision`` is the letter of a vision-language model's
    vision tower and projector tensors (the recipe's ``vision``; default language).
    """
    assert len(sources) == family.arch.num_layers
    read = (lambda path: model_tensors(family.arch, path)) if model_layout else load_tensors
    out = read(out_dir)
    task, lang = read(family.task), read(family.lang)
    assert set(out) == set(lang) == set(task), "output tensors differ from the experts' stored tensors"
    counts = {"L": 0, "T": 0, "B": 0}
    for name, tensor in out.items():
        layer = family.arch.layer_of(name)
        kind = sources[layer] if layer is not None else vision if family.arch.is_vision(name) else non_layer
        counts[kind] += 1
        if kind == "L":
            assert torch.equal(tensor, lang[name]), f"{name} should be the language expert's"
        elif kind == "T":
            assert torch.equal(tensor, task[name]), f"{name} should be the task expert's"
        else:
            share = 0.5 if blend_share is None or layer is None else blend_share(layer)
            ct = share * _w(w_task, name, layer)
            cl = (1 - share) * _w(w_lang, name, layer)
            expected = (ct * task[name].double() + cl * lang[name].double()) / (ct + cl)
            assert torch.allclose(tensor.double(), expected, atol=atol, rtol=rtol), f"{name} blend is wrong"
            if not torch.equal(task[name], lang[name]):  # (a buffer no fine-tune changed is equal)
                assert not torch.equal(tensor, lang[name]) and not torch.equal(tensor, task[name])
    return counts
