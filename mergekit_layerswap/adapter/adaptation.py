# SPDX-License-Identifier: LGPL-3.0-only
"""Every adaptation of mergekit internals, one row each (verified: mergekit 0.1.5).

mergekit 0.1.5 gives a merge method the output tensor and its inputs, nothing about
where the tensor sits, and its planner reads every input for every tensor. What
``layer_swap`` needs beyond that is done by replacing functions of mergekit, each listed
once in ``PATCHES``: the mergekit module whose attribute is replaced, the owner inside it
(``""`` for the module itself, else a class or object name), the attribute, and the
function that builds the replacement from the original (``"module:function"``). Every
replacement changes nothing for a recipe whose ``merge_method`` is not ``layer_swap``.

The post-import hook (``registration.py``) calls ``on_load`` as each module named here
finishes executing; ``on_load`` first checks that every owner and attribute the rows
(and their ``uses``) name exists, so a mergekit that moved one fails with one message
naming it, and warns when the installed mergekit is not a verified version.
``tests/test_mergekit_api.py`` checks that every row is in place after an import.

One row's wrapper lives above ``adapter/``: mergekit's own commands are click commands,
and only ``cli/`` knows click (``cli/mergekit_scripts.py`` turns this package's errors
into one ``Error:`` line). ``tests/test_layout.py`` reads these strings like imports and
allows exactly that one.
"""

from __future__ import annotations

import importlib

from mergekit_layerswap.adapter.hooks import wrap

# (read at interpreter start by registration.py: no dataclasses, typing or logging here,
# which would cost every Python start milliseconds; see hooks.py)
VERIFIED_MERGEKIT_VERSIONS = ("0.1.5",)
PLANNER = "mergekit_layerswap.adapter.planner"
SCRIPTS = "mergekit_layerswap.cli.mergekit_scripts"
LORA_CACHE = "mergekit_layerswap.adapter.lora_cache"


class Patch:
    """One replaced mergekit function (a row of ``PATCHES``)."""

    __slots__ = ("part", "module", "owner", "attribute", "wrapper", "uses")

    def __init__(self, part: str, module: str, owner: str, attribute: str, wrapper: str, uses: tuple = ()):
        self.part = part  # the part of mergekit it adapts
        self.module = module  # the mergekit module whose attribute is replaced
        self.owner = owner  # "" for the module itself, else the name of a class or object in it
        self.attribute = attribute
        self.wrapper = wrapper  # "package.module:function", called with the original, returns the replacement
        self.uses = uses  # other attributes (or pydantic fields) of the owner the wrapper relies on

    def __repr__(self) -> str:
        return f"Patch({self.module}.{self.owner + '.' if self.owner else ''}{self.attribute} <- {self.wrapper})"


