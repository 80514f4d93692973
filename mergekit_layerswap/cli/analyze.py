# SPDX-License-Identifier: LGPL-3.0-only
"""``mergekit-layerswap analyze`` and ``suggest``: thin click commands over
``analysis``, ``heatmap`` and ``suggest``. Every input is checked before a model is
streamed, and nothing is written until all statistics are computed."""

from __future__ import annotations

import os

import click
import numpy as np

from mergekit_layerswap.cli.options import device_option
from mergekit_layerswap.core.files import looks_like_hub_id
from mergekit_layerswap.tools.analysis import AUTO, AUTO_QUANTILE, DEFAULT_THRESHOLDS


class ModelType(click.ParamType):
    """A local model directory or a hub id, parsed by mergekit, whose config.json reads."""

    name = "MODEL"

    def convert(self, value, param, ctx):
        from mergekit_layerswap.adapter.mergekit_parts import parse_model_reference

        if not isinstance(value, str):
            return value
        try:
            model = parse_model_reference(value)
        except Exception as error:
            self.fail(f"{value!r} is not a model reference ({error}); give a directory or a hub id", param, ctx)
        if model.lora is not None:
            self.fail(f"{value}: LoRA adapters are not analysed; merge the adapter into its model first", param, ctx)
        path = os.path.expanduser(model.model.path)
        if not os.path.isdir(path) and not looks_like_hub_id(path):
            self.fail(f"{value}: no such model directory; give a local model directory or a hub id", param, ctx)
        try:
            model.config()
        except Exception as error:
            text = str(error).strip()
            reason = text.splitlines()[0] if text else type(error).__name__
            self.fail(
                f"cannot read config.json of {value} ({reason}); give a local model directory "
                f"or a reachable Hugging Face hub id",
                param,
                ctx,
            )
        return model


class ThresholdType(click.ParamType):
    name = "THRESHOLD"

    def convert(self, value, param, ctx):
        if value == AUTO or isinstance(value, float):
            return value
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not number > 0 or number == float("inf"):
            self.fail(f"{value!r} is neither a positive number nor 'auto'; e.g. 1.9e-5 or auto", param, ctx)
        return number


MODEL = ModelType()
THRESHOLD = ThresholdType()


def _check_distinct(base, models, hint: str) -> None:
    if base in models:
        raise click.BadParameter(
            f"{base} is also --base; compare experts fine-tuned from the base, not the base itself", param_hint=hint
        )
    seen = set()
    for model in models:
        if model in seen:
            raise click.BadParameter(f"{model} is given twice; give each expert once", param_hint=hint)
        seen.add(model)


def _unchanged(delta) -> bool:
    """Every row of every decoder-layer tensor equals the base's (an expert saved before training)."""
    profile = delta.layer_profile()
    return bool((profile[~np.isnan(profile)] == 0).all())


