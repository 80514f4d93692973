# SPDX-License-Identifier: LGPL-3.0-only
"""Evaluators for sweeps: score a loaded transformers model, offline or with lm-evaluation-harness.

An evaluator spec is ``KIND:ARGUMENT``:

* ``exact-match:problems.jsonl`` - greedy generation, the last number in the output is
  compared with the numeric answer; score = accuracy (higher is better). Two prompts:
  ``chat`` (default): lines of ``{"question": ..., "answer": ...}``, each question alone in
  a user turn of the tokenizer's chat template (metric ``exact_match,chat-0shot``);
  ``mgsm``: an MGSM-format test file of ``mergekit-layerswap data mgsm-symbolic``, prompted
  as lm-eval's ``mgsm_native_cot_*`` does, with the exemplars of the ``*_train.jsonl``
  beside it in file order (metric ``exact_match,mgsm-native-cot-<N>shot``; the last number
  is flexible-extract's choice, so it compares with lm-eval's ``exact_match,flexible-extract``).
* ``perplexity:text.txt`` - perplexity of the model on a local text file, in windows of
  at most 512 tokens; score = perplexity (lower is better).
* ``lm-eval:TASK`` - an lm-evaluation-harness task (e.g. ``mgsm_native_cot_sw``, or
  ``mgsm_symbolic_native_cot_swh`` with ``tasks_path`` the directory ``data mgsm-symbolic``
  wrote), run by the real harness on the model already in memory (``HFLM(pretrained=model)``:
  no checkpoint is written); ``metric`` names the lm-eval ``metric,filter`` that ranks
  (default: the first one lm-eval reports). Needs ``pip install 'mergekit-layerswap[eval]'``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from mergekit_layerswap.core.errors import DataError, OptionError

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Score:
    metric: str
    value: float
    count: int
    higher_is_better: bool
    stderr: Optional[float] = None


def final_number(text: str) -> Optional[float]:
    """The last number in ``text`` (thousands separators allowed), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs) -> Dict[str, Any]:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _DuplicateKey(key)
    return dict(pairs)


