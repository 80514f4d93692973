# SPDX-License-Identifier: LGPL-3.0-only
"""``mergekit-layerswap sweep``: a thin command over ``sweep.run_sweep``."""

from __future__ import annotations

import click

from mergekit_layerswap.cli.options import device_option


@click.command("sweep")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("more_grid", nargs=-1, metavar="[NAME=V1,V2 ...]")
@click.option(
    "--grid",
    "grid",
    multiple=True,
    metavar="NAME=V1,V2",
    help="Values of one recipe parameter to sweep, e.g. bottom_layers=3,4,5 (repeatable; further "
    "NAME=... words after it count too).",
)
@click.option("--eval", "eval_spec", required=True, help="exact-match:FILE.jsonl | perplexity:FILE.txt | lm-eval:TASK")
@click.option(
    "--tasks-path",
    type=click.Path(exists=True, file_okay=False),
    help="lm-eval: a directory of extra task YAMLs (e.g. from `data mgsm-symbolic`).",
)
@click.option(
    "--metric",
    help="lm-eval: the metric,filter that ranks candidates, e.g. "
    "exact_match,flexible-extract [default: the first one lm-eval reports].",
)
@click.option(
    "--prompt",
    type=click.Choice(["chat", "mgsm"]),
    default="chat",
    show_default=True,
    help="exact-match: chat = each question alone in a chat turn, zero-shot; mgsm = MGSM native-CoT "
    "few-shot prompt of a `data mgsm-symbolic` *_test.jsonl.",
)
@click.option(
    "--chat-template/--no-chat-template",
    default=False,
    show_default=True,
    help="lm-eval: apply the tokenizer's chat template (few-shot as multi-turn).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Generation batch size [default: 8 for exact-match, 1 for lm-eval].",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    help="Tokens generated per answer [default: 96 for exact-match, the task's own for lm-eval].",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Results directory.")
@device_option("Evaluate (and compute magnitude statistics) on the GPU.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate at most N items per candidate.")
@click.option(
    "--num-fewshot",
    type=click.IntRange(min=0),
    help="Shots for lm-eval tasks and --prompt mgsm [default: the task's own; every exemplar].",
)
@click.option(
    "--baselines/--no-baselines",
    default=True,
    show_default=True,
    help="Also evaluate the task expert, the language expert and their 1:1 soup.",
)
@click.option(
    "--strategy",
    type=click.Choice(["grid", "halving"]),
    default="grid",
    show_default=True,
    help="grid: every candidate on every item; halving: successive halving over growing slices.",
)
@click.option(
    "--halving-min",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Items in successive halving's first slice.",
)
@click.option(
    "--halving-eta",
    type=click.IntRange(min=2),
    default=3,
    show_default=True,
    help="Successive halving keeps the best 1/ETA of each rung on a slice ETA times larger.",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Run candidates on Ray actors: a local cluster started for this run (plain --ray), or an "
    "existing cluster (--ray auto, --ray HOST:PORT, --ray ray://HOST:10001).",
)
@click.option(
    "--ray-workers",
    type=click.IntRange(min=1),
    help="Ray workers (default: one per GPU with --cuda, else one per --ray-cpus-per-worker CPUs).",
)
@click.option(
    "--ray-cpus-per-worker",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="CPU cores (and torch threads) per Ray worker without --cuda.",
)
@click.option("--restart", is_flag=True, help="Discard the results already in --out and start over.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep_command(
    recipe,
    more_grid,
    grid,
    eval_spec,
    tasks_path,
    metric,
    prompt,
    chat_template,
    batch_size,
    max_new_tokens,
    out_dir,
    device,
    limit,
    num_fewshot,
    baselines,
    strategy,
    halving_min,
    halving_eta,
    ray_address,
    ray_workers,
    ray_cpus_per_worker,
    restart,
    quiet,
):
    """Merge and evaluate every configuration of a grid, keeping the best as a recipe.

    Writes OUT/results.csv (resumable), OUT/sweep.json (what the scores were computed
    from; a resume with other inputs is refused), OUT/summary.json, OUT/scores.png and
    OUT/best.yaml.
    """
    from mergekit_layerswap.tools.evaluate import Evaluator, check_spec
    from mergekit_layerswap.tools.sweep import Grid, Halving, parse_grid, run_sweep
    from mergekit_layerswap.tools.sweep_ray import RayOptions

    grid_values = parse_grid(list(grid) + list(more_grid))
    check_spec(eval_spec, prompt=prompt, tasks_path=tasks_path)
    evaluator = Evaluator(
        eval_spec,
        limit=limit,
        num_fewshot=num_fewshot,
        prompt=prompt,
        tasks_path=tasks_path,
        metric=metric,
        batch_size=batch_size,
        chat_template=chat_template,
        max_new_tokens=max_new_tokens,
    )
    ray = None
    if ray_address is not None:
        ray = RayOptions(address=ray_address, workers=ray_workers, cpus_per_worker=ray_cpus_per_worker)
    summary = run_sweep(
        recipe,
        grid_values,
        out_dir,
        evaluator,
        device=device,
        baselines=baselines,
        strategy=Halving(halving_min, halving_eta) if strategy == "halving" else Grid(),
        ray=ray,
        restart=restart,
        echo=click.echo,
        quiet=quiet,
    )
    best = summary["best"]
    if best is not None:
        click.echo(f"best: {best['name']} ({best['metric']} = {float(best['score']):.6g}); recipe: {out_dir}/best.yaml")
    else:
        click.echo("no candidate got a finite score: no best.yaml written")
    click.echo(f"results: {summary['results']}")
