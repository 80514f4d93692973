# SPDX-License-Identifier: LGPL-3.0-only
"""The package's own errors. Every one of them is a problem with what the user gave
(a recipe, an option, a file), reported as one line that says what is wrong and how to
fix it. Only ``cli/`` turns them into click errors; library code never imports click.
"""

from __future__ import annotations

from typing import Optional


class LayerSwapError(Exception):
    """Base class: a bad input, found before (or instead of) writing anything."""


class RecipeError(LayerSwapError, ValueError):
    """A bad ``layer_swap`` recipe or model set (structure, configs, tensors)."""


class OptionError(LayerSwapError, ValueError):
    """A bad value for one command-line option of ``mergekit-layerswap``."""

    def __init__(self, message: str, option: Optional[str] = None):
        super().__init__(message)
        self.option = option


class DataError(LayerSwapError):
    """Data files (problem sets, templates, eval files) that cannot be used."""


class OutputError(LayerSwapError):
    """An output location a merge must not or cannot write (an input, foreign files, no space)."""