PATCHES: tuple[Patch, ...] = (
    # the recipe is validated (structure, configs, layer counts, weight file headers) first
    # thing in run_merge, before any download, LoRA merge or output file
    Patch("merge", "mergekit.merge", "", "get_architecture_info", f"{PLANNER}:_validating_architecture_info"),
    # the output never overlaps an input, is built in a temporary sibling and swapped
    # into place when complete (output.py)
    Patch("merge", "mergekit.merge", "", "run_merge", f"{PLANNER}:_atomic_run_merge"),
    # config.json, tokenizer and generation config come from the first language expert
    Patch("merge", "mergekit.merge", "", "_model_out_config", f"{PLANNER}:_with_donor_as_base"),
    Patch("merge", "mergekit.merge", "", "_get_donor_model", f"{PLANNER}:_with_donor_as_base"),
    # tensor headers checked and magnitude statistics computed, before anything is written
    Patch("planner", "mergekit.plan", "MergePlanner", "normalize_config", f"{PLANNER}:_normalize_config"),
    # the module mergekit is planning: in a vision-language model only the text decoder's
    # layers are decoder layers; its other modules (vision tower, projector) follow `vision`
    Patch("planner", "mergekit.plan", "MergePlanner", "plan_module", f"{PLANNER}:_plan_module"),
    # the decoder-layer index mergekit is planning (from its architecture definition)
    Patch("planner", "mergekit.plan", "MergePlanner", "plan_layer", f"{PLANNER}:_plan_layer"),
    # only the experts whose role the tensor needs, plus its position and magnitudes
    Patch("planner", "mergekit.plan", "MergePlanner", "plan_tensor", f"{PLANNER}:_plan_tensor"),
    # integer tensors are saved in their own dtype, not out_dtype
    Patch("planner", "mergekit.plan", "MergePlanner", "plan_to_disk", f"{PLANNER}:_plan_to_disk"),
    # a tensor stored one 2-D tensor per expert is converted by mergekit's own
    # convert_checkpoint_tensors from only its stored sources (layout.py), not from every
    # tensor of the checkpoint (O(tensors) per expert tensor); same values
    Patch("loader", "mergekit.io.tasks", "LoadTensor", "_load_converted_tensor", f"{PLANNER}:_converting_from_sources"),
    # a thread warms the input bytes the schedule reads next (readahead.py); the loop is
    # mergekit's, with O(1) bookkeeping per step (O(tasks x tensors) in 0.1.5)
    Patch(
        "executor",
        "mergekit.graph",
        "Executor",
        "_run",
        f"{PLANNER}:_reading_ahead",
        uses=("schedule", "targets", "cached_values", "math_device", "storage_device", "_move_tensors"),
    ),
    # the open shard's tensor names are listed once, not at every read (safetensors builds
    # the list afresh per call; O(tensors in the shard) per read); same tensors
    Patch(
        "loader",
        "mergekit.io.lazy_tensor_loader",
        "LazyTensorLoader",
        "get_tensor",
        f"{PLANNER}:_shard_keys_once",
        uses=("lock", "current_shard"),
    ),
    # each finished shard goes to the kernel's writeback at once (output.py)
    Patch("writer", "mergekit.io.tensor_writer", "TensorWriter", "_write_shard_task", f"{PLANNER}:_writing_back"),
    # a LoRA expert's merge cache entry is keyed by the content of base and adapter, built
    # aside and verified before use, while a layer_swap merge runs (lora_cache.py)
    Patch("loader", "mergekit.common", "ModelReference", "merged", f"{LORA_CACHE}:verified_merged"),
    # a model card that describes the swap
    Patch("card", "mergekit.merge", "", "generate_card", f"{PLANNER}:_layer_swap_card"),
    # an existing local path is local (0.1.5 asks the Hub about relative paths)
    Patch("loader", "mergekit.card", "", "is_hf", f"{PLANNER}:_local_paths_are_local"),
    # every layer_swap stage of a mergekit-multi file is checked before the first runs
    Patch("multimerge", "mergekit.scripts.multimerge", "", "load_config", f"{PLANNER}:_checking_stages"),
    # the devices and the output of every layer_swap stage (each stage and the final) are
    # checked before the first stage runs (output.check_stage_output)
    Patch("multimerge", "mergekit.scripts.multimerge", "", "make_tasks", f"{PLANNER}:_checking_stage_outputs"),
    # the lazy mode skips a stage only when its stored mergekit_config.yml is this stage
    Patch(
        "multimerge",
        "mergekit.scripts.multimerge",
        "MergeModelTask",
        "execute",
        f"{PLANNER}:_lazy_only_when_unchanged",
        uses=("model_copy", "lazy", "config_yaml", "out_path", "name"),
    ),
    # this package's errors as one `Error:` line from mergekit's own commands
    Patch("click", "mergekit.scripts.run_yaml", "main", "callback", f"{SCRIPTS}:translating_run_yaml"),
    Patch("click", "mergekit.scripts.multimerge", "main", "callback", f"{SCRIPTS}:translating_multimerge"),
)

MODULES: tuple[str, ...] = tuple(dict.fromkeys(p.module for p in PATCHES))


def owner_of(module, patch: Patch):
    return getattr(module, patch.owner) if patch.owner else module


def _where(patch: Patch) -> str:
    return f"{patch.module}.{patch.owner}" if patch.owner else patch.module


def _has(owner, name: str) -> bool:
    """An attribute, a pydantic field, or an instance attribute the class annotates."""
    fields = getattr(owner, "model_fields", None) or {}
    return hasattr(owner, name) or name in fields or name in getattr(owner, "__annotations__", {})


def check_present(module, patches) -> None:
    """Every owner, attribute and used name the rows for ``module`` need, or one error naming them."""
    missing = []
    for patch in patches:
        owner = getattr(module, patch.owner, None) if patch.owner else module
        if owner is None:
            missing.append(_where(patch))
            continue
        missing += [f"{_where(patch)}.{name}" for name in (patch.attribute, *patch.uses) if not _has(owner, name)]
    if missing:
        raise RuntimeError(
            f"mergekit-layerswap needs {', '.join(dict.fromkeys(missing))}, which this mergekit lacks; "
            f"it was verified with mergekit {', '.join(VERIFIED_MERGEKIT_VERSIONS)}"
        )


_checked_version = []


def check_version(found: str | None = None) -> None:
    """Warn when the installed mergekit is not one these rows were verified with."""
    import logging
    from importlib.metadata import version

    found = found or version("mergekit")
    if found not in VERIFIED_MERGEKIT_VERSIONS:
        logging.getLogger(__name__).warning(
            "mergekit-layerswap was verified with mergekit %s; found %s",
            ", ".join(VERIFIED_MERGEKIT_VERSIONS),
            found,
        )


def wrapper_of(patch: Patch):
    module_name, _, function = patch.wrapper.partition(":")
    return getattr(importlib.import_module(module_name), function)


def on_load(module) -> None:
    """Apply every row for ``module`` (called by the import hook once it executed)."""
    if not _checked_version:
        _checked_version.append(True)
        check_version()
    patches = [p for p in PATCHES if p.module == module.__name__]
    check_present(module, patches)
    for patch in patches:
        wrap(owner_of(module, patch), patch.attribute, wrapper_of(patch))


def in_place(patch: Patch) -> bool:
    """Whether ``patch`` is applied (its module imported, the attribute replaced)."""
    module = importlib.import_module(patch.module)
    attribute = getattr(owner_of(module, patch), patch.attribute)
    return getattr(attribute, "__layerswap_original__", None) is not None
