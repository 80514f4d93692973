"""Evaluators for sweeps: score a loaded transformers model, offline or with lm-evaluation-harness.

An evaluator spec is ``KIND:ARGUMENT``:

* ``exact-match:problems.jsonl`` - lines of ``{"question": ..., "answer": ...}``; greedy
  generation, the last number in the output is compared with the numeric answer;
  score = accuracy (higher is better).
* ``perplexity:text.txt`` - perplexity of the model on a local text file, in windows of
  at most 512 tokens; score = perplexity (lower is better).
* ``lm-eval:TASK`` - an lm-evaluation-harness task (e.g. ``mgsm_native_cot_sw``),
  ``--num-fewshot`` shots; needs ``pip install lm-eval`` and that task's data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

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


def read_problems(path: str, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    problems = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if "question" not in item or "answer" not in item:
                raise DataError(f"{path} line {number} needs 'question' and 'answer' fields")
            problems.append(item)
            if limit is not None and len(problems) >= limit:
                break
    return problems


def _prompt(tokenizer, question: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {question}\nAnswer:"


def exact_match(model, tokenizer, path: str, limit: Optional[int] = None, max_new_tokens: int = 96,
                batch_size: int = 8) -> Score:
    import torch

    problems = read_problems(path, limit)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    correct = 0
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        prompts = [_prompt(tokenizer, p["question"]) for p in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        for problem, text in zip(batch, texts):
            predicted, expected = final_number(text), final_number(str(problem["answer"]))
            correct += predicted is not None and expected is not None and abs(predicted - expected) < 1e-6
    n = len(problems)
    accuracy = correct / n if n else 0.0
    return Score("exact_match", accuracy, n, True, math.sqrt(accuracy * (1 - accuracy) / n) if n else None)


def perplexity(model, tokenizer, path: str, limit: Optional[int] = None, window: int = 512) -> Score:
    import torch

    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if limit is not None:
        ids = ids[: limit * window]
    total, count = 0.0, 0
    for start in range(0, max(len(ids) - 1, 0), window):
        chunk = ids[start:start + window + 1].unsqueeze(0).to(model.device)
        if chunk.shape[1] < 2:
            break
        with torch.no_grad():
            loss = model(chunk, labels=chunk).loss.item()
        total += loss * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    if count == 0:
        raise DataError(f"{path} has no text to score")
    return Score("perplexity", math.exp(total / count), count, False)


def lm_eval_task(model, tokenizer, task: str, limit: Optional[int] = None, num_fewshot: int = 8) -> Score:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise OptionError("lm-eval:... needs lm-evaluation-harness: pip install lm-eval", "--eval") from None
    results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer), tasks=[task],
                              num_fewshot=num_fewshot, limit=limit)
    metrics = results["results"][task]
    name = next(k for k in metrics if not k.endswith("_stderr") and isinstance(metrics[k], (int, float)))
    stderr = metrics.get(f"{name.split(',')[0]}_stderr,{name.split(',', 1)[-1]}")
    return Score(name, float(metrics[name]), int(limit or 0), True, stderr)


KINDS = ("exact-match", "perplexity", "lm-eval")


def check_spec(spec: str) -> str:
    kind, _, argument = spec.partition(":")
    if kind not in KINDS or not argument:
        raise OptionError(f"{spec!r}: use exact-match:FILE.jsonl, perplexity:FILE.txt or lm-eval:TASK", "--eval")
    if kind != "lm-eval" and not os.path.isfile(argument):
        raise OptionError(f"{argument} does not exist", "--eval")
    return spec


def evaluate(spec: str, model, tokenizer, limit: Optional[int] = None, num_fewshot: int = 8) -> Score:
    kind, _, argument = spec.partition(":")
    if kind == "exact-match":
        return exact_match(model, tokenizer, argument, limit=limit)
    if kind == "perplexity":
        return perplexity(model, tokenizer, argument, limit=limit)
    return lm_eval_task(model, tokenizer, argument, limit=limit, num_fewshot=num_fewshot)


@dataclass(frozen=True)
class Evaluator:
    """An evaluator spec and its options: picklable, so a sweep worker process (or a Ray
    actor) can rebuild it, and comparable, so a resumed sweep can tell a changed one."""

    spec: str
    limit: Optional[int] = None
    num_fewshot: int = 8

    def __call__(self, model, tokenizer) -> Score:
        return evaluate(self.spec, model, tokenizer, limit=self.limit, num_fewshot=self.num_fewshot)

    def with_limit(self, limit: Optional[int]) -> "Evaluator":
        """The same evaluator on the first ``limit`` items (successive halving's rungs)."""
        return dataclasses.replace(self, limit=limit)

    def settings(self) -> Dict[str, Any]:
        """What a result depends on, for a sweep's resume check."""
        return dataclasses.asdict(self)
