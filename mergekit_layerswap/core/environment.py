# SPDX-License-Identifier: LGPL-3.0-only
"""The package's on/off environment variables, read strictly: ``NAME=on`` that silently
meant "off" would be a setting the user believes in and the package ignores."""

from __future__ import annotations

import os

from mergekit_layerswap.core.errors import OptionError

_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """True for 1/true/yes/on, False for unset, empty or 0/false/no/off (any case); any
    other value is refused naming the variable."""
    value = os.environ.get(name, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise OptionError(f"{name}={os.environ[name]!r} is neither on nor off; set it to 1 (on) or 0 (off), or unset it")
