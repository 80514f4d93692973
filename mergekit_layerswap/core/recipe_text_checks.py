# SPDX-License-Identifier: LGPL-3.0-only
"""Validation stage 1, the recipe text: a ``layer_swap`` recipe's YAML before mergekit's
schema reads it.

mergekit's pydantic schema silently drops keys it does not know, so ``paramters:`` (a
typo) would merge with every default, and it answers a YAML ``null``, an empty ``models:``
or a list in the wrong place with a traceback. The parsed ``MergeConfiguration`` no longer
shows any of that, so this module reads the YAML node tree (``yaml.compose``), whose marks
give the line to point at. Key names mergekit accepts are passed in (``RecipeSchema``,
read from mergekit's own models by ``adapter/recipe_text_schema.py``); this module stays pure.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import FrozenSet, Iterable, List, Optional, Tuple

import yaml

from mergekit_layerswap.core import METHOD_NAME
from mergekit_layerswap.core.errors import RecipeError
from mergekit_layerswap.core.recipe import (
    BLEND_PREFIX,
    DEFAULTS,
    PER_MODEL_PARAMETERS,
    PLANNER_PARAMETERS,
    SHARED_PARAMETERS,
)

# a line `merge_method: layer_swap` (also as a list item, quoted, with a comment after it)
_LAYER_SWAP_LINE = re.compile(
    r"^[ \t]*(?:-[ \t]+)?merge_method[ \t]*:[ \t]*(['\"]?)" + METHOD_NAME + r"\1[ \t]*(?:#.*)?$",
    re.MULTILINE,
)
_NULL = "tag:yaml.org,2002:null"
_MERGE_KEY = "tag:yaml.org,2002:merge"
_EVERY_PARAMETER = frozenset(SHARED_PARAMETERS + PER_MODEL_PARAMETERS + PLANNER_PARAMETERS + ("weight",))


@dataclass(frozen=True)
class RecipeSchema:
    """The keys mergekit's recipe schema reads at each place of a recipe."""

    top_level: FrozenSet[str]  # MergeConfiguration
    model_entry: FrozenSet[str]  # InputModelDefinition (an item of `models:`)
    model_reference: FrozenSet[str]  # ModelReference written as a mapping
    model_path: FrozenSet[str]  # ModelPath written as a mapping
    tokenizer: FrozenSet[str]  # TokenizerConfig
    conditional: FrozenSet[str]  # ConditionalParameter ({filter: ..., value: ...})


def mentions_layer_swap(text: str) -> bool:
    """Whether a recipe file's text says ``merge_method: layer_swap`` on a line of its own
    (checked on the text, so a file that does not parse is still recognised)."""
    return _LAYER_SWAP_LINE.search(text) is not None


def _line(node) -> int:
    return node.start_mark.line + 1


