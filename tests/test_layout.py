# SPDX-License-Identifier: LGPL-3.0-only
"""The package's shape: imports point downward only, no cycle, core is pure Python and
only cli/ knows click. Checked on the source (every import, also inside functions, and
every module named in a string: given to ``import_module`` or written as
``"mergekit_layerswap.x.y:function"`` for the import hook) and on a fresh interpreter."""

import ast
import os
import re
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "mergekit_layerswap")
# lower ranks are imported by higher ones, never the other way round
RANKS = {"core": 0, "adapter": 1, "demo": 1, "tools": 2, "cli": 3}
# the one upward reference, by name only: mergekit's own commands are click commands, only
# cli/ knows click, so the adaptation table's rows for their callbacks name cli's wrappers
ALLOWED_UPWARD = {("mergekit_layerswap.adapter.adaptation", "mergekit_layerswap.cli.mergekit_scripts")}
# a string naming a module of this package ("package.module" or "package.module:function")
MODULE_STRING = re.compile(r"mergekit_layerswap(\.\w+)+(:\w+)?")


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                module = "mergekit_layerswap" + ("" if relative == "__init__" else "." + relative)
                yield module.removesuffix(".__init__"), path


def _imports(module, path):
    """Every module name ``path`` imports, at any depth of the file."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            yield target
            for alias in node.names:  # ``from pkg import module``
                yield f"{target}.{alias.name}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.fullmatch(node.value):
            yield node.value.partition(":")[0]  # importlib.import_module("...") or a hook target
        elif (
            isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
        ):
            argument = node.args[0] if node.args else None
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                yield argument.value  # (a name held in a variable is caught as a string above)


MODULES = dict(_modules())


def _own(name):
    """The package module ``name`` refers to (a module, or the package of an attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _rank(module):
    parts = module.split(".")
    return RANKS.get(parts[1]) if len(parts) > 1 else None


def _graph():
    return {m: {o for o in map(_own, _imports(m, p)) if o and o != m} for m, p in MODULES.items()}


def test_imports_point_downward():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            if target == "mergekit_layerswap":
                continue
            mine, theirs = _rank(module), _rank(target)
            same_package = module.split(".")[:2] == target.split(".")[:2]
            if mine is not None and theirs is not None and not same_package and theirs >= mine:
                if (module, target) not in ALLOWED_UPWARD:
                    upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_cycle():
    graph = _graph()
    state = {}
    cycles = []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _rank(m) == 0 or m.endswith("mergekit_layerswap")))
def test_core_imports_only_the_standard_library_and_yaml(module):
    allowed_third_party = {"yaml"}
    for name in _imports(module, MODULES[module]):
        top = name.split(".")[0]
        if top == "mergekit_layerswap":
            target = _own(name)
            assert target == "mergekit_layerswap" or _rank(target) == 0 or module == "mergekit_layerswap", name
            continue
        assert top in sys.stdlib_module_names or top in allowed_third_party, f"{module} imports {name}"


def test_only_adapter_imports_mergekit():
    """What the package uses of mergekit is in adapter/ (mergekit_parts.py for tools/ and cli/)."""
    offenders = [
        f"{m} imports {name}"
        for m, p in MODULES.items()
        if _rank(m) != 1 or m.split(".")[1] != "adapter"
        for name in _imports(m, p)
        if name.split(".")[0] == "mergekit"
    ]
    assert not offenders, offenders


def test_only_cli_imports_click():
    offenders = [
        m for m, p in MODULES.items() if _rank(m) != 3 for name in _imports(m, p) if name.split(".")[0] == "click"
    ]
    assert not offenders, offenders


def test_core_loads_without_torch_mergekit_or_click():
    code = (
        "import sys, mergekit_layerswap.core.recipe, mergekit_layerswap.core.parameters, "
        "mergekit_layerswap.core.layers, mergekit_layerswap.core.errors; "
        "print(sorted(m for m in ('torch', 'mergekit', 'click') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_source_file_names_its_license():
    """An SPDX line in the first two lines (after a shebang) of every source file."""
    root = os.path.join(os.path.dirname(__file__), "..")
    sources = [os.path.join(root, "mergekit_layerswap.pth")]
    for top in ("mergekit_layerswap", "tests", "bench", "examples", "docs", ".ci"):
        for folder, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "data", "results")]
            sources += [os.path.join(folder, f) for f in files if f.endswith(".py") or top == ".ci"]
    missing = []
    for path in sources:
        with open(path, encoding="utf-8") as handle:
            head = [handle.readline(), handle.readline()]
        if not any(line.startswith("# SPDX-License-Identifier: LGPL-3.0-only") for line in head):
            missing.append(os.path.relpath(path, root))
    assert len(sources) > 100 and not missing, missing


def test_the_architecture_document_names_every_module():
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "architecture.md"), encoding="utf-8") as handle:
        text = handle.read()
    stems = {m.rpartition(".")[2] for m in MODULES if m.count(".") == 2}
    assert not [s for s in sorted(stems) if not re.search(rf"\b{s}\b", text)]
