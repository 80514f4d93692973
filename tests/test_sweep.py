# SPDX-License-Identifier: LGPL-3.0-only
"""mergekit-layerswap sweep: every grid point once, baselines, resumable, best.yaml exact."""

import csv
import dataclasses
import hashlib
import json
from typing import Optional

import pytest
import torch
from checkpoints import load_tensors
from click.testing import CliRunner
from helpers import run_yaml_inprocess, swap_recipe, write_recipe

from mergekit_layerswap.tools.evaluate import Evaluator

GRID = {"bottom_layers": [1, 2], "top_layers": [0, 1], "bottom_transition": [0, 1]}


@pytest.fixture
def setup(families, tmp_path):
    fam = families("llama")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, base=True, weighting="magnitude"))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(7 * i) % 90 + 1}" for i in range(300)))
    return fam, recipe, str(text)


@dataclasses.dataclass(frozen=True)
class CountingEvaluator(Evaluator):
    """The real evaluator, counting its calls and interrupting after ``fail_after`` of them."""

    calls: list = dataclasses.field(default_factory=list, compare=False)
    fail_after: Optional[int] = None

    def __call__(self, model, tokenizer):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(1)
        return super().__call__(model, tokenizer)

    def settings(self):
        return {"spec": self.spec, "limit": self.limit, "num_fewshot": self.num_fewshot}


def _run(recipe, out, text, calls=None, fail_after=None, grid=GRID, **kwargs):
    from mergekit_layerswap.tools.sweep import run_sweep

    evaluator = CountingEvaluator(f"perplexity:{text}", calls=[] if calls is None else calls, fail_after=fail_after)
    return run_sweep(recipe, grid, str(out), evaluator, echo=lambda s: None, quiet=True, **kwargs)


def _rows(out):
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_point_once_with_baselines_and_deterministic(setup, tmp_path):
    fam, recipe, text = setup
    calls = []
    _run(recipe, tmp_path / "a", text, calls=calls)
    rows = _rows(tmp_path / "a")
    names = [r["name"] for r in rows]
    assert len(calls) == 8 + 3 and len(set(names)) == len(names) == 11
    assert {"task-expert", "language-expert", "soup"} <= set(names)
    assert {(r["bottom_layers"], r["top_layers"], r["bottom_transition"]) for r in rows if r["kind"] == "swap"} == {
        (str(b), str(u), str(t)) for b in (1, 2) for u in (0, 1) for t in (0, 1)
    }
    _run(recipe, tmp_path / "b", text)
    assert (tmp_path / "a" / "results.csv").read_text() == (tmp_path / "b" / "results.csv").read_text()
    assert (tmp_path / "a" / "scores.png").exists()


