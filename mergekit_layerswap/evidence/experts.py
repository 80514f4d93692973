# SPDX-License-Identifier: LGPL-3.0-only
"""The two experts' training texts and a fine-tune that survives being cut off.

The loop is the demo's (``demo/finetune.py``: its batches, its choice of trainable
parameters, its optimizer step); what is added is a checkpoint of the trained
parameters and the AdamW state every ``checkpoint_every`` steps, so a run killed
part-way resumes from the last checkpoint and ends with the same weights as one that
was never interrupted (same batches, same optimizer state; Qwen2 has no dropout).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence

import torch

from mergekit_layerswap.core.errors import DataError
from mergekit_layerswap.demo.finetune import FinetuneSettings, batches, default_threads, select_trainable, train_step

STATE_FILE = "train-state.pt"


def math_texts(tokenizer, rows: Sequence[dict]) -> List[str]:
    """English problems with their worked solutions, as one chat exchange each."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["solution"]}],
            tokenize=False,
        )
        for r in rows
    ]


def swahili_texts(rows: Sequence[dict]) -> List[str]:
    """Swahili problem statements alone: Swahili prose about everyday quantities, no
    worked solutions and no chat markup (see docs/evidence.md for why this text)."""
    return [r["question"] for r in rows]


def _run_key(settings: FinetuneSettings, texts: Sequence[str]) -> dict:
    """What a checkpoint is only valid for: the settings (threads aside) and the texts."""
    import hashlib

    digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    return {**{k: v for k, v in asdict(settings).items() if k != "threads"}, "texts_sha256": digest}


def _save_state(path: str, model, optimizer, step: int, losses: List[float], key: dict) -> None:
    trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    tmp = path + ".partial"
    state = {"step": step, "losses": losses, "model": trained, "optimizer": optimizer.state_dict(), "key": key}
    torch.save(state, tmp)
    os.replace(tmp, path)


def resumable_finetune(
    base_dir: str,
    texts: Sequence[str],
    out_dir: str,
    settings: FinetuneSettings,
    checkpoint_every: int = 25,
    progress: bool = False,
    label: str = "fine-tune",
    log: Callable[[str], None] = print,
    stop_after: Optional[int] = None,
) -> Dict[str, object]:
    """Fine-tune ``base_dir`` on ``texts`` into ``out_dir`` (float32 safetensors and the
    base's tokenizer). Progress lives in ``out_dir + ".partial"``; ``stop_after`` ends the
    loop early after that many steps in total, leaving the checkpoint (for tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not texts:
        raise DataError("no training texts")
    work = out_dir + ".partial"
    os.makedirs(work, exist_ok=True)
    state_path = os.path.join(work, STATE_FILE)
    threads = settings.threads or default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    trained = select_trainable(model, settings.train_embeddings)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate, weight_decay=0.0
    )
    start, losses = 0, []
    key = _run_key(settings, texts)
    state = torch.load(state_path, map_location="cpu", weights_only=True) if os.path.isfile(state_path) else None
    if state is not None and state.get("key") != key:
        log(f"  {label}: the checkpoint in {work} was made with other settings or texts; starting over")
        state = None
    if state is not None:
        missing = set(trained) - set(state["model"])
        if missing:
            raise DataError(f"{state_path} does not match this fine-tune; delete {work} and rerun")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in state["model"]:
                    parameter.copy_(state["model"][name])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), list(state["losses"])
        log(f"  {label}: resuming at step {start} of {settings.steps}")
    tokens, started = 0, time.perf_counter()
    steps = enumerate(batches(tokenizer, texts, settings))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=start, desc=label, unit="step")
    for step, batch in steps:
        if step < start:
            continue  # the same batches in the same order: skip those already trained on
        losses.append(train_step(model, optimizer, batch, settings.bfloat16_autocast))
        tokens += int(batch["attention_mask"].sum())
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if stop_after is not None and done >= stop_after and done < settings.steps:
            _save_state(state_path, model, optimizer, done, losses, key)
            if bar is not None:
                bar.close()
            return {"stopped_at": done}
        if checkpoint_every and done % checkpoint_every == 0 and done < settings.steps:
            _save_state(state_path, model, optimizer, done, losses, key)
    if bar is not None:
        bar.close()
    model.eval()
    final = out_dir + ".final"
    shutil.rmtree(final, ignore_errors=True)
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(final, out_dir)
    shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    return {
        "settings": asdict(settings),
        "threads": threads,
        "texts": len(texts),
        "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "first_losses": losses[:5],
        "last_losses": losses[-5:],
        "mean_loss_first_10": sum(losses[:10]) / len(losses[:10]),
        "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]),
        "resumed_from_step": start,
        "tokens_this_run": tokens,
        "wall_s_this_run": round(seconds, 1),
    }


def measure_training(base_dir: str, texts: Sequence[str], settings: FinetuneSettings, steps: int = 3) -> dict:
    """Seconds (wall and CPU) and tokens of ``steps`` training steps after one warm-up,
    on a throw-away copy of the model: what the expert's step count is chosen from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_layerswap.demo.timing import cpu_seconds

    threads = settings.threads or default_threads()
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    select_trainable(model, settings.train_embeddings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate)
    measured = FinetuneSettings(**{**asdict(settings), "steps": steps + 1})
    wall = cpu = 0.0
    tokens = 0
    for index, batch in enumerate(batches(tokenizer, texts, measured)):
        w, c = time.perf_counter(), cpu_seconds()
        train_step(model, optimizer, batch, settings.bfloat16_autocast)
        if index > 0:  # the first step allocates optimizer state
            wall += time.perf_counter() - w
            cpu += cpu_seconds() - c
            tokens += int(batch["attention_mask"].sum())
    return {
        "threads": threads,
        "steps": steps,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "tokens_per_cpu_s": round(tokens / cpu, 2),
        "tokens_per_wall_s": round(tokens / wall, 2),
        "cpu_s_per_step": round(cpu / steps, 2),
    }


def steps_for(measured: dict, cpu_budget_s: float, tokens_per_step: float, low: int = 20, high: int = 400) -> int:
    """Optimizer steps of ``tokens_per_step`` tokens that fit ``cpu_budget_s`` CPU seconds
    at the measured tokens per CPU second."""
    return max(low, min(high, int(cpu_budget_s * measured["tokens_per_cpu_s"] / tokens_per_step)))
