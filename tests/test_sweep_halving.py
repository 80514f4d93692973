# SPDX-License-Identifier: LGPL-3.0-only
"""sweep --strategy halving: exact evaluation counts per rung, the full-set best survives
when its lead holds on the slices, resume mid-schedule, schedule arithmetic."""

import csv
import dataclasses
from collections import Counter
from typing import Optional

import pytest
from helpers import swap_recipe, write_recipe

GRID = {"bottom_layers": [1, 2, 3], "top_layers": [0, 1, 2]}  # 9 candidates on 8 layers


@dataclasses.dataclass(frozen=True)
class LayerDistance:
    """A deterministic evaluator: item k is one decoder-layer tensor, taken round-robin
    over the layers (so every slice of 8 covers every layer once); the score on a slice is
    minus the mean squared distance of those tensors from the language expert's. The
    candidate with the most language-expert layers leads on the full set."""

    reference: str
    limit: Optional[int] = None
    calls: list = dataclasses.field(default_factory=list, compare=False)
    fail_after: Optional[int] = None

    @property
    def spec(self):
        return f"layer-distance:{self.reference}"

    def with_limit(self, limit):
        return dataclasses.replace(self, limit=limit)

    def settings(self):
        return {"spec": self.spec, "limit": self.limit}

    def items(self, model):
        from checkpoints import load_tensors

        reference = load_tensors(self.reference)
        layers = {}
        for name, tensor in model.state_dict().items():
            if ".layers." in name:
                layer = int(name.split(".layers.")[1].split(".")[0])
                layers.setdefault(layer, []).append((tensor, reference[name]))
        depth = max(len(v) for v in layers.values())
        return [layers[layer][k] for k in range(depth) for layer in sorted(layers) if k < len(layers[layer])]

    def __call__(self, model, tokenizer):
        from mergekit_layerswap.tools.evaluate import Score

        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(self.limit)
        items = self.items(model)[: self.limit]
        distance = sum(float(((a.double() - b.double()) ** 2).mean()) for a, b in items) / len(items)
        return Score("minus_layer_distance", -distance * 1e4, len(items), True)


@pytest.fixture
def setup(families, tmp_path):
    fam = families("llama")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam))
    return fam, recipe


def _sweep(recipe, out, evaluator, **kwargs):
    from mergekit_layerswap.tools.sweep import run_sweep

    return run_sweep(recipe, GRID, str(out), evaluator, echo=lambda s: None, quiet=True, baselines=False, **kwargs)


def _rows(out):
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_exact_counts_per_rung_and_the_full_set_best_survives(setup, tmp_path):
    from mergekit_layerswap.tools.sweep import Halving

    fam, recipe = setup
    # the full grid on every item, and on each slice the halving will use
    grid = {
        limit: _sweep(recipe, tmp_path / f"grid-{limit}", LayerDistance(fam.lang, limit=limit))
        for limit in (None, 8, 24)
    }
    items = int(grid[None]["best"]["count"])
    assert items == 8 * 9  # 9 tensors in each of 8 llama layers
    full_best = grid[None]["best"]["name"]
    assert full_best == "b3-u2"  # most language-expert layers
    for limit in (8, 24):  # the premise: its lead holds on the slices
        assert grid[limit]["best"]["name"] == full_best

    evaluator = LayerDistance(fam.lang)
    summary = _sweep(recipe, tmp_path / "halving", evaluator, strategy=Halving(minimum=8, eta=3))
    # 9 candidates on 8 items, the best 3 on 24, the best 1 on all 72
    assert Counter(evaluator.calls) == {8: 9, 24: 3, None: 1}
    assert [(r["rung"], r["limit"], r["candidates"], r["items"]) for r in summary["summary"]["rungs"]] == [
        (0, 8, 9, 72),
        (1, 24, 3, 72),
        (2, None, 1, 72),
    ]
    assert summary["summary"]["items_spent"] == 216 and summary["summary"]["items_full_grid"] == 9 * 72
    rows = _rows(tmp_path / "halving")
    assert Counter((r["rung"], r["limit"], r["count"]) for r in rows) == {
        ("0", "8", "8"): 9,
        ("1", "24", "24"): 3,
        ("2", "", "72"): 1,
    }
    assert summary["best"]["name"] == full_best
    stopped = summary["summary"]["stopped_at_rung"]
    assert stopped[full_best] == 2 and sorted(stopped.values()) == [0] * 6 + [1, 1, 2]
    # the rung scores are the grid's scores with --limit at that slice
    grid8 = {r["name"]: r["score"] for r in _rows(tmp_path / "grid-8")}
    assert {r["name"]: r["score"] for r in rows if r["rung"] == "0"} == grid8
    assert (tmp_path / "halving" / "best.yaml").read_text() == (tmp_path / "grid-None" / "best.yaml").read_text()


