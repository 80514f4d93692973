# SPDX-License-Identifier: LGPL-3.0-only
"""mergekit's own commands (``mergekit-yaml``, ``mergekit-multi``) with layer_swap recipes:
this package's errors reach the user as one ``Error:`` line, exit status 1, no traceback.

A recipe file whose text says ``merge_method: layer_swap`` is first read and checked by
this package (``adapter/recipe_text_schema.py``: unknown keys, nulls, broken YAML, mergekit's
own schema errors), before mergekit's callback opens it or creates any directory; other
files reach mergekit untouched.

mergekit's click commands print only click exceptions that way; library code here
raises ``LayerSwapError``, so the command's callback is wrapped once, when its module
loads (a row of ``adapter/adaptation.py``). Other exceptions pass through untouched.
"""

from __future__ import annotations

import functools

import click

from mergekit_layerswap.core.errors import LayerSwapError, OptionError


def as_click_error(error: LayerSwapError) -> click.ClickException:
    if isinstance(error, OptionError) and error.option:
        return click.BadParameter(str(error), param_hint=error.option)
    return click.ClickException(str(error))


def _check_recipe_file(script_name: str, config_file, options) -> None:
    """Check a layer_swap recipe file (and mergekit's options for it) before mergekit reads
    it or applies the options (other files: nothing)."""
    from mergekit_layerswap.adapter.recipe_text_schema import read_multi_recipe_text, read_recipe_text
    from mergekit_layerswap.core.recipe_text_checks import mentions_layer_swap

    if not isinstance(config_file, str):
        return
    try:
        with open(config_file, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError):
        return  # mergekit reports it as it always has
    if script_name.endswith("multimerge"):
        read_multi_recipe_text(text, config_file)
    else:
        read_recipe_text(text, config_file)
    if not mentions_layer_swap(text):
        return
    out = options.get("out_path")
    if isinstance(out, str) and not out.strip():
        # it would resolve to the current directory
        raise OptionError("the output path is empty; give the directory the merge should be written to")
    threads = options.get("num_threads")
    if threads is not None and threads < 1:
        # mergekit passes it to torch.set_num_threads, which raises a RuntimeError
        raise OptionError(f"-j/--num-threads is {threads}; give a number of threads of at least 1, or leave it out")


def translating(callback, script_name: str = ""):
    """``callback`` with LayerSwapError turned into the matching click exception."""
    if getattr(callback, "__layerswap_original__", None) is not None:
        return callback

    @functools.wraps(callback)
    def run(*args, **kwargs):
        try:
            if script_name:
                _check_recipe_file(script_name, kwargs.get("config_file"), kwargs)
            return callback(*args, **kwargs)
        except LayerSwapError as error:
            raise as_click_error(error) from None

    run.__layerswap_original__ = callback
    return run


def translating_run_yaml(callback):
    """The replacement of ``mergekit-yaml``'s callback (a row of ``adapter/adaptation.py``)."""
    return translating(callback, "mergekit.scripts.run_yaml")


def translating_multimerge(callback):
    """The replacement of ``mergekit-multi``'s callback (a row of ``adapter/adaptation.py``)."""
    return translating(callback, "mergekit.scripts.multimerge")
