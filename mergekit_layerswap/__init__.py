# SPDX-License-Identifier: LGPL-3.0-only
"""mergekit-layerswap: layer swapping (Bandarkar et al., ICLR 2025) as a mergekit merge method.

Importing this package is cheap: ``adapter.registration.install()`` sets up an import
hook that registers ``layer_swap`` the moment mergekit's registry is imported and
applies the planner adapter when mergekit's planner loads. The installed ``.pth`` file
imports this package at interpreter start, so plain ``mergekit-yaml`` finds the method.
"""

__version__ = "0.1.0"
__all__ = ["layer_swap", "__version__"]

from mergekit_layerswap.adapter import registration

registration.install()


def __getattr__(name):
    if name == "layer_swap":
        return registration.ensure_registered()
    raise AttributeError(name)
