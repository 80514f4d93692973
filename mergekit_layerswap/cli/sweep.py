"""``mergekit-layerswap sweep``: a thin command over ``sweep.run_sweep``."""

from __future__ import annotations

import click

from mergekit_layerswap.cli.options import device_option


@click.command("sweep")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("more_grid", nargs=-1, metavar="[NAME=V1,V2 ...]")
@click.option("--grid", "grid", multiple=True, metavar="NAME=V1,V2",
              help="Values of one recipe parameter to sweep, e.g. bottom_layers=3,4,5 (repeatable; further "
                   "NAME=... words after it count too).")
@click.option("--eval", "eval_spec", required=True,
              help="exact-match:FILE.jsonl | perplexity:FILE.txt | lm-eval:TASK")
@click.option("--tasks-path", type=click.Path(exists=True, file_okay=False),
              help="lm-eval: a directory of extra task YAMLs (e.g. from `data mgsm-symbolic`).")
@click.option("--metric", help="lm-eval: the metric,filter that ranks candidates, e.g. "
                               "exact_match,flexible-extract [default: the first one lm-eval reports].")
@click.option("--prompt", type=click.Choice(["chat", "mgsm"]), default="chat", show_default=True,
              help="exact-match: chat = each question alone in a chat turn, zero-shot; mgsm = MGSM native-CoT "
                   "few-shot prompt of a `data mgsm-symbolic` *_test.jsonl.")
@click.option("--chat-template/--no-chat-template", default=False, show_default=True,
              help="lm-eval: apply the tokenizer's chat template (few-shot as multi-turn).")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Generation batch size [default: 8 for exact-match, 1 for lm-eval].")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Tokens generated per answer [default: 96 for exact-match, the task's own for lm-eval].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Results directory.")
@device_option("Evaluate (and compute magnitude statistics) on the GPU.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate at most N items per candidate.")
@click.option("--num-fewshot", type=click.IntRange(min=0),
              help="Shots for lm-eval tasks and --prompt mgsm [default: the task's own; every exemplar].")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Also evaluate the task expert, the language expert and their 1:1 soup.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep_command(recipe, more_grid, grid, eval_spec, tasks_path, metric, prompt, chat_template, batch_size,
                  max_new_tokens, out_dir, device, limit, num_fewshot, baselines, quiet):
    """Merge and evaluate every configuration of a grid, keeping the best as a recipe.

    Writes OUT/results.csv (resumable), OUT/scores.png and OUT/best.yaml.
    """
    from mergekit_layerswap.tools.evaluate import Evaluator, check_spec
    from mergekit_layerswap.tools.sweep import parse_grid, run_sweep

    grid_values = parse_grid(list(grid) + list(more_grid))
    check_spec(eval_spec, prompt=prompt, tasks_path=tasks_path)
    evaluator = Evaluator(eval_spec, limit=limit, num_fewshot=num_fewshot, prompt=prompt, tasks_path=tasks_path,
                          metric=metric, batch_size=batch_size, chat_template=chat_template,
                          max_new_tokens=max_new_tokens)
    summary = run_sweep(
        recipe, grid_values, eval_spec, out_dir,
        evaluate=evaluator,
        device=device, baselines=baselines, echo=click.echo, quiet=quiet,
    )
    best = summary["best"]
    if best is not None:
        click.echo(f"best: {best['name']} ({best['metric']} = {float(best['score']):.6g}); recipe: {out_dir}/best.yaml")
    click.echo(f"results: {summary['results']}")
