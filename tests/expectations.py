# SPDX-License-Identifier: LGPL-3.0-only
"""Expected outputs, computed by the tests from the input files alone.

Each test writes out the expected source of every decoder layer itself
("L" language expert, "T" task expert, "B" blend); nothing here imports the package.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch
from checkpoints import load_tensors

Weight = Union[float, Callable[[str, Optional[int]], float]]


def _w(weight: Weight, name: str, layer: Optional[int]) -> float:
    return weight(name, layer) if callable(weight) else float(weight)


def row_mav_mean(expert_dir: str, base_dir: str) -> float:
    """Mean over all rows of every stored float 1-D/2-D tensor of mean |expert - base|."""
    expert, base = load_tensors(expert_dir), load_tensors(base_dir)
    total, rows = 0.0, 0
    for name, x in expert.items():
        if not x.is_floating_point() or x.dim() not in (1, 2):
            continue
        d = (x.float() - base[name].float()).abs()
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
) -> Dict[str, int]:
    """Compare every output tensor with its expectation; return counts per kind.

    ``sources`` has one letter per decoder layer; ``non_layer`` is the letter for
    tensors outside the layers; ``blend_share(layer)`` is the task share of a
    transition layer (default 1/2, the paper's flat transition).
    """
    assert len(sources) == family.arch.num_layers
    out = load_tensors(out_dir)
    task, lang = load_tensors(family.task), load_tensors(family.lang)
    assert set(out) == set(lang) == set(task), "output tensors differ from the experts' stored tensors"
    counts = {"L": 0, "T": 0, "B": 0}
    for name, tensor in out.items():
        layer = family.arch.layer_of(name)
        kind = sources[layer] if layer is not None else non_layer
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
            assert not torch.equal(tensor, lang[name]) and not torch.equal(tensor, task[name])
    return counts
