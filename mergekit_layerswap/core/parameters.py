# SPDX-License-Identifier: LGPL-3.0-only
"""The recipe's parameters: the one place each is defined.

Name, where it goes, its allowed values, its default and its help text live here.
Recipe validation (``recipe.py``), ``explain``, the model card, ``sweep --grid``,
``suggest`` and the README's parameter table derive from this table. The kernel
(``adapter/kernel.py``) keeps a literal typed signature because mergekit builds the
method's spec from it; ``tests/test_parameters.py`` fails if the two disagree or if the
README's table is not ``markdown_table()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

MODEL = "each model"  # under a model's own `parameters:`
MERGE = "top level"  # under the recipe's top-level `parameters:`

LAYERS = "layers"  # a whole number of decoder layers, >= 0
CHOICE = "choice"  # one of ``choices``
WEIGHT = "weight"  # a positive number, or a mergekit gradient / filter list of them
METHOD = "method"  # ``average`` or a registered mergekit method name
OPTION = "option"  # one value, checked against the blend method's own spec


@dataclass(frozen=True)
class Parameter:
    name: str
    scope: str
    kind: str
    default: Any
    values: str  # the README's "values (default)" column
    help: str
    choices: Tuple[str, ...] = ()
    symbol: Optional[str] = None  # the paper's name for it (b, u, t_b, t_u)
    paper_range: Optional[Tuple[int, int]] = None  # the values the paper searched (Llama-3.1-8B)

    @property
    def sweepable(self) -> bool:
        """Whether ``sweep --grid NAME=...`` may vary it (one value for the whole model)."""
        return self.scope == MERGE and self.kind in (LAYERS, CHOICE)


PARAMETERS: Tuple[Parameter, ...] = (
    Parameter(
        "role",
        MODEL,
        CHOICE,
        None,
        "`task` \\| `language` (required)",
        "which expert the model is",
        choices=("task", "language"),
    ),
    Parameter(
        "weight",
        MODEL,
        WEIGHT,
        1.0,
        "positive number (`1.0`); mergekit gradients and filters allowed",
        "the model's weight in averages",
    ),
    Parameter(
        "bottom_layers",
        MERGE,
        LAYERS,
        5,
        "integer ≥ 0 (`5`)",
        "bottom layers taken from the language expert",
        symbol="b",
        paper_range=(3, 5),
    ),
    Parameter(
        "top_layers",
        MERGE,
        LAYERS,
        2,
        "integer ≥ 0 (`2`)",
        "top layers taken from the language expert",
        symbol="u",
        paper_range=(0, 2),
    ),
    Parameter(
        "bottom_transition",
        MERGE,
        LAYERS,
        0,
        "integer ≥ 0 (`0`)",
        "blended layers just above the bottom zone",
        symbol="t_b",
        paper_range=(0, 2),
    ),
    Parameter(
        "top_transition",
        MERGE,
        LAYERS,
        0,
        "integer ≥ 0 (`0`)",
        "blended layers just below the top zone",
        symbol="t_u",
        paper_range=(0, 2),
    ),
    Parameter(
        "weighting",
        MERGE,
        CHOICE,
        "uniform",
        "`uniform` \\| `magnitude` (`uniform`)",
        "`magnitude` multiplies each weight by 1/m (below); needs `base_model`",
        choices=("uniform", "magnitude"),
    ),
    Parameter(
        "non_layer",
        MERGE,
        CHOICE,
        "average",
        "`average` \\| `language` \\| `task` (`average`)",
        "embeddings, final norm, lm_head and anything else outside the layers",
        choices=("average", "language", "task"),
    ),
    Parameter(
        "vision",
        MERGE,
        CHOICE,
        "language",
        "`language` \\| `task` \\| `average` (`language`)",
        "vision-language models: the vision tower and projector, taken from that expert or averaged "
        "(see Architectures)",
        choices=("language", "task", "average"),
    ),
    Parameter(
        "transition_shape",
        MERGE,
        CHOICE,
        "flat",
        "`flat` \\| `linear` (`flat`)",
        "`linear` ramps the mix across a transition zone (see Composing)",
        choices=("flat", "linear"),
    ),
    Parameter(
        "blend_method",
        MERGE,
        METHOD,
        "average",
        "`average` or a registered mergekit method (`average`)",
        "how transition layers and averaged non-layer tensors combine the experts (see Composing)",
    ),
    Parameter(
        "blend_<name>",
        MERGE,
        OPTION,
        None,
        "one value",
        "parameter `<name>` of `blend_method`, e.g. `blend_density: 0.5` for `ties`",
    ),
)

BY_NAME: Dict[str, Parameter] = {p.name: p for p in PARAMETERS}
BLEND_PREFIX = "blend_"
# values the planner adapter computes for each tensor; a recipe cannot set them
PLANNER_PARAMETERS = ("layer_index", "num_layers", "magnitude", "blend_options")

PER_MODEL_PARAMETERS = tuple(p.name for p in PARAMETERS if p.scope == MODEL)
# one value for the whole merge (``blend_<name>`` options are checked by the blend method)
SHARED_PARAMETERS = tuple(p.name for p in PARAMETERS if p.scope == MERGE and p.kind != OPTION)
ZONE_PARAMETERS = tuple(p.name for p in PARAMETERS if p.kind == LAYERS)
CHOICE_PARAMETERS = {p.name: p.choices for p in PARAMETERS if p.scope == MERGE and p.kind == CHOICE}
DEFAULTS: Dict[str, Any] = {name: BY_NAME[name].default for name in SHARED_PARAMETERS}
SWEEPABLE = tuple(p.name for p in PARAMETERS if p.sweepable)
SYMBOLS = {p.name: p.symbol for p in PARAMETERS if p.symbol}


def markdown_table() -> str:
    """The README's parameter table."""
    rows = ["| parameter | where | values (default) | meaning |", "|---|---|---|---|"]
    for p in PARAMETERS:
        where = p.scope + (" (or top level)" if p.name == "weight" else "")
        meaning = f"`{p.symbol}`: {p.help}" if p.symbol else p.help
        rows.append(f"| `{p.name}` | {where} | {p.values} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m mergekit_layerswap.core.parameters > table.md
    print(markdown_table())
