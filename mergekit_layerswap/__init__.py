"""mergekit-layerswap: layer swapping (Bandarkar et al., ICLR 2025) as a mergekit merge method.

Importing this package is cheap: it installs an import hook that registers the
``layer_swap`` method the moment mergekit's registry is imported, and applies the
planner adapter when mergekit's planner loads. The installed ``.pth`` file does this
at interpreter start, so plain ``mergekit-yaml`` finds the method.
"""

__version__ = "0.1.0"

from mergekit_layerswap.adapter import hooks as _hooks

_hooks.install()


def __getattr__(name):
    if name == "layer_swap":
        from mergekit_layerswap.adapter.registration import ensure_registered

        return ensure_registered()
    raise AttributeError(name)