def read_jsonl(
    path: str, accept: Callable[[Dict[str, Any]], bool], needs: str, limit: Optional[int] = None
) -> List[Dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped; a UTF-8 byte order mark and
    CRLF line ends are fine), each checked by ``accept``; a line that is not JSON, not an
    object, names a key twice (JSON keeps the last silently) or is not accepted is refused
    naming the line."""
    rows: List[Dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line, object_pairs_hook=_unique_keys)
                except _DuplicateKey as error:
                    raise DataError(
                        f"{path} line {number} gives {error.key!r} twice; keep one (JSON would silently use the last)"
                    ) from None
                except ValueError as error:
                    raise DataError(
                        f"{path} line {number} is not valid JSON ({error.msg}); write one JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {number} is not a JSON object; write one object per line")
                if not accept(row):
                    raise DataError(f"{path} line {number} {needs}")
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path} as UTF-8 text: {error}") from None
    return rows


def read_problems(path: str, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    return read_jsonl(
        path, lambda row: "question" in row and "answer" in row, "needs 'question' and 'answer' fields", limit
    )


PROMPTS = ("chat", "mgsm")


def _prompt(tokenizer, question: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {question}\nAnswer:"


def exemplars_path(test_path: str) -> str:
    """``X_test.jsonl`` -> ``X_train.jsonl``: where ``data mgsm-symbolic`` puts the exemplars."""
    if not test_path.endswith("_test.jsonl"):
        raise OptionError(
            f"{test_path}: the mgsm prompt takes a *_test.jsonl written by `mergekit-layerswap data mgsm-symbolic`",
            "--eval",
        )
    return test_path[: -len("_test.jsonl")] + "_train.jsonl"


def read_mgsm(path: str, limit: Optional[int] = None, num_fewshot: Optional[int] = None):
    """(language, exemplars, test rows) of an MGSM-format test file and its train file."""
    from mergekit_layerswap.tools.mgsm import LANGUAGES

    rows = read_jsonl(
        path,
        lambda row: row.get("answer") is None and "answer_number" in row and row.get("language") in LANGUAGES,
        "is not an MGSM test row (answer null, answer_number, language); write it with "
        "`mergekit-layerswap data mgsm-symbolic`",
        limit,
    )
    train = exemplars_path(path)
    if not os.path.isfile(train):
        raise DataError(f"{train} (the exemplars of {path}) does not exist")
    exemplars = read_jsonl(train, lambda row: True, "")
    shots = len(exemplars) if num_fewshot is None else num_fewshot
    if shots > len(exemplars):
        raise OptionError(
            f"{train} holds {len(exemplars)} exemplars; use --num-fewshot {len(exemplars)} or less", "--num-fewshot"
        )
    language = LANGUAGES[rows[0]["language"]] if rows else None
    return language, exemplars[:shots], rows


def _generate(model, tokenizer, prompts: List[str], max_new_tokens: int) -> List[str]:
    import torch

    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        generated = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def exact_match(
    model,
    tokenizer,
    path: str,
    limit: Optional[int] = None,
    max_new_tokens: int = 96,
    batch_size: int = 8,
    prompt: str = "chat",
    num_fewshot: Optional[int] = None,
) -> Score:
    from mergekit_layerswap.tools import mgsm

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if prompt == "mgsm":
        language, exemplars, rows = read_mgsm(path, limit, num_fewshot)
        prompts = [mgsm.fewshot_prompt(language, exemplars, row) for row in rows]
        expected = [row["answer_number"] for row in rows]
        metric = f"exact_match,mgsm-native-cot-{len(exemplars)}shot"
    else:
        problems = read_problems(path, limit)
        prompts = [_prompt(tokenizer, p["question"]) for p in problems]
        expected = [p["answer"] for p in problems]
        metric = "exact_match,chat-0shot"
    correct = 0
    for start in range(0, len(prompts), batch_size):
        texts = _generate(model, tokenizer, prompts[start : start + batch_size], max_new_tokens)
        for text, answer in zip(texts, expected[start : start + batch_size]):
            if prompt == "mgsm":
                text = mgsm.cut_at_stop(language, text)
            predicted, wanted = final_number(text), final_number(str(answer))
            correct += predicted is not None and wanted is not None and abs(predicted - wanted) < 1e-6
    n = len(prompts)
    accuracy = correct / n if n else 0.0
    return Score(metric, accuracy, n, True, math.sqrt(accuracy * (1 - accuracy) / n) if n else None)


def perplexity(model, tokenizer, path: str, limit: Optional[int] = None, window: int = 512) -> Score:
    import torch

    with open(path, encoding="utf-8-sig") as handle:  # a byte order mark is not text to score
        text = handle.read()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if limit is not None:
        ids = ids[: limit * window]
    total, count = 0.0, 0
    for start in range(0, max(len(ids) - 1, 0), window):
        chunk = ids[start : start + window + 1].unsqueeze(0).to(model.device)
        if chunk.shape[1] < 2:
            break
        with torch.no_grad():
            loss = model(chunk, labels=chunk).loss.item()
        total += loss * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    if count == 0:
        raise DataError(f"{path} has no text to score")
    return Score("perplexity", math.exp(total / count), count, False)


_TASK_MANAGERS: Dict[Tuple[str, Optional[str]], Any] = {}


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise OptionError(
            "lm-eval:... needs lm-evaluation-harness: pip install 'mergekit-layerswap[eval]'", "--eval"
        ) from None


def task_manager(tasks_path: Optional[str], task: Optional[str] = None):
    """One lm-eval TaskManager per process and tasks path, built on first use: indexing
    every task YAML lm-eval ships takes seconds to a minute, so a sweep builds it once,
    not per candidate. A task found in ``tasks_path`` alone skips that index."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    path = os.path.abspath(tasks_path) if tasks_path else None
    if path is not None:
        if ("local", path) not in _TASK_MANAGERS:
            _TASK_MANAGERS[("local", path)] = TaskManager(include_path=path, include_defaults=False)
        local = _TASK_MANAGERS[("local", path)]
        if task is None or task in local.all_tasks:
            return local
    if ("all", path) not in _TASK_MANAGERS:
        _TASK_MANAGERS[("all", path)] = TaskManager(include_path=path)
    return _TASK_MANAGERS[("all", path)]


def check_lm_eval_task(task: str, tasks_path: Optional[str] = None):
    """The TaskManager that knows ``task``; an unknown task is refused (a sweep asks before it
    builds a candidate or creates its --out directory)."""
    manager = task_manager(tasks_path, task)
    if task not in manager.all_tasks:
        where = f" or in {tasks_path}" if tasks_path else " (add --tasks-path DIR for a local task)"
        raise OptionError(f"lm-eval has no task {task!r}{where}", "--eval")
    return manager


