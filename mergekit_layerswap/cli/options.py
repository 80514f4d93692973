# SPDX-License-Identifier: LGPL-3.0-only
"""Options several commands share."""

from __future__ import annotations

import click


def _device(ctx, param, cuda: bool) -> str:
    if not cuda:
        return "cpu"
    from mergekit_layerswap.adapter.devices import device_problem  # imports torch: `--help` stays fast

    problem = device_problem("cuda")
    if problem is not None:
        raise click.BadParameter(f"no CUDA device is available: {problem}; drop --cuda", ctx=ctx, param=param)
    return "cuda"


def device_option(help_text: str):
    """``--cuda``, passed to the command as ``device`` ("cuda" or "cpu")."""
    return click.option("--cuda", "device", is_flag=True, callback=_device, help=help_text)