def _kind(node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "empty (YAML null)"
    return f"the value {node.value!r}"


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`? " if close else ""


class _Checker:
    def __init__(self, source: str, schema: RecipeSchema, extra_top_level: Tuple[str, ...] = ()):
        self.source = source
        self.schema = schema
        self.extra_top_level = frozenset(extra_top_level)

    def fail(self, node, message: str) -> RecipeError:
        if node is None:
            return RecipeError(f"{self.source} {message}")
        return RecipeError(f"{self.source}, line {_line(node)}: {message}")

    # ------------------------------------------------------------ structure
    def items(self, node, where: str) -> List[Tuple[str, object, object]]:
        """(key, key node, value node) of a mapping; refuses repeated and non-text keys
        (YAML keeps only the last of two equal keys, silently)."""
        seen = {}
        out = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_KEY:
                merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for inner in merged:
                    if isinstance(inner, yaml.MappingNode):
                        out.extend(item for item in self.items(inner, where) if item[0] not in seen)
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _NULL:
                raise self.fail(key_node, f"{where} has a key that is not a name; keys are plain words")
            key = str(key_node.value)
            if key in seen:
                raise self.fail(
                    key_node,
                    f"{_join(where, key)} is given twice (also on line {seen[key]}); YAML would keep only "
                    f"the last one; remove one of them",
                )
            seen[key] = _line(key_node)
            out.append((key, key_node, value_node))
        return out

    def expect_mapping(self, node, where: str, example: str, allow_null: bool = False) -> bool:
        if isinstance(node, yaml.MappingNode):
            return True
        if allow_null and isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            return False
        raise self.fail(node, f"{where} must be a mapping of keys (e.g. `{example}`); it is {_kind(node)}")

    def expect_scalar(self, node, where: str, allow_null: bool = True) -> None:
        if isinstance(node, yaml.ScalarNode) and (allow_null or node.tag != _NULL):
            return
        raise self.fail(node, f"{where} must be one value; it is {_kind(node)}")

    def unknown_key(self, key_node, key: str, where: str, known: Iterable[str]) -> RecipeError:
        known = sorted(set(known))
        hint = did_you_mean(key, known)
        if not hint and key in _EVERY_PARAMETER and where == "the recipe":
            hint = f"{key} is a layer_swap parameter: put it under `parameters:`. "
        return self.fail(
            key_node,
            f"unknown key `{key}` in {where}; {hint}mergekit would silently ignore it (known: {', '.join(known)})",
        )

    # ------------------------------------------------------------ documents
    def document(self, node) -> None:
        if node is None:
            raise self.fail(
                None,
                "is empty; a layer_swap recipe needs `merge_method: layer_swap` and a `models:` list (see the README)",
            )
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(
                node,
                f"a recipe must be a mapping of keys (merge_method:, models:, "
                f"parameters:, ...); this one is {_kind(node)}",
            )
        items = self.items(node, "the recipe")
        known = self.schema.top_level | self.extra_top_level
        keys = {key: (key_node, value) for key, key_node, value in items}
        for key, key_node, _value in items:
            if key not in known:
                raise self.unknown_key(key_node, key, "the recipe", known)
        for key in ("slices", "modules"):
            if key in keys and not _is_null(keys[key][1]):
                raise self.fail(
                    keys[key][0],
                    f"layer_swap takes a `models:` list, not `{key}:` (layer positions would be "
                    f"ambiguous); list each expert once under `models:` with its role",
                )
        for key in ("merge_method", "dtype", "out_dtype", "chat_template", "name"):
            if key in keys:
                self.expect_scalar(keys[key][1], key)
        for key in ("base_model", "tokenizer_source"):
            if key in keys and not (isinstance(keys[key][1], yaml.ScalarNode)):
                self.model_reference(keys[key][1], key)
        if "tokenizer" in keys and self.expect_mapping(
            keys["tokenizer"][1], "tokenizer", "source: base", allow_null=True
        ):
            for key, key_node, _ in self.items(keys["tokenizer"][1], "tokenizer"):
                if key not in self.schema.tokenizer:
                    raise self.unknown_key(key_node, key, "tokenizer", self.schema.tokenizer)
        if "parameters" in keys:
            self.parameters(keys["parameters"][1], "parameters", top_level=True)
        if "models" not in keys:
            raise self.fail(
                node,
                "the recipe has no `models:` list; list the task and language experts "
                "under `models:`, each with `parameters: {role: ...}`",
            )
        self.models(keys["models"][0], keys["models"][1])

    def models(self, key_node, node) -> None:
        if _is_null(node) or (isinstance(node, yaml.SequenceNode) and not node.value):
            raise self.fail(
                key_node,
                "models is empty; list the task and language experts, e.g. "
                "`- model: path/to/task` with `parameters: {role: task}`",
            )
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"models must be a list (one `- model: ...` item per expert); it is {_kind(node)}")
        for index, entry in enumerate(node.value):
            where = f"models[{index}]"
            if not isinstance(entry, yaml.MappingNode):
                raise self.fail(
                    entry,
                    f"{where} must be a mapping like `- model: path/to/expert` with "
                    f"`parameters: {{role: task}}`; it is {_kind(entry)}",
                )
            keys = {}
            for key, key_node, value in self.items(entry, where):
                if key not in self.schema.model_entry:
                    hint_where = f"{where} (next to `model:`)"
                    if key in _EVERY_PARAMETER:
                        raise self.fail(
                            key_node,
                            f"{where}.{key} belongs under the model's `parameters:` "
                            f"(e.g. `parameters: {{{key}: ...}}`); mergekit would "
                            f"silently ignore it here",
                        )
                    raise self.unknown_key(key_node, key, hint_where, self.schema.model_entry)
                keys[key] = (key_node, value)
            if "model" not in keys or _is_null(keys["model"][1]):
                raise self.fail(
                    keys.get("model", (entry,))[0], f"{where} has no model path; add `model: path/to/expert`"
                )
            if not isinstance(keys["model"][1], yaml.ScalarNode):
                self.model_reference(keys["model"][1], f"{where}.model")
            if "parameters" in keys:
                self.parameters(keys["parameters"][1], f"{where}.parameters", top_level=False)

    def model_reference(self, node, where: str) -> None:
        if not self.expect_mapping(node, where, "model: path/to/model", allow_null=True):
            return
        for key, key_node, value in self.items(node, where):
            if key not in self.schema.model_reference:
                raise self.unknown_key(key_node, key, where, self.schema.model_reference)
            if isinstance(value, yaml.ScalarNode):
                continue
            if self.expect_mapping(value, _join(where, key), "path: path/to/model", allow_null=True):
                for inner, inner_node, inner_value in self.items(value, _join(where, key)):
                    if inner not in self.schema.model_path:
                        raise self.unknown_key(inner_node, inner, _join(where, key), self.schema.model_path)
                    self.expect_scalar(inner_value, _join(_join(where, key), inner))

    def parameters(self, node, where: str, top_level: bool) -> None:
        example = "bottom_layers: 5" if top_level else "role: task"
        if not self.expect_mapping(node, where, example, allow_null=True):
            return
        allowed = (SHARED_PARAMETERS + ("weight",)) if top_level else PER_MODEL_PARAMETERS
        for key, key_node, value in self.items(node, where):
            name = _join(where, key)
            is_blend = top_level and key.startswith(BLEND_PREFIX)
            # names layer_swap knows but in another place: parse_recipe explains those
            if key not in allowed and key not in _EVERY_PARAMETER and not is_blend:
                hint = did_you_mean(key, allowed)
                raise self.fail(
                    key_node,
                    f"{name} is not a layer_swap parameter; {hint}mergekit would silently pass it "
                    f"on (known: {', '.join(allowed)}{', blend_<name>' if top_level else ''})",
                )
            self.setting(value, name, key)

    def setting(self, node, name: str, key: str, depth: int = 0) -> None:
        """A ParameterSetting: a value, a list of values (a gradient), `{filter:, value:}`
        or a list of those."""
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _NULL:
                raise self.fail(node, f"{name} has no value (YAML null); {_example(key)}, or remove the line")
            return
        if isinstance(node, yaml.SequenceNode):
            if depth > 0:
                raise self.fail(
                    node,
                    f"{name} has a list inside a list; a parameter is one value, a list "
                    f"of values, or a list of `{{filter: ..., value: ...}}` entries",
                )
            if not node.value:
                raise self.fail(node, f"{name} is an empty list; {_example(key)}")
            for item in node.value:
                self.setting(item, name, key, depth + 1)
            return
        keys = {k: v for k, _, v in self.items(node, name)}
        for key_name, key_node, _ in self.items(node, name):
            if key_name not in self.schema.conditional:
                raise self.fail(
                    key_node,
                    f"{name} is a mapping with key `{key_name}`; a parameter is one value, a list of "
                    f"values, or `{{filter: ..., value: ...}}`; {did_you_mean(key_name, self.schema.conditional)}"
                    f"{_example(key)}",
                )
        if "value" not in keys:
            raise self.fail(node, f"{name} is a filter without `value:`; write `{{filter: ..., value: ...}}`")
        self.setting(keys["value"], name, key, depth + 1)
        if "filter" in keys:
            self.expect_scalar(keys["filter"], f"{name}.filter")


def _is_null(node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL


def _join(where: str, key: str) -> str:
    return key if where == "the recipe" else f"{where}.{key}"


def _example(key: str) -> str:
    if key == "role":
        return "write `role: task` or `role: language`"
    if key == "weight":
        return "write a positive number, e.g. `weight: 1.0`"
    if key in DEFAULTS:
        return f"write a value, e.g. `{key}: {DEFAULTS[key]}`"
    return "write a value"


def _compose_all(text: str, source: str) -> list:
    try:
        return list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source}, line {mark.line + 1}" if mark is not None else source
        problem = " ".join(str(error.problem or error.context or "invalid YAML").split())
        raise RecipeError(f"{where}: not valid YAML ({problem}); fix the YAML syntax there") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{source}: not valid YAML ({' '.join(str(error).split())}); fix the YAML syntax") from None


def _is_layer_swap_document(node) -> bool:
    if not isinstance(node, yaml.MappingNode):
        return False
    for key_node, value_node in node.value:
        if getattr(key_node, "value", None) == "merge_method" and isinstance(value_node, yaml.ScalarNode):
            return value_node.value == METHOD_NAME
    return False


def check_recipe_text(text: str, source: str, schema: RecipeSchema) -> None:
    """Refuse, in one line naming the YAML line, a ``layer_swap`` recipe (one YAML
    document) with unknown keys, nulls, empty or misplaced lists, or broken YAML."""
    documents = _compose_all(text, source)
    if len(documents) > 1:
        raise RecipeError(
            f"{source}, line {_line(documents[1])}: holds several YAML documents (`---`); mergekit-yaml "
            f"reads one recipe per file (several stages are for mergekit-multi)"
        )
    _Checker(source, schema).document(documents[0] if documents else None)


def check_multi_recipe_text(text: str, source: str, schema: RecipeSchema) -> None:
    """The same for a mergekit-multi file: each ``layer_swap`` stage is checked (and
    ``name:`` is allowed); other stages are left to mergekit."""
    documents = _compose_all(text, source)
    if not documents:
        raise RecipeError(f"{source} is empty; a mergekit-multi file holds one recipe per YAML document")
    for index, node in enumerate(documents):
        if node is None or not isinstance(node, yaml.MappingNode):
            checker = _Checker(f"{source} (document {index + 1})", schema, ("name",))
            checker.document(node)
        elif _is_layer_swap_document(node):
            _Checker(source, schema, ("name",)).document(node)


def node_at(text: str, path: Tuple, document: int = 0) -> Optional[object]:
    """The YAML node at ``path`` (keys and list indexes, as in a pydantic error's ``loc``),
    or the deepest one found; None when the text does not compose."""
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return None
    if document >= len(documents):
        return None
    node = documents[document]
    for step in path:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == str(step)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            match = node.value[step]
        else:
            match = None
        if match is None:
            break
        node = match
    return node


def line_of(text: str, path: Tuple, document: int = 0) -> Optional[int]:
    node = node_at(text, path, document)
    return _line(node) if node is not None else None
