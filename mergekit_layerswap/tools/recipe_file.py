"""Read a recipe file into mergekit's ``MergeConfiguration``, refusing bad files in one line."""

from __future__ import annotations

import yaml

from mergekit_layerswap.core.errors import RecipeError


def load_config(path: str):
    from mergekit.config import MergeConfiguration

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
        return MergeConfiguration.model_validate(data)
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except Exception as error:  # YAML or mergekit schema error
        text = " ".join(str(error).split())
        raise RecipeError(f"{path} is not a valid mergekit recipe: {text[:300]}") from None