@click.command("analyze")
@click.option("--base", required=True, type=MODEL, help="The model the experts were fine-tuned from.")
@click.option(
    "--expert", "experts", required=True, multiple=True, type=MODEL, help="An expert to analyse (repeat for several)."
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, dir_okay=True),
    help="Directory for stats.csv, stats.json and the figures.",
)
@click.option(
    "--threshold",
    "thresholds",
    multiple=True,
    type=THRESHOLD,
    help=f"Row-MAV threshold(s) for the share columns (repeatable; a number or 'auto' = each "
    f"expert's {AUTO_QUANTILE:g} quantile). Default: 1.9e-5, 1e-5 and auto.",
)
@click.option(
    "--heatmap-threshold", type=THRESHOLD, default=AUTO, show_default=True, help="Threshold the heatmaps colour by."
)
@device_option("Compute the differences on the GPU.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def analyze_command(base, experts, out_dir, thresholds, heatmap_threshold, device, quiet):
    """Where did each expert change? Per-layer, per-matrix statistics and heatmaps."""
    from mergekit_layerswap.tools import analysis, heatmap

    heatmap.require_matplotlib()
    _check_distinct(base, list(experts), "--expert")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise click.BadParameter(f"{out_dir} is a file; give a directory", param_hint="--out")
    thresholds = list(dict.fromkeys(thresholds or DEFAULT_THRESHOLDS))
    if heatmap_threshold not in thresholds:
        thresholds.append(heatmap_threshold)

    deltas = analysis.analyze_experts(base, experts, device=device, quiet=quiet)
    written = analysis.write_stats(deltas, thresholds, out_dir)
    written += heatmap.write_figures(deltas, heatmap_threshold, out_dir)
    for delta in deltas:
        click.echo(
            f"{delta.name}: {delta.model}, {delta.num_layers} layers, auto threshold {delta.auto_threshold():.3g}"
        )
        if _unchanged(delta):
            click.echo(f"{delta.name}: no decoder layer differs from --base {base}; is this the fine-tuned expert?")
    for path in written:
        click.echo(f"wrote {path}")


@click.command("suggest")
@click.option("--base", required=True, type=MODEL, help="The model both experts were fine-tuned from.")
@click.option("--task", required=True, type=MODEL, help="The task expert (e.g. English math).")
@click.option("--language", required=True, type=MODEL, help="The language expert.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write the recipe here (default: print it).")
@click.option("--no-clip", is_flag=True, help="The raw rule, not clipped to the paper's searched ranges.")
@click.option(
    "--per-module",
    is_flag=True,
    help="Also run the rule on attention tensors and on the rest of each layer, and propose per-module zones "
    "(filter form) where the two differ.",
)
@device_option("Compute the differences on the GPU.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def suggest_command(base, task, language, out_path, no_clip, per_module, device, quiet):
    """Propose bottom/top/transition sizes from the two experts' per-layer changes."""
    from mergekit_layerswap.tools import analysis, suggest

    _check_distinct(base, [task, language], "--task/--language")
    if out_path and os.path.isdir(out_path):
        raise click.BadParameter(f"{out_path} is a directory; give a file name", param_hint="--out")
    if out_path and not os.path.isdir(os.path.dirname(os.path.abspath(out_path))):
        raise click.BadParameter(f"the directory of {out_path} does not exist; create it first", param_hint="--out")
    task_delta, language_delta = analysis.analyze_experts(base, [task, language], device=device, quiet=quiet)
    try:
        if per_module:
            names = [name for name, place in task_delta.places.items() if place.layer is not None]
            module_filter = suggest.attention_filter(names)
            if module_filter is None:
                raise click.BadParameter(
                    "no attention tensors are told apart by name in this architecture; drop --per-module",
                    param_hint="--per-module",
                )
            result, _ = suggest.suggest_module_zones(language_delta, task_delta, module_filter, clip=not no_clip)
        else:
            result = suggest.suggest_zones(language_delta.layer_profile(), task_delta.layer_profile(), clip=not no_clip)
    except ValueError as error:
        reason = str(error)
        same = [f"{option} {d.model}" for option, d in (("--task", task_delta), ("--language", language_delta))]
        same = [name for name, d in zip(same, (task_delta, language_delta)) if _unchanged(d)]
        if same:
            verb = "do" if len(same) > 1 else "does"
            reason = f"{' and '.join(same)} {verb} not differ from --base {base} in any decoder layer"
        raise click.ClickException(f"{reason}; both experts must be fine-tuned away from --base") from None
    # the table goes to stderr when the recipe itself goes to stdout (`suggest ... > recipe.yaml`)
    click.echo(suggest.reasoning(result, language_delta.name, task_delta.name), err=not out_path)
    text = suggest.recipe_text(result, task, language, base)
    if out_path:
        suggest.write_text(out_path, text)
        click.echo(f"wrote {out_path}")
    else:
        click.echo(text, nl=False)