def run_lm_eval(
    model,
    tokenizer,
    task: str,
    tasks_path: Optional[str] = None,
    limit: Optional[int] = None,
    num_fewshot: Optional[int] = None,
    batch_size: Optional[int] = None,
    chat_template: bool = False,
    max_new_tokens: Optional[int] = None,
    log_samples: bool = False,
) -> Dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on the model in memory; returns its results dict."""
    manager = check_lm_eval_task(task, tasks_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if tokenizer.eos_token_id is None:
        raise DataError(
            "lm-eval needs a tokenizer with an end-of-sequence token (its stop sequences include it); "
            "set eos_token in the donor's tokenizer_config.json"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or 1)
    return simple_evaluate(
        model=lm,
        tasks=[task],
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        apply_chat_template=chat_template,
        fewshot_as_multiturn=chat_template,
        log_samples=log_samples,
        gen_kwargs={"max_gen_toks": max_new_tokens} if max_new_tokens else None,
    )


def lm_eval_score(results: Dict[str, Any], task: str, metric: Optional[str] = None) -> Score:
    """The ``metric,filter`` value (and its stderr) that ranks candidates."""
    values = results["results"][task]
    names = [k for k in values if "," in k and "_stderr," not in k and isinstance(values[k], (int, float))]
    name = metric or (names[0] if names else None)
    if name not in names:
        raise OptionError(
            f"lm-eval task {task} reports {', '.join(names) or 'no metric'}; pick one with --metric", "--metric"
        )
    base, _, filter_name = name.partition(",")
    stderr = values.get(f"{base}_stderr,{filter_name}")
    count = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
    higher = results.get("higher_is_better", {}).get(task, {}).get(base, True)
    return Score(
        name, float(values[name]), count, bool(higher), float(stderr) if isinstance(stderr, (int, float)) else None
    )


def lm_eval_task(
    model,
    tokenizer,
    task: str,
    limit: Optional[int] = None,
    num_fewshot: Optional[int] = None,
    tasks_path: Optional[str] = None,
    metric: Optional[str] = None,
    batch_size: Optional[int] = None,
    chat_template: bool = False,
    max_new_tokens: Optional[int] = None,
) -> Score:
    results = run_lm_eval(
        model,
        tokenizer,
        task,
        tasks_path=tasks_path,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        chat_template=chat_template,
        max_new_tokens=max_new_tokens,
    )
    return lm_eval_score(results, task, metric)


KINDS = ("exact-match", "perplexity", "lm-eval")


def check_spec(spec: str, prompt: str = "chat", tasks_path: Optional[str] = None) -> str:
    kind, _, argument = spec.partition(":")
    if kind not in KINDS or not argument:
        raise OptionError(f"{spec!r}: use exact-match:FILE.jsonl, perplexity:FILE.txt or lm-eval:TASK", "--eval")
    if kind != "lm-eval" and not os.path.isfile(argument):
        raise OptionError(f"{argument} does not exist", "--eval")
    if prompt not in PROMPTS:
        raise OptionError(f"{prompt!r}: use one of {', '.join(PROMPTS)}", "--prompt")
    if prompt == "mgsm" and kind != "exact-match":
        raise OptionError(
            "--prompt mgsm applies to exact-match:FILE (lm-eval tasks bring their own prompt)", "--prompt"
        )
    if prompt == "mgsm" and not os.path.isfile(exemplars_path(argument)):
        raise OptionError(f"{exemplars_path(argument)} (the exemplars) does not exist", "--eval")
    if tasks_path is not None and not os.path.isdir(tasks_path):
        raise OptionError(f"{tasks_path} is not a directory of lm-eval task YAMLs", "--tasks-path")
    if kind == "lm-eval":
        _import_lm_eval()
    return spec


@dataclass(frozen=True)
class Evaluator:
    """An evaluator spec and its options: picklable, so a sweep worker process (or a Ray
    actor) can rebuild it, and comparable, so a resumed sweep can tell a changed one.

    ``num_fewshot`` None means the task's own (an lm-eval task's ``num_fewshot``; every
    exemplar of an mgsm file); ``batch_size`` None means 8 for exact-match, 1 for lm-eval;
    ``max_new_tokens`` None means 96 for exact-match, the task's own for lm-eval."""

    spec: str
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    prompt: str = "chat"  # exact-match: "chat" or "mgsm"
    tasks_path: Optional[str] = None  # lm-eval: a directory of extra task YAMLs
    metric: Optional[str] = None  # lm-eval: "metric,filter" that ranks, e.g. exact_match,flexible-extract
    batch_size: Optional[int] = None
    chat_template: bool = False  # lm-eval: apply the tokenizer's chat template
    max_new_tokens: Optional[int] = None

    def __call__(self, model, tokenizer) -> Score:
        kind, _, argument = self.spec.partition(":")
        if kind == "exact-match":
            return exact_match(
                model,
                tokenizer,
                argument,
                limit=self.limit,
                max_new_tokens=self.max_new_tokens or 96,
                batch_size=self.batch_size or 8,
                prompt=self.prompt,
                num_fewshot=self.num_fewshot,
            )
        if kind == "perplexity":
            return perplexity(model, tokenizer, argument, limit=self.limit)
        return lm_eval_task(
            model,
            tokenizer,
            argument,
            limit=self.limit,
            num_fewshot=self.num_fewshot,
            tasks_path=self.tasks_path,
            metric=self.metric,
            batch_size=self.batch_size,
            chat_template=self.chat_template,
            max_new_tokens=self.max_new_tokens,
        )

    def with_limit(self, limit: Optional[int]) -> "Evaluator":
        """The same evaluator on the first ``limit`` items (successive halving's rungs)."""
        return dataclasses.replace(self, limit=limit)

    def settings(self) -> Dict[str, Any]:
        """What a result depends on, for a sweep's resume check."""
        settings = dataclasses.asdict(self)
        if self.tasks_path:
            settings["tasks_path"] = os.path.abspath(self.tasks_path)
        return settings


def evaluate(spec: str, model, tokenizer, limit: Optional[int] = None, num_fewshot: Optional[int] = None) -> Score:
    """One evaluation with default options (see Evaluator for the others)."""
    return Evaluator(spec, limit=limit, num_fewshot=num_fewshot)(model, tokenizer)
