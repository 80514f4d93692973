# SPDX-License-Identifier: LGPL-3.0-only
"""A short fine-tune on CPU: plain torch loop, AdamW, fixed seed.

The experts must stay close to their base (the paper fine-tuned with very small
learning rates), so a few dozen steps at a small learning rate is the whole recipe.
What makes it fast enough for a first demo run (see docs/demo.md):

* the tied 49152 x 576 embedding matrix (a fifth of the weights, and of AdamW's state
  and update time) is frozen unless ``train_embeddings`` is set; every decoder layer
  and the final norm are trained;
* on CPUs with native bfloat16 (AVX512-BF16 or AMX) the forward and backward run under
  bfloat16 autocast; the weights, their updates and the saved checkpoint stay float32.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out")


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (elsewhere autocast is slower)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def default_threads() -> int:
    """Up to 4 threads, one per core that other processes leave idle (1-minute load
    average, less the demo's own process). On shared cores, torch's OpenMP threads
    spin while they wait for a descheduled sibling: two threads on two busy cores
    measured 4x the CPU time of one thread per step."""
    cores = os.cpu_count() or 1
    try:
        others = max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:  # no load average on this platform
        others = 0.0
    return max(1, min(4, cores, round(cores - others)))


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int = 40
    learning_rate: float = 2e-5
    batch_size: int = 4
    max_tokens: int = 96
    seed: int = 0
    threads: Optional[int] = None  # None: default_threads()
    train_embeddings: bool = True
    bfloat16_autocast: bool = False


@dataclass(frozen=True)
class FinetuneResult:
    losses: List[float]
    seconds: float
    trained: List[str]  # names of the parameters the optimizer updated


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


def select_trainable(model, train_embeddings: bool) -> List[str]:
    """Freeze the token embeddings (and a tied or untied lm_head) unless asked to train
    them; returns the names of the parameters left trainable."""
    trained = []
    for name, parameter in model.named_parameters():
        is_embedding = any(part in EMBEDDING_NAMES for part in name.split("."))
        parameter.requires_grad_(train_embeddings or not is_embedding)
        if parameter.requires_grad:
            trained.append(name)
    return trained


def train_step(model, optimizer, batch, bfloat16_autocast: bool = False) -> float:
    """One optimizer step of causal-LM loss; returns the loss before the update."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bfloat16_autocast else contextlib.nullcontext()
    with autocast:
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
    progress: bool = False,
    label: str = "fine-tune",
) -> FinetuneResult:
    """Fine-tune the checkpoint in ``base_dir`` on ``texts`` and save the result (float32
    safetensors, with the base's tokenizer) to ``out_dir``. ``progress`` shows a tqdm bar
    over the steps; ``log`` gets the first and last loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not texts:
        raise ValueError("no training texts")
    torch.set_num_threads(settings.threads or default_threads())
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    trained = select_trainable(model, settings.train_embeddings)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    losses: List[float] = []
    steps = batches(tokenizer, texts, settings)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=settings.steps, desc=label, unit="step")
    for batch in steps:
        losses.append(train_step(model, optimizer, batch, settings.bfloat16_autocast))
        if progress:
            steps.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if log is not None:
        log(f"  loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    return FinetuneResult(losses=losses, seconds=time.perf_counter() - started, trained=trained)
