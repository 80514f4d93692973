# SPDX-License-Identifier: LGPL-3.0-only
"""Read a recipe file into mergekit's ``MergeConfiguration``, refusing bad files in one line."""

from __future__ import annotations

from mergekit_layerswap.core.errors import RecipeError


def load_config(path: str):
    """The recipe at ``path``; a layer_swap recipe's text is checked first (unknown keys,
    nulls, broken YAML), then mergekit's schema, each refused in one line."""
    from mergekit_layerswap.adapter.recipe_text_schema import read_recipe_text

    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read recipe file {path}: {error}") from None
    try:
        return read_recipe_text(text, path, layer_swap_command=True)
    except RecipeError:
        raise
    except Exception as error:  # another method's recipe: YAML or mergekit schema error
        text = " ".join(str(error).split())
        raise RecipeError(f"{path} is not a valid mergekit recipe: {text[:300]}") from None
