# SPDX-License-Identifier: LGPL-3.0-only
"""Options several commands share."""

from __future__ import annotations

import click


def _device(ctx, param, cuda: bool) -> str:
    if not cuda:
        return "cpu"
    import torch  # only when asked for: `--help` stays fast

    if not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is available; drop --cuda", ctx=ctx, param=param)
    return "cuda"


def device_option(help_text: str):
    """``--cuda``, passed to the command as ``device`` ("cuda" or "cpu")."""
    return click.option("--cuda", "device", is_flag=True, callback=_device, help=help_text)
