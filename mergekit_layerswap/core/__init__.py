# SPDX-License-Identifier: LGPL-3.0-only
"""Layer swapping itself: Algorithm 1, the recipe's parameters, recipe parsing and errors.

Pure Python (no torch, no mergekit, no click), so recipes are explained and checked
cheaply; ``tests/test_layout.py`` enforces it. Constants here are imported at
interpreter start, so this file imports nothing.
"""

METHOD_NAME = "layer_swap"
PAPER_URL = "https://arxiv.org/abs/2410.01335"
