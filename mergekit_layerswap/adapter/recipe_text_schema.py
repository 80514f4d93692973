# SPDX-License-Identifier: LGPL-3.0-only
"""Validation stage 1, the recipe text, against mergekit's recipe schema (verified: mergekit
0.1.5).

* ``recipe_schema()`` reads the key names mergekit's pydantic models accept, for the
  text check in ``core/recipe_text_checks.py`` (mergekit drops any other key silently);
* ``read_recipe_text`` / ``read_multi_recipe_text`` run that check and then mergekit's own
  schema, translating its errors (pydantic's several-line reports, bare ``RuntimeError``s
  from its validators) into one ``RecipeError`` naming the key and its YAML line;
* ``check_dtypes`` refuses a ``dtype`` / ``out_dtype`` mergekit cannot use, before
  ``run_merge`` creates the output directory (mergekit raises only when it writes).
"""

from __future__ import annotations

import functools
from typing import Any, List, Optional, Tuple

import yaml

from mergekit_layerswap.core.errors import RecipeError
from mergekit_layerswap.core.recipe_text_checks import (
    RecipeSchema,
    check_multi_recipe_text,
    check_recipe_text,
    line_of,
    mentions_layer_swap,
)

# dtypes a layer_swap output may have (mergekit's dtype_from_name also knows int64)
FLOATING_DTYPES = ("bfloat16", "float16", "float32", "float64")


@functools.lru_cache(maxsize=1)
def recipe_schema() -> RecipeSchema:
    from mergekit.common import ModelPath, ModelReference
    from mergekit.config import ConditionalParameter, InputModelDefinition, MergeConfiguration
    from mergekit.tokenizer.config import TokenizerConfig

    def fields(model) -> frozenset:
        return frozenset(model.model_fields)

    return RecipeSchema(
        top_level=fields(MergeConfiguration),
        model_entry=fields(InputModelDefinition),
        model_reference=fields(ModelReference),
        model_path=fields(ModelPath),
        tokenizer=fields(TokenizerConfig),
        conditional=fields(ConditionalParameter),
    )


def _where(path: Tuple) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def _schema_error(error: Exception, text: str, source: str, document: int = 0) -> RecipeError:
    """One line for an error mergekit's schema raised while validating document ``document``."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        details = error.errors()
        first = details[0] if details else {"loc": (), "msg": str(error)}
        # a union's alternatives each report; the key path without the union's type tags
        path = tuple(step for step in first.get("loc", ()) if isinstance(step, int) or not _is_type_tag(step))
        line = line_of(text, path, document)
        where = f"{source}, line {line}" if line else source
        key = _where(path) or "the recipe"
        message = " ".join(str(first.get("msg", "invalid value")).split())
        return RecipeError(f"{where}: {key}: {message} (mergekit's recipe schema); fix that value")
    message = " ".join(str(error).split()) or type(error).__name__
    return RecipeError(f"{source}: mergekit's recipe schema refuses it: {message[:300]}")


def _is_type_tag(step: Any) -> bool:
    """pydantic names union members in ``loc`` (``str``, ``ModelReference``, ``list[...]``,
    ``function-after[...]``); they are not keys of the recipe."""
    text = str(step)
    return text[:1].isupper() or "[" in text or text in ("str", "int", "float", "bool", "literal")


def _load(text: str, source: str) -> List[Any]:
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark is not None else source
        raise RecipeError(f"{where}: not valid YAML; fix the YAML syntax there") from None


def _names_another_method(text: str) -> bool:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and data.get("merge_method") is not None


def read_recipe_text(text: str, source: str, layer_swap_command: bool = False):
    """A recipe file's text -> ``MergeConfiguration``; layer_swap recipes are checked
    (text, then schema) and refused in one line. With ``layer_swap_command`` (explain,
    sweep: commands that take only layer_swap recipes) an empty, broken or non-mapping
    file is refused the same way."""
    from mergekit.config import MergeConfiguration

    if not mentions_layer_swap(text) and not (layer_swap_command and not _names_another_method(text)):
        return MergeConfiguration.model_validate(yaml.safe_load(text))
    check_recipe_text(text, source, recipe_schema())
    (data,) = _load(text, source)
    try:
        config = MergeConfiguration.model_validate(data)
    except Exception as error:  # pydantic's ValidationError, or a validator's RuntimeError
        raise _schema_error(error, text, source) from None
    check_dtypes(config, source)
    return config


def read_multi_recipe_text(text: str, source: str) -> None:
    """Check a mergekit-multi file that has layer_swap stages: each stage's text, and
    each stage against mergekit's schema (mergekit's own load_config then reads it)."""
    from mergekit.config import MergeConfiguration

    if not mentions_layer_swap(text):
        return
    check_multi_recipe_text(text, source, recipe_schema())
    names = set()
    for index, data in enumerate(_load(text, source)):
        where = f"{source} (document {index + 1})"
        data = dict(data)
        name = data.pop("name", None)
        if name in names:
            raise RecipeError(
                f"{where}: "
                + (
                    f"stage name {name!r} is used twice; give each stage its own name"
                    if name is not None
                    else "a second stage without `name:`; only the final stage may be unnamed"
                )
            )
        names.add(name)
        try:
            config = MergeConfiguration.model_validate(data)
        except Exception as error:
            raise _schema_error(error, text, where, index) from None
        if config.merge_method == "layer_swap":
            check_dtypes(config, where)


def check_dtypes(config, source: Optional[str] = None) -> None:
    """``dtype`` and ``out_dtype`` must name a floating dtype mergekit knows."""
    from mergekit.common import dtype_from_name

    for key in ("dtype", "out_dtype"):
        value = getattr(config, key, None)
        if value is None:
            continue
        try:
            known = dtype_from_name(value) is not None
        except Exception:
            known = False
        name = str(value)[len("torch.") :] if str(value).startswith("torch.") else str(value)
        if not known or name not in FLOATING_DTYPES:
            prefix = f"{source}: " if source else ""
            raise RecipeError(
                f"{prefix}{key}: {value!r} is not a dtype a layer_swap merge can write; use one of "
                f"{', '.join(FLOATING_DTYPES)}"
            )
