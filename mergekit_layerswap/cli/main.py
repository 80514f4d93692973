# SPDX-License-Identifier: LGPL-3.0-only
"""``mergekit-layerswap``: thin click commands over the library.

Each subcommand lives in its own module and is imported only when it runs, so
``mergekit-layerswap --help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from mergekit_layerswap.cli.mergekit_scripts import as_click_error
from mergekit_layerswap.core.errors import LayerSwapError

# subcommand -> "module:click command"
COMMANDS = {
    "explain": "mergekit_layerswap.cli.explain:explain_command",
    "analyze": "mergekit_layerswap.cli.analyze:analyze_command",
    "suggest": "mergekit_layerswap.cli.analyze:suggest_command",
    "demo": "mergekit_layerswap.cli.demo:demo_command",
    "sweep": "mergekit_layerswap.cli.sweep:sweep_command",
    "data": "mergekit_layerswap.cli.data:data_group",
}
HELP = {
    "explain": "Dry run: validate a recipe and show where every layer comes from.",
    "analyze": "Where did each expert change? Per-layer statistics and heatmaps.",
    "suggest": "Propose bottom/top/transition sizes from two experts' changes.",
    "demo": "Build small real experts (SmolLM2-135M) and layer-swap them, offline.",
    "sweep": "Merge and evaluate a grid of swap configurations.",
    "data": "Write offline evaluation data (MGSM-format problems and lm-eval tasks).",
}


class LazyGroup(click.Group):
    """Subcommands imported on first use; the package's errors become one ``Error:`` line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LayerSwapError as error:
            raise as_click_error(error) from None

    def list_commands(self, ctx):
        return sorted(name for name, target in COMMANDS.items() if _available(target))

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None or not _available(target):
            return None
        module_name, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx, formatter):
        rows = [(name, HELP[name]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _available(target: str) -> bool:
    try:
        return importlib.util.find_spec(target.partition(":")[0]) is not None
    except ModuleNotFoundError:
        return False


@click.group(cls=LazyGroup)
@click.version_option(package_name="mergekit-layerswap")
def main():
    """Layer swapping for mergekit (Bandarkar et al., ICLR 2025, arXiv 2410.01335).

    Merges themselves run through mergekit's own CLI: `mergekit-yaml recipe.yaml out/`.
    """


if __name__ == "__main__":
    main()
