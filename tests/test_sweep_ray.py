# SPDX-License-Identifier: LGPL-3.0-only
"""sweep --ray on a real local Ray cluster (two CPU workers, one torch thread each): the
same scores, best.yaml and fingerprint as the serial sweep, and it resumes a serial one."""

import csv
import dataclasses
import json
import sys

import pytest
import torch
from click.testing import CliRunner
from helpers import swap_recipe, write_recipe

from mergekit_layerswap.tools.evaluate import Evaluator

GRID = ["--grid", "bottom_layers=1,2", "--grid", "top_layers=0,1"]


@dataclasses.dataclass(frozen=True)
class InterruptingEvaluator(Evaluator):
    """The real evaluator, interrupted (as by Ctrl-C) after ``stop_after`` calls."""

    calls: list = dataclasses.field(default_factory=list, compare=False)
    stop_after: int = 0

    def __call__(self, model, tokenizer):
        if len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt
        self.calls.append(1)
        return super().__call__(model, tokenizer)

    def settings(self):
        return {k: v for k, v in super().settings().items() if k not in ("calls", "stop_after")}


def _rows(out):
    with open(out / "results.csv", newline="") as handle:
        return {r["name"]: r for r in csv.DictReader(handle)}


@pytest.fixture
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray workers get one thread each: the same reductions
    yield
    torch.set_num_threads(threads)


def test_ray_sweep_gives_the_serial_scores_and_resumes_a_serial_sweep(families, tmp_path, one_torch_thread):
    pytest.importorskip("ray")  # the [test] extra installs it
    from mergekit_layerswap.cli.main import main
    from mergekit_layerswap.tools.sweep import run_sweep

    fam = families("llama")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, base=True, weighting="magnitude"))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(7 * i) % 90 + 1}" for i in range(200)))
    common = [recipe, *GRID, "--eval", f"perplexity:{text}", "--quiet"]
    runner = CliRunner()
    serial = runner.invoke(main, ["sweep", *common, "--out", str(tmp_path / "serial")])
    assert serial.exit_code == 0, serial.output

    # a serial sweep stopped after 2 of its 7 candidates, then finished on Ray
    with pytest.raises(KeyboardInterrupt):
        run_sweep(
            recipe,
            {"bottom_layers": [1, 2], "top_layers": [0, 1]},
            str(tmp_path / "ray"),
            InterruptingEvaluator(f"perplexity:{text}", stop_after=2),
            quiet=True,
            echo=lambda s: None,
        )
    assert len(_rows(tmp_path / "ray")) == 2
    ray_run = runner.invoke(
        main,
        ["sweep", *common, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "2", "--ray-cpus-per-worker", "1"],
    )
    assert ray_run.exit_code == 0, ray_run.output
    assert "Ray: 2 workers (1 CPUs each)" in ray_run.output and "resuming: 2 evaluations" in ray_run.output

    serial_rows, ray_rows = _rows(tmp_path / "serial"), _rows(tmp_path / "ray")
    assert len(ray_rows) == 7
    assert {n: r["score"] for n, r in ray_rows.items()} == {n: r["score"] for n, r in serial_rows.items()}
    assert len({r["score"] for r in serial_rows.values()}) == 7  # distinct scores: agreement is not trivial
    for name in ("best.yaml", "best_fingerprint.json"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "serial" / name).read_text()
    best = json.loads((tmp_path / "ray" / "best_fingerprint.json").read_text())["name"]
    assert f"best: {best}" in ray_run.output


def test_ray_missing_says_how_to_install_it(families, tmp_path, monkeypatch):
    from mergekit_layerswap.cli.main import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    fam = families("llama")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam))
    text = tmp_path / "text.txt"
    text.write_text("w1 w2 w3")
    result = CliRunner().invoke(
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
            "--ray",
        ],
    )
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith("Error:") and "pip install 'mergekit-layerswap[ray]'" in lines[0]
    assert not (tmp_path / "out").exists()