def test_interrupted_halving_resumes_with_the_same_schedule(setup, tmp_path):
    from mergekit_layerswap.tools.sweep import Halving

    fam, recipe = setup
    whole = LayerDistance(fam.lang)
    _sweep(recipe, tmp_path / "whole", whole, strategy=Halving(minimum=8, eta=3))
    first = LayerDistance(fam.lang, fail_after=10)  # stops inside rung 1
    with pytest.raises(KeyboardInterrupt):
        _sweep(recipe, tmp_path / "resumed", first, strategy=Halving(minimum=8, eta=3))
    assert len(_rows(tmp_path / "resumed")) == 10
    rest = LayerDistance(fam.lang)
    _sweep(recipe, tmp_path / "resumed", rest, strategy=Halving(minimum=8, eta=3))
    assert Counter(rest.calls) == {24: 2, None: 1}
    assert sorted(map(str, _rows(tmp_path / "resumed"))) == sorted(map(str, _rows(tmp_path / "whole")))


@pytest.mark.parametrize(
    "candidates,minimum,eta,problems,limit,expected",
    [
        (8, 1, 2, 20, None, [(1, 8), (2, 4), (4, 2), (None, 1)]),
        (27, 10, 3, 50, None, [(10, 27), (30, 9), (None, 3)]),  # 90 would exceed the 50 problems
        (27, 10, 3, None, 25, [(10, 27), (25, 9)]),  # --limit is the full set
        (5, 40, 3, 30, None, [(None, 5)]),  # a first slice as big as the set: the grid
        (1, 2, 3, None, None, [(None, 1)]),
    ],
)
def test_schedule(candidates, minimum, eta, problems, limit, expected):
    from mergekit_layerswap.tools.sweep import Halving

    rungs = Halving(minimum, eta).rungs(candidates, problems, limit)
    assert [(r.limit, r.candidates) for r in rungs] == expected


def test_halving_through_the_command_slices_bounded_by_the_text(setup, tmp_path):
    """perplexity windows bound the slices; the summary line and files say what was spent."""
    import json

    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from mergekit_layerswap.cli.main import main

    fam, recipe = setup
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(7 * i) % 90 + 1}" for i in range(1300)))
    tokens = len(AutoTokenizer.from_pretrained(fam.lang)(text.read_text(), add_special_tokens=False)["input_ids"])
    assert 2 * 512 < tokens - 1 <= 3 * 512  # three 512-token windows
    result = CliRunner().invoke(
        main,
        [
            "sweep",
            recipe,
            "--grid",
            "bottom_layers=1,2,3,4",
            "--eval",
            f"perplexity:{text}",
            "--out",
            str(tmp_path / "out"),
            "--no-baselines",
            "--quiet",
            "--strategy",
            "halving",
            "--halving-min",
            "2",
            "--halving-eta",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # 4 candidates on 2 windows, then the best 2 on all 3 (a slice of 4 would exceed them);
    # items are the tokens scored
    assert [(r["limit"], r["candidates"], r["items"]) for r in summary["rungs"]] == [
        (2, 4, 4 * 1023),
        (None, 2, 2 * (tokens - 1)),
    ]
    spent = 4 * 1023 + 2 * (tokens - 1)
    assert summary["items_spent"] == spent and summary["items_full_grid"] == 4 * (tokens - 1)
    assert f"{spent} item evaluations" in result.output
    assert f"the full grid would take {4 * (tokens - 1)}" in result.output


def test_problem_count_bounds_the_slices(tmp_path):
    import json

    from mergekit_layerswap.tools.evaluate import Evaluator
    from mergekit_layerswap.tools.sweep_inputs import eval_items

    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": "q", "answer": str(i)}) + "\n\n" for i in range(7)))
    assert eval_items(Evaluator(f"exact-match:{problems}")) == 7
    assert eval_items(Evaluator(f"exact-match:{problems}", limit=3)) == 3
