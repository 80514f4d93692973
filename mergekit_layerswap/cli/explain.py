# SPDX-License-Identifier: LGPL-3.0-only
"""``mergekit-layerswap explain``: validate a recipe and show where every layer comes from."""

from __future__ import annotations

import json

import click


@click.command("explain")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Allow custom code in model configs.")
def explain_command(recipe: str, fmt: str, trust_remote_code: bool):
    """Validate RECIPE as a merge would and show where every layer comes from (reads no tensors)."""
    from mergekit_layerswap.tools.explain import explain, render_text

    report = explain(recipe, trust_remote_code=trust_remote_code)
    click.echo(json.dumps(report, indent=2) if fmt == "json" else render_text(report))
