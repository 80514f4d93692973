"""A short full fine-tune on CPU: plain torch loop, AdamW, fixed seed.

The experts must stay close to their base (the paper fine-tuned with very small
learning rates), so a few dozen steps at a tiny learning rate is the whole recipe.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int = 40
    learning_rate: float = 2e-5
    batch_size: int = 4
    max_tokens: int = 96
    seed: int = 0
    threads: int = 2


@dataclass(frozen=True)
class FinetuneResult:
    losses: List[float]
    seconds: float


def batches(tokenizer, texts: Sequence[str], settings: FinetuneSettings):
    """Yield ``settings.steps`` padded batches of the texts, reshuffled every epoch."""
    rng = random.Random(settings.seed)
    order: List[int] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for _ in range(settings.steps):
        if len(order) < settings.batch_size:
            extra = list(range(len(texts)))
            rng.shuffle(extra)
            order.extend(extra)
        chosen = [texts[i] for i in order[: settings.batch_size]]
        del order[: settings.batch_size]
        encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][: settings.max_tokens] for text in chosen]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)  # no loss on padding
        yield {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_step(model, optimizer, batch) -> float:
    """One optimizer step of causal-LM loss; returns the loss before the update."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def finetune(
    base_dir: str,
    texts: Sequence[str],
    out_dir: str,
    settings: FinetuneSettings,
    log: Optional[Callable[[str], None]] = None,
) -> FinetuneResult:
    """Fine-tune every weight of the checkpoint in ``base_dir`` on ``texts`` and save the
    result (float32 safetensors, with the base's tokenizer) to ``out_dir``; ``log`` gets
    a progress line every 10 steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not texts:
        raise ValueError("no training texts")
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    losses = []
    for step, batch in enumerate(batches(tokenizer, texts, settings), start=1):
        losses.append(train_step(model, optimizer, batch))
        if log is not None and (step % 10 == 0 or step == settings.steps):
            log(f"  step {step}/{settings.steps}: loss {losses[-1]:.3f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return FinetuneResult(losses=losses, seconds=time.perf_counter() - started)
