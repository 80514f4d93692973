# SPDX-License-Identifier: LGPL-3.0-only
"""Run a callback right after a named module is first imported (standard library only).

One ``sys.meta_path`` finder waits for the modules named in ``registration.WATCHED``
and hands each, once executed, to its function. Nothing here imports torch or
mergekit, and nothing happens if mergekit is never imported (or not installed).
"""

from __future__ import annotations

import importlib
import sys

# (no ``importlib.abc`` and no ``typing``: in Python 3.11 importing importlib.abc alone
# pulls in importlib.resources, pathlib, tempfile and more, ~18 ms at every start)


def _call(targets, module) -> None:
    """Call each "package.module:function" in ``targets`` (one string or a tuple)."""
    for target in (targets,) if isinstance(targets, str) else targets:
        module_name, _, function = target.partition(":")
        getattr(importlib.import_module(module_name), function)(module)


class _NotifyingLoader:
    """Wraps the module's own loader; runs the callback after the module executed."""

    def __init__(self, loader, target: str):
        self._loader = loader
        self._target = target

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _call(self._target, module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportFinder:
    """A sys.meta_path finder that answers only for the watched module names."""

    def __init__(self):
        self._busy = set()  # names being looked up by the other finders right now

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in WATCHED or fullname in self._busy:
            return None
        import importlib.util  # only now: it costs ~3 ms that a plain start should not pay

        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _NotifyingLoader(spec.loader, WATCHED[fullname])
        return spec


_installed = []
WATCHED = {}  # filled by install()


def install(watched) -> None:
    """Install the finder once for ``watched`` (module name -> "module:function");
    handle modules that were imported before it."""
    WATCHED.update(watched)
    if not _installed:
        finder = _PostImportFinder()
        sys.meta_path.insert(0, finder)
        _installed.append(finder)
    for name, target in WATCHED.items():
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__spec__", None) is not None:
            # already imported (e.g. ``import mergekit.merge`` before this package)
            if name == "mergekit.merge" and not hasattr(module, "run_merge"):
                continue  # still initialising; the callback runs when it finishes
            _call(target, module)


def patched(obj, attribute: str) -> bool:
    return getattr(getattr(obj, attribute, None), "__layerswap_original__", None) is not None


def wrap(obj, attribute: str, make) -> None:
    """Replace ``obj.attribute`` by ``make(original)`` once (idempotent)."""
    if patched(obj, attribute):
        return
    original = getattr(obj, attribute)
    replacement = make(original)
    replacement.__layerswap_original__ = original
    setattr(obj, attribute, replacement)
