"""Put ``layer_swap`` into mergekit's method registry (idempotent).

Called by the import hook right after ``mergekit.merge_methods.registry`` executes,
while the ``mergekit.merge_methods`` package may still be initialising: only its
already-loaded submodules are used, never the package's own attributes.
"""

from __future__ import annotations

import sys


def on_registry(registry_module) -> None:
    method_module = sys.modules.get("mergekit_layerswap.adapter.kernel")
    if method_module is not None and not hasattr(method_module, "layer_swap"):
        # method.py itself is importing mergekit (it was imported first): it
        # registers the method at its end, once the kernel is defined
        return
    from mergekit_layerswap.adapter.kernel import layer_swap

    names = {m.spec.name for m in registry_module.registered_methods()}
    if layer_swap.spec.name not in names:
        registry_module.register(layer_swap)


def ensure_registered():
    """Import mergekit's registry (which triggers registration) and return the method."""
    import mergekit.merge_methods.registry  # noqa: F401  (runs the hook)

    registry_module = sys.modules["mergekit.merge_methods.registry"]
    on_registry(registry_module)
    from mergekit_layerswap.adapter.kernel import METHOD_NAME

    return registry_module.get(METHOD_NAME)
