# SPDX-License-Identifier: LGPL-3.0-only
"""Algorithm 1 of the layer-swapping paper: where each decoder layer comes from.

Pure Python, no torch or mergekit, so recipes can be explained and checked cheaply.

For a model of ``L`` decoder layers (indices ``0 .. L-1``) and zone sizes
``b`` (bottom_layers), ``u`` (top_layers), ``t_b`` (bottom_transition) and
``t_u`` (top_transition):

* ``l < b`` or ``l > L-1-u``           -> the language expert's layer;
* ``b-1+t_b < l`` **and** ``l < L-u-t_u`` -> the task expert's layer;
* otherwise                               -> a transition layer, a weighted blend.

``SwapRule`` is the one entry point the rest of the package asks: which expert role(s),
with which shares, for one tensor, and whether an expert must be read for it (the
kernel, the planner, the finiteness and integer checks and ``explain`` all ask it).

The paper's printed pseudocode says "or" in the second test. With "or" every layer
satisfies it and no transition layer could exist, so "and" is what is meant and what
this module implements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

from mergekit_layerswap.core.parameters import DEFAULTS

LANGUAGE = "language"
VISION = "vision"  # the position of a tensor outside a vision-language model's text decoder
TASK = "task"
BLEND = "blend"
ROLES = (TASK, LANGUAGE)


@dataclass(frozen=True)
class SwapZones:
    """Zone sizes of a swap, in layers."""

    bottom_layers: int = DEFAULTS["bottom_layers"]
    top_layers: int = DEFAULTS["top_layers"]
    bottom_transition: int = DEFAULTS["bottom_transition"]
    top_transition: int = DEFAULTS["top_transition"]

    @property
    def total(self) -> int:
        return self.bottom_layers + self.top_layers + self.bottom_transition + self.top_transition


def layer_source(layer: int, num_layers: int, zones: SwapZones) -> str:
    """Return ``language``, ``task`` or ``blend`` for decoder layer ``layer``."""
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside 0..{num_layers - 1}")
    b, u = zones.bottom_layers, zones.top_layers
    if layer < b or layer > num_layers - 1 - u:
        return LANGUAGE
    if b - 1 + zones.bottom_transition < layer and layer < num_layers - u - zones.top_transition:
        return TASK
    return BLEND


def transition_depth(layer: int, num_layers: int, zones: SwapZones) -> tuple[int, int]:
    """For a transition layer: (j, t) with j = 1..t counted from the language side."""
    if layer < zones.bottom_layers + zones.bottom_transition:
        return layer - zones.bottom_layers + 1, zones.bottom_transition
    return num_layers - zones.top_layers - layer, zones.top_transition


def role_shares(
    layer: Optional[int],
    num_layers: Optional[int],
    zones: SwapZones,
    non_layer: str = "average",
    transition_shape: str = "flat",
    vision: str = DEFAULTS["vision"],
) -> Dict[str, float]:
    """Share of the mixing weight each role gets for one tensor, before the
    experts' own weights apply. ``layer=None`` marks a non-layer tensor
    (embeddings, final norm, lm_head, anything outside the layer templates);
    ``layer=VISION`` a vision-language model's vision tower or projector tensor."""
    if layer is None or layer == VISION:
        policy, name = (non_layer, "non_layer") if layer is None else (vision, "vision")
        if policy == "average":
            return {TASK: 0.5, LANGUAGE: 0.5}
        if policy in ROLES:
            return {role: float(role == policy) for role in ROLES}
        raise ValueError(f"unknown {name} policy {policy!r}")
    if num_layers is None:
        raise ValueError("num_layers is required for a layer tensor")
    source = layer_source(layer, num_layers, zones)
    if source != BLEND:
        return {role: float(role == source) for role in ROLES}
    if transition_shape == "flat":
        return {TASK: 0.5, LANGUAGE: 0.5}
    if transition_shape == "linear":
        j, t = transition_depth(layer, num_layers, zones)
        task_share = j / (t + 1)
        return {TASK: task_share, LANGUAGE: 1.0 - task_share}
    raise ValueError(f"unknown transition_shape {transition_shape!r}")


def layer_table(num_layers: int, zones: SwapZones) -> list[tuple[int, str]]:
    """(layer, source) for every decoder layer, bottom first."""
    return [(layer, layer_source(layer, num_layers, zones)) for layer in range(num_layers)]


@dataclass(frozen=True)
class TensorSources:
    """Where one output tensor comes from: each role's share of the mixing weight."""

    shares: Dict[str, float]

    def reads(self, role: Optional[str]) -> bool:
        """Whether an expert of ``role`` is read for this tensor (its role has a share)."""
        return role is not None and self.shares[role] > 0

    @property
    def roles(self) -> Tuple[str, ...]:
        """The roles read, task first."""
        return tuple(role for role in ROLES if self.shares[role] > 0)

    @property
    def blends(self) -> bool:
        """More than one role: the tensor is a weighted blend, not one expert's copy."""
        return len(self.roles) > 1


@dataclass(frozen=True)
class SwapRule:
    """A recipe's rule: its zones, its non-layer and vision choices and its transition shape."""

    zones: SwapZones = SwapZones()
    non_layer: str = DEFAULTS["non_layer"]
    transition_shape: str = DEFAULTS["transition_shape"]
    vision: str = DEFAULTS["vision"]

    def sources(self, layer: Union[int, str, None], num_layers: Optional[int]) -> TensorSources:
        """For the tensor of decoder layer ``layer`` of ``num_layers`` (``None``: a
        non-layer tensor; ``VISION``: a vision tower or projector tensor)."""
        return TensorSources(
            role_shares(layer, num_layers, self.zones, self.non_layer, self.transition_shape, self.vision)
        )

    def source(self, layer: int, num_layers: int) -> str:
        """``language``, ``task`` or ``blend`` for decoder layer ``layer``."""
        return layer_source(layer, num_layers, self.zones)
