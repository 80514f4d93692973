#!/usr/bin/env python
# SPDX-License-Identifier: LGPL-3.0-only
"""Benchmark layer_swap at mixture-of-experts widths (issue 19). Not a test.

    nice python bench/moe.py --layers 2 --repeats 2 --json bench/results-committed/moe-qwen3-30b-a3b-L2.json

Models: two experts with Qwen3-30B-A3B's widths (128 experts of intermediate 768,
hidden 2048, 32 query / 4 key-value heads of 128, vocabulary 151936, untied lm_head) and
``--layers`` decoder layers, stored as transformers' ``save_pretrained`` stores them: one
2-D bf16 tensor per expert matrix (384 per layer), sharded, with a Qwen3MoeForCausalLM
config.json. A second pair, ``many``, has ``--many-layers`` (the real model: 48, 18,867 stored
tensors) at tiny widths (hidden 64, 128 experts of intermediate 16, vocabulary 1024),
so the merge's per-tensor cost shows rather than its bytes; its shards hold at most 1,200
tensors, as the published checkpoint's 16 shards do (mergekit's loader looks a tensor up
in its shard's key list, so a single 18,867-tensor shard would be slower).

Jobs (bench/bench.py's conventions: separate processes, rotating order, page cache
evicted before each, medians; memory ratio = (peak RssAnon - RssAnon after imports -
500M out shard) / largest output tensor, here the embedding: the output keeps the
experts' one 2-D tensor per expert):
  a       mergekit-yaml layer_swap, every layer a transition layer (t_b=t_u=1 with few
          layers): every tensor averaged, the worst case
  w       mergekit-yaml layer_swap, every layer taken whole from the language expert
          (bottom_layers = all), non-layer tensors averaged
  l       like w with non_layer: language: every tensor copied from one expert, nothing
          averaged (with 2 layers, the embedding and lm_head are a third of the bytes, so
          w measures their average more than the layers)
  c       copying one expert's safetensors files (the I/O floor)
  many_a  job a on the ``many`` pair: stored tensors per second of job time
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as dense  # noqa: E402  (the dense bench's measuring helpers)

WIDTHS = dict(hidden=2048, experts=128, expert_intermediate=768, heads=32, kv_heads=4, head_dim=128, vocab=151936)
MANY = dict(hidden=64, experts=128, expert_intermediate=16, heads=4, kv_heads=2, head_dim=16, vocab=1024)
NOISE = {"task": 1e-3, "lang": 2e-3}
JOBS = ("a", "w", "l", "c", "many_a")


def tensor_specs(s, layers):
    """(name, shape) as save_pretrained writes a Qwen3-MoE checkpoint."""
    h, hd = s["hidden"], s["head_dim"]
    specs = [("model.embed_tokens.weight", (s["vocab"], h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (s["heads"] * hd, h)),
            (p + "self_attn.k_proj.weight", (s["kv_heads"] * hd, h)),
            (p + "self_attn.v_proj.weight", (s["kv_heads"] * hd, h)),
            (p + "self_attn.o_proj.weight", (h, s["heads"] * hd)),
            (p + "self_attn.q_norm.weight", (hd,)),
            (p + "self_attn.k_norm.weight", (hd,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate.weight", (s["experts"], h)),
        ]
        for e in range(s["experts"]):
            q = f"{p}mlp.experts.{e}."
            specs += [
                (q + "gate_proj.weight", (s["expert_intermediate"], h)),
                (q + "up_proj.weight", (s["expert_intermediate"], h)),
                (q + "down_proj.weight", (h, s["expert_intermediate"])),
            ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]
    return specs


def config(s, layers):
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": s["hidden"],
        "intermediate_size": 6144,
        "moe_intermediate_size": s["expert_intermediate"],
        "num_experts": s["experts"],
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "num_hidden_layers": layers,
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": s["head_dim"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def generate(label, s, layers, data, shard_bytes=2_000_000_000, shard_tensors=1200):
    """Write task and lang (base + seeded noise) once; a marker says the set is complete."""
    import torch
    from safetensors.torch import save_file

    marker = os.path.join(data, "complete.json")
    want = {"widths": s, "layers": layers, "noise": NOISE}
    if os.path.exists(marker) and json.load(open(marker)) == want:
        return
    shutil.rmtree(data, ignore_errors=True)
    specs = tensor_specs(s, layers)
    shards, size = [[]], 0
    for name, shape in specs:
        b = dense.numel(shape) * 2
        if size and (size + b > shard_bytes or len(shards[-1]) >= shard_tensors):
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += b
    t0 = time.time()
    print(f"generating {label}: 2 x {sum(dense.numel(x) * 2 for _, x in specs) / 1e9:.2f} GB, {len(specs)} tensors")
    gen = torch.Generator().manual_seed(0)
    dirs = {m: os.path.join(data, m) for m in ("task", "lang")}
    for d in dirs.values():
        os.makedirs(d)
        json.dump(config(s, layers), open(os.path.join(d, "config.json"), "w"), indent=2)
    weight_map, n = {}, len(shards)
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{n:05d}.safetensors"
        out = {m: {} for m in dirs}
        for name, shape in shard:
            base = (1.0 + 0.05 * torch.randn(shape, generator=gen)) if len(shape) == 1 else None
            if base is None:
                base = 0.02 * torch.randn(shape, generator=gen)
            for m in dirs:
                out[m][name] = (base + NOISE[m] * torch.randn(shape, generator=gen)).to(torch.bfloat16)
            weight_map[name] = file
        for m, d in dirs.items():
            save_file(out[m], os.path.join(d, file), metadata={"format": "pt"})
        del out
    total = sum(dense.numel(x) * 2 for _, x in specs)
    for d in dirs.values():
        json.dump(
            {"metadata": {"total_size": total}, "weight_map": weight_map},
            open(os.path.join(d, "model.safetensors.index.json"), "w"),
        )
    json.dump(want, open(marker, "w"))
    print(f"  generated in {time.time() - t0:.0f} s", flush=True)


def recipe(data, zones):
    return {
        "merge_method": "layer_swap",
        "models": [
            {"model": os.path.join(data, "task"), "parameters": {"role": "task"}},
            {"model": os.path.join(data, "lang"), "parameters": {"role": "language"}},
        ],
        "parameters": zones,
        "dtype": "bfloat16",
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--json", default=os.path.join(HERE, "results", "moe.json"))
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("--many-layers", type=int, default=48, help="layers of the many-tensor pair (real: 48)")
    ap.add_argument("--clean", action="store_true", help="delete the generated models at the end")
    opts = ap.parse_args()
    jobs = [j for j in JOBS if j in opts.jobs.split(",")]
    wide = os.path.join(opts.data, f"moe-L{opts.layers}")
    many = os.path.join(opts.data, f"moe-many-L{opts.many_layers}")
    if any(j in jobs for j in ("a", "w", "c")):
        generate(f"moe-L{opts.layers}", WIDTHS, opts.layers, wide)
    if "many_a" in jobs:
        generate("moe-many", MANY, opts.many_layers, many)
    few = dict(bottom_layers=0, top_layers=0, bottom_transition=1, top_transition=opts.layers - 1)
    whole = dict(bottom_layers=opts.layers, top_layers=0)
    paths = {}
    for job, data, zones in (
        ("a", wide, few),
        ("w", wide, whole),
        ("l", wide, dict(whole, non_layer="language")),
        (
            "many_a",
            many,
            dict(
                bottom_layers=0,
                top_layers=0,
                bottom_transition=opts.many_layers // 2,
                top_transition=opts.many_layers - opts.many_layers // 2,
            ),
        ),
    ):
        os.makedirs(data, exist_ok=True)
        paths[job] = os.path.join(data, f"recipe_{job}.yaml")
        dense.write_yaml(recipe(data, zones), paths[job])
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for key in ("MERGEKIT_LAYERSWAP_READ_ALL", "MERGEKIT_LAYERSWAP_NO_CACHE"):
        env.pop(key, None)

    def argv(job):
        data = many if job == "many_a" else wide
        out = os.path.join(data, "out", job)
        if job == "c":
            return ["copy", os.path.join(wide, "lang"), out]
        return ["merge", paths[job], out, "--out-shard-size", dense.OUT_SHARD]

    results = {job: [] for job in jobs}
    for rep in range(opts.repeats):
        order = jobs[rep % len(jobs) :] + jobs[: rep % len(jobs)]
        for job in order:
            data = many if job == "many_a" else wide
            shutil.rmtree(os.path.join(data, "out"), ignore_errors=True)
            os.sync()
            dense.evict(dense.files_under(data))
            row = dense.run_job(argv(job), env, os.path.join(data, f"log_{job}_{rep}.txt"))
            results[job].append(row)
            print(
                f"  {job} rep {rep}: job {row['job_s']:.1f} s, wall {row['wall_s']:.1f} s, "
                f"RssAnon peak {row['rss_anon_peak_mb']:.0f} MB",
                flush=True,
            )
        shutil.rmtree(os.path.join(wide, "out"), ignore_errors=True)
        shutil.rmtree(os.path.join(many, "out"), ignore_errors=True)

    med = {job: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for job, rows in results.items() if rows}
    s = WIDTHS
    # the output keeps the experts' layout (one 2-D tensor per expert): its largest tensor is
    # the embedding or lm_head, bf16
    largest = max(dense.numel(shape) for _, shape in tensor_specs(s, opts.layers)) * 2
    summary = {}
    for job in ("a", "w", "l"):
        if job in med:
            summary[f"memory ratio {job}"] = dense.memory_ratio(med[job], largest)
            if "c" in med:
                summary[f"{job} / copy one expert (job time)"] = med[job]["job_s"] / med["c"]["job_s"]
            stored = len(tensor_specs(WIDTHS, opts.layers))
            reads = stored * {"a": 2, "w": 1, "l": 1}[job]
            summary[f"{job} stored tensors read per second"] = reads / med[job]["job_s"]
    if "many_a" in med:
        stored = len(tensor_specs(MANY, opts.many_layers))
        summary["many_a stored tensors"] = stored
        summary["many_a stored tensors read per second (both experts)"] = 2 * stored / med["many_a"]["job_s"]
        summary["many_a job s"] = med["many_a"]["job_s"]
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mem_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
        "load_average_at_end": os.getloadavg(),
    }
    document = {
        "machine": machine,
        "layers": opts.layers,
        "widths": WIDTHS,
        "largest_output_bytes": largest,
        "medians": med,
        "summary": summary,
        "runs": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
    json.dump(document, open(opts.json, "w"), indent=2)
    print(json.dumps(summary, indent=2))
    if opts.clean:
        shutil.rmtree(wide, ignore_errors=True)
        shutil.rmtree(many, ignore_errors=True)


if __name__ == "__main__":
    main()
