# SPDX-License-Identifier: LGPL-3.0-only
"""How this package connects to mergekit at import time (verified: mergekit 0.1.5).

mergekit 0.1.5 has a method registry but no plugin entry point. The installed
``mergekit_layerswap.pth`` imports this package at interpreter start, which calls
``install()``: a post-import hook (``hooks.py``) then hands each module in ``WATCHED``,
right after it executes, to the function named for it: the registry gets the method,
and every module of the adaptation table (``adaptation.py``) gets its rows applied.
Nothing here imports torch or mergekit, so an interpreter that never uses mergekit pays
only for the hook (~3 ms).
"""

from __future__ import annotations

import sys

from mergekit_layerswap.adapter import hooks
from mergekit_layerswap.adapter.adaptation import MODULES
from mergekit_layerswap.core import METHOD_NAME

KERNEL_MODULE = "mergekit_layerswap.adapter.kernel"

# module name -> "package.module:function" (or a tuple of them) called with the freshly executed module
WATCHED = {
    # the method joins mergekit's registry, whichever of the two is imported first
    "mergekit.merge_methods.registry": "mergekit_layerswap.adapter.registration:on_registry",
    KERNEL_MODULE: "mergekit_layerswap.adapter.registration:on_kernel",
    # every adaptation of mergekit internals: the rows of adaptation.PATCHES for that module
    **dict.fromkeys(MODULES, "mergekit_layerswap.adapter.adaptation:on_load"),
}


def install() -> None:
    hooks.install(WATCHED)


def _register(registry_module, kernel_module) -> None:
    names = {m.spec.name for m in registry_module.registered_methods()}
    if METHOD_NAME not in names:
        registry_module.register(kernel_module.layer_swap)


def on_registry(registry_module) -> None:
    kernel = sys.modules.get(KERNEL_MODULE)
    if kernel is not None and not hasattr(kernel, "layer_swap"):
        return  # the kernel is importing mergekit right now; on_kernel registers it
    import importlib

    _register(registry_module, importlib.import_module(KERNEL_MODULE))


def on_kernel(kernel_module) -> None:
    registry = sys.modules.get("mergekit.merge_methods.registry")
    if registry is not None and hasattr(registry, "registered_methods"):
        _register(registry, kernel_module)


def ensure_registered():
    """Import mergekit's registry (which triggers registration) and return the method."""
    import mergekit.merge_methods.registry  # noqa: F401  (runs the hook)

    registry_module = sys.modules["mergekit.merge_methods.registry"]
    on_registry(registry_module)
    return registry_module.get(METHOD_NAME)
