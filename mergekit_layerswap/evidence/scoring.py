# SPDX-License-Identifier: LGPL-3.0-only
"""Per-problem scores of one model, kept problem by problem so paired intervals can be
drawn and a long generation run resumes where it stopped.

* answer loss: the mean negative log-likelihood per token of the reference worked
  solution (its "#### N" line included), teacher-forced after the question asked in a
  chat turn. One forward pass per batch; the vocabulary projection is applied to the
  solution positions only, so memory stays small with Qwen's 152k-token vocabulary.
* exact match: greedy generation, then the number the package's evaluators would take
  (``tools/evaluate.py``: the last number for the chat prompt; MGSM native-CoT prompts
  are cut at lm-eval's stop sequences first). Answers are appended to a JSONL file as
  each batch finishes; a rerun generates only the problems not in it yet.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def answer_losses(
    model,
    tokenizer,
    rows: Sequence[dict],
    batch_size: int = 8,
    max_solution_tokens: int = 192,
    progress: Optional[Callable[[int], None]] = None,
) -> List[float]:
    """Mean per-token NLL of each row's ``solution`` after its chat-formatted ``question``."""
    pairs = [
        (
            tokenizer(chat_prompt(tokenizer, row["question"]), add_special_tokens=False)["input_ids"],
            tokenizer(row["solution"], add_special_tokens=False)["input_ids"][:max_solution_tokens],
        )
        for row in rows
    ]
    return _sequence_losses(model, tokenizer, pairs, batch_size, progress)


def _sequence_losses(model, tokenizer, pairs, batch_size: int, progress) -> List[float]:
    """For each (context ids, target ids): mean NLL of the targets given what precedes them."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    losses: List[Optional[float]] = [None] * len(pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    body, head = model.get_decoder(), model.get_output_embeddings()
    model.eval()
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        sequences = [pairs[i][0] + pairs[i][1] for i in chosen]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(chosen), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):  # right padding: positions start at 0 in every row
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        with torch.no_grad():
            hidden = body(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).last_hidden_state
            for row, i in enumerate(chosen):
                context, target = pairs[i]
                # the state at position p predicts token p + 1
                states = hidden[row, len(context) - 1 : len(context) + len(target) - 1]
                logits = head(states).float()
                losses[i] = float(torch.nn.functional.cross_entropy(logits, torch.tensor(target, device=logits.device)))
        if progress is not None:
            progress(len(chosen))
    return losses  # type: ignore[return-value]


def text_losses(
    model, tokenizer, texts: Sequence[str], batch_size: int = 8, progress: Optional[Callable[[int], None]] = None
) -> List[float]:
    """Mean per-token NLL of each plain text (no chat markup), every token after the first."""
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return _sequence_losses(model, tokenizer, [(ids[:1], ids[1:]) for ids in encoded], batch_size, progress)


def _done_answers(path: str) -> Dict[str, dict]:
    done: Dict[str, dict] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut off by a kill: that problem is generated again
                done[entry["id"]] = entry
    return done


def exact_match_answers(
    model,
    tokenizer,
    items: Sequence[dict],
    answers_path: str,
    prompt_of: Callable[[dict], str],
    extract: Callable[[str], Optional[float]],
    max_new_tokens: int,
    batch_size: int = 8,
    limit: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> List[dict]:
    """Greedy answers of ``items`` (each with ``id`` and ``answer``), resumable through
    ``answers_path``; returns the entries of the first ``limit`` items in item order."""
    from mergekit_layerswap.tools.evaluate import _generate, final_number

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    wanted = list(items[:limit] if limit is not None else items)
    done = _done_answers(answers_path)
    todo = [item for item in wanted if item["id"] not in done]
    if progress is not None and len(wanted) > len(todo):
        progress(len(wanted) - len(todo))
    with open(answers_path, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            texts = _generate(model, tokenizer, [prompt_of(item) for item in batch], max_new_tokens)
            for item, text in zip(batch, texts):
                predicted, expected = extract(text), final_number(str(item["answer"]))
                entry = {
                    "id": item["id"],
                    "correct": predicted is not None and expected is not None and abs(predicted - expected) < 1e-6,
                    "predicted": predicted,
                    "answer": item["answer"],
                    "output": text,
                }
                done[item["id"]] = entry
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            if progress is not None:
                progress(len(batch))
    return [done[item["id"]] for item in wanted]


def lm_eval_answers(
    model,
    tokenizer,
    task: str,
    tasks_path: str,
    ids: Sequence[str],
    answers_path: str,
    chunk: int = 8,
    max_new_tokens: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> List[dict]:
    """lm-evaluation-harness itself on the test documents ``0 .. len(ids) - 1`` of ``task``
    (document k is the problem ``ids[k]``), ``chunk`` documents per ``simple_evaluate``
    call (its ``samples=`` selection), each finished chunk appended to ``answers_path``: the
    harness's own prompt, generation, filters and exact_match, resumable per chunk.
    ``correct`` is the flexible-extract exact match, ``strict`` the strict-match one."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from mergekit_layerswap.tools.evaluate import task_manager

    done = _done_answers(answers_path)
    todo = [k for k, i in enumerate(ids) if i not in done]
    if progress is not None and len(ids) > len(todo):
        progress(len(ids) - len(todo))
    manager = task_manager(tasks_path, task)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=chunk)
    with open(answers_path, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), chunk):
            indices = todo[start : start + chunk]
            results = simple_evaluate(
                model=lm,
                tasks=[task],
                samples={task: indices},
                task_manager=manager,
                log_samples=True,
                gen_kwargs={"max_gen_toks": max_new_tokens} if max_new_tokens else None,
                verbosity="WARNING",
            )
            by_doc: Dict[int, dict] = {}
            for sample in results["samples"][task]:
                entry = by_doc.setdefault(sample["doc_id"], {"id": ids[sample["doc_id"]]})
                key = "correct" if sample["filter"] == "flexible-extract" else "strict"
                entry[key] = bool(sample["exact_match"])
                entry[f"{key}_extracted"] = sample["filtered_resps"][0]
                entry["output"] = sample["resps"][0][0]
            if sorted(by_doc) != sorted(indices):
                from mergekit_layerswap.core.errors import DataError

                raise DataError(f"lm-eval answered documents {sorted(by_doc)} for the requested {sorted(indices)}")
            for k in indices:
                done[ids[k]] = by_doc[k]
                out.write(json.dumps(by_doc[k], ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            if progress is not None:
                progress(len(indices))
    return [done[i] for i in ids]
