"""mergekit's own commands (``mergekit-yaml``, ``mergekit-multi``) with layer_swap recipes:
this package's errors reach the user as one ``Error:`` line, exit status 1, no traceback.

mergekit's click commands print only click exceptions that way; library code here
raises ``LayerSwapError``, so the command's callback is wrapped once, when its module
loads (see ``adapter/registration.py``). Other exceptions pass through untouched.
"""

from __future__ import annotations

import functools

import click

from mergekit_layerswap.core.errors import LayerSwapError, OptionError


def as_click_error(error: LayerSwapError) -> click.ClickException:
    if isinstance(error, OptionError) and error.option:
        return click.BadParameter(str(error), param_hint=error.option)
    return click.ClickException(str(error))


def translating(callback):
    """``callback`` with LayerSwapError turned into the matching click exception."""
    if getattr(callback, "__layerswap_original__", None) is not None:
        return callback

    @functools.wraps(callback)
    def run(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except LayerSwapError as error:
            raise as_click_error(error) from None

    run.__layerswap_original__ = callback
    return run


def on_script(script_module) -> None:
    command = getattr(script_module, "main", None)
    if isinstance(command, click.Command) and command.callback is not None:
        command.callback = translating(command.callback)
