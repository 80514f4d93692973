# SPDX-License-Identifier: LGPL-3.0-only
"""The README's architecture list stays true: it is core/architectures.py's table, the
table has one row per definition mergekit 0.1.5 has, each row's kind fits the
definition's structure, and every row marked ``tests`` names checkpoints of exactly
that architecture which the merge tests use."""

import os

import pytest
from checkpoints import ARCHS, stored_layout

from mergekit_layerswap.core import architectures as table

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _mergekit_definitions():
    """key -> module names, for every JSON definition and every Python one mergekit's
    ``arch_info_for_config`` builds (moe_defs.py)."""
    from mergekit.architecture import moe_defs
    from mergekit.architecture.json_definitions import JSON_ARCHITECTURES

    found = {}
    for arch in JSON_ARCHITECTURES:
        for name in arch.architectures[:1]:
            found[f"{name}:{arch.expected_model_type}"] = list(arch.modules)
    for value in vars(moe_defs).values():
        architecture = getattr(value, "ARCHITECTURE_NAME", None)
        if isinstance(value, type) and architecture:
            model_type = value.name(value.model_construct())
            found[f"{architecture}:{model_type}"] = ["default"]
    return found


def test_every_mergekit_definition_has_exactly_one_row():
    definitions = _mergekit_definitions()
    assert len(definitions) > 50
    missing = sorted(set(definitions) - set(table.SUPPORT))
    assert not missing, f"add rows to core/architectures.py for {missing}"
    for key in set(table.SUPPORT) - set(definitions):  # rows mergekit does not define: refusals only
        assert table.SUPPORT[key].kind == table.REFUSED, key


def test_each_kind_fits_the_definitions_structure():
    for key, modules in _mergekit_definitions().items():
        support = table.SUPPORT[key]
        if len(modules) > 1:
            assert support.kind in (table.VISION_LANGUAGE, table.REFUSED), key
            if support.kind == table.VISION_LANGUAGE:
                assert table.TEXT_MODULE in modules, key
        else:
            assert support.kind != table.VISION_LANGUAGE, key
        if support.kind == table.REFUSED:
            assert support.note, f"{key}: say why"


@pytest.mark.parametrize("key", [k for k, s in table.SUPPORT.items() if s.checked == "tests"])
def test_rows_marked_tests_name_checkpoints_of_that_architecture(key):
    support = table.SUPPORT[key]
    architecture, _, model_type = key.partition(":")
    assert support.tests, key
    for name in support.tests:
        arch = ARCHS[name]  # a family the merge tests build
        config = arch.make_config()
        model_class, _shapes = stored_layout(config, arch.stored_as, arch)
        assert (model_class, config.model_type) == (architecture, model_type), name


def test_readme_lists_the_table():
    with open(README, encoding="utf-8") as handle:
        readme = handle.read()
    assert table.markdown_table() in readme, (
        "README's architecture list differs from core/architectures.py; paste the output of "
        "`python -m mergekit_layerswap.core.architectures`"
    )