def test_baseline_scores_equal_the_experts_loaded_from_disk(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_layerswap.tools.evaluate import perplexity

    fam, recipe, text = setup
    _run(recipe, tmp_path / "out", text, grid={"bottom_layers": [1]})
    scores = {r["name"]: float(r["score"]) for r in _rows(tmp_path / "out")}
    tokenizer = AutoTokenizer.from_pretrained(fam.lang)
    for name, path in (("task-expert", fam.task), ("language-expert", fam.lang)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert scores[name] == pytest.approx(perplexity(model, tokenizer, text).value, rel=1e-6)


def test_resume_skips_finished_points(setup, tmp_path):
    fam, recipe, text = setup
    calls = []
    with pytest.raises(KeyboardInterrupt):
        _run(recipe, tmp_path / "out", text, calls=calls, fail_after=5)
    assert len(_rows(tmp_path / "out")) == 5
    assert not (tmp_path / "out" / "best.yaml").exists()
    more = []
    _run(recipe, tmp_path / "out", text, calls=more)
    assert len(more) == 6 and len(_rows(tmp_path / "out")) == 11


def test_best_recipe_reproduces_the_best_candidate_bit_exactly(setup, tmp_path):
    fam, recipe, text = setup
    summary = _run(recipe, tmp_path / "sweep", text)
    best = json.loads((tmp_path / "sweep" / "best_fingerprint.json").read_text())
    assert best["name"] == summary["best"]["name"]
    rows = [r for r in _rows(tmp_path / "sweep") if r["kind"] == "swap"]
    assert best["name"] == min(rows, key=lambda r: float(r["score"]))["name"]
    assert all(r["rung"] == "0" and r["limit"] == "" and r["status"] == "ok" for r in rows)
    result = run_yaml_inprocess(tmp_path / "sweep" / "best.yaml", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    merged = load_tensors(str(tmp_path / "merged"))
    digests = {
        n: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for n, t in merged.items()
    }
    assert digests == best["tensors"]


def test_streaming_fallback_gives_the_same_results(setup, tmp_path, monkeypatch):
    import mergekit_layerswap.tools.sweep_worker as sweep_worker

    fam, recipe, text = setup
    grid = {"bottom_layers": [1, 2], "top_transition": [1]}
    _run(recipe, tmp_path / "memory", text, grid=grid)
    monkeypatch.setattr(sweep_worker, "experts_fit_in_memory", lambda run: False)
    _run(recipe, tmp_path / "stream", text, grid=grid)
    assert (tmp_path / "memory" / "results.csv").read_text() == (tmp_path / "stream" / "results.csv").read_text()


def test_final_number_extraction():
    from mergekit_layerswap.tools.evaluate import final_number

    assert final_number("so the answer is 1,250.") == 1250
    assert final_number("Jibu ni -3.5 na 7") == 7
    assert final_number("hakuna namba") is None


def test_exact_match_scores_known_answers(families, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_layerswap.tools.evaluate import exact_match

    fam = families("llama")
    model = AutoModelForCausalLM.from_pretrained(fam.task, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(fam.task)
    # the random model's own greedy continuation decides which answer is "right"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "w3 w5"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    text = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    numbers = [int(x) for x in "".join(c if c.isdigit() else " " for c in text).split()]
    assert numbers, text
    problems = tmp_path / "p.jsonl"
    problems.write_text(
        json.dumps({"question": "w3 w5", "answer": str(numbers[-1])})
        + "\n"
        + json.dumps({"question": "w3 w5", "answer": str(numbers[-1] + 1)})
        + "\n"
    )
    score = exact_match(model, tokenizer, str(problems), max_new_tokens=8)
    assert score.count == 2 and score.value == 0.5 and score.higher_is_better


@pytest.mark.parametrize(
    "args,word",
    [
        (["--grid", "bottom_layer=1,2"], "cannot be swept"),
        (["--grid", "bottom_layers=a"], "whole numbers"),
        (["--grid", "weighting=inverse"], "one of"),
        (["--grid", "bottom_layers"], "NAME=V1,V2"),
    ],
)
def test_bad_grid(setup, tmp_path, args, word):
    from mergekit_layerswap.cli.main import main

    fam, recipe, text = setup
    result = CliRunner().invoke(
        main, ["sweep", recipe, *args, "--eval", f"perplexity:{text}", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code != 0 and word in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_bad_eval_and_reused_out_dir(setup, tmp_path):
    from mergekit_layerswap.cli.main import main

    fam, recipe, text = setup
    runner = CliRunner()
    result = runner.invoke(
        main, ["sweep", recipe, "--grid", "bottom_layers=1", "--eval", "accuracy:x", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code != 0 and "exact-match:FILE.jsonl" in result.output
    ok = runner.invoke(
        main,
        [
            "sweep",
            recipe,
            "--grid",
            "bottom_layers=1",
            "--eval",
            f"perplexity:{text}",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
            "--no-baselines",
        ],
    )
    assert ok.exit_code == 0, ok.output
    other = runner.invoke(
        main,
        ["sweep", recipe, "--grid", "bottom_layers=2", "--eval", f"perplexity:{text}", "--out", str(tmp_path / "out")],
    )
    assert other.exit_code != 0 and "different sweep (the grid changed; --baselines changed)" in other.output
    assert "--restart" in other.output and len(other.output.strip().splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sweep_on_the_gpu_scores_like_the_cpu(setup, tmp_path):
    """--cuda evaluates (and computes magnitude statistics) on the GPU: same candidates, the
    same perplexities up to float32 rounding on another device."""
    fam, recipe, text = setup
    grid = {"bottom_layers": [1, 2]}
    _run(recipe, tmp_path / "cpu", text, grid=grid, baselines=False)
    _run(recipe, tmp_path / "gpu", text, grid=grid, baselines=False, device="cuda")
    cpu, gpu = _rows(tmp_path / "cpu"), _rows(tmp_path / "gpu")
    assert [r["name"] for r in cpu] == [r["name"] for r in gpu]
    for a, b in zip(cpu, gpu):
        assert float(b["score"]) == pytest.approx(float(a["score"]), rel=1e-3)
