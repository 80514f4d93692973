#!/usr/bin/env python
# SPDX-License-Identifier: LGPL-3.0-only
"""Benchmark layer_swap against what users do today (issues 5 and 14). Not a test.

    python bench/bench.py --shape 1b --repeats 3          # generates bench/data/1b once
    python bench/bench.py --shape 3b --repeats 2 --json bench/results/3b.json
    python bench/bench.py --shape 8b --layers 16 --repeats 1 --no-check --clean
    python bench/bench.py --shape 70b --layers 2 --repeats 1 --no-check --clean
    python bench/bench.py --hook-only                     # only the start-up hook timing

Models: a base and two experts (base + small noise) with a real Llama shape (its widths;
``--layers`` changes only the number of decoder layers, so every tensor keeps its real
size while the models fit a small disk), written as sharded bf16 safetensors with an HF
index and a LlamaForCausalLM config.json, tensor by tensor with torch.

Jobs, each a separate process, repeated in a rotating order, every input file (and
every earlier output) evicted from the page cache before each job:
  a       mergekit-yaml, the default layer_swap recipe: b=5,u=2,t_b=1,t_u=1 (with fewer
          than 9 layers: every layer a transition layer), non_layer: average, uniform
  b       mergekit-yaml, the hand-written `merge_method: linear` + `slices:` recipe
          for the same swap (its layer tensors checked against a's; it cannot average
          the non-layer tensors: they come from the language expert)
  c       copying one expert's safetensors files (the I/O floor)
  ch      c with the writeback hint a layer_swap merge gives each finished shard
  r       reading base and both experts once (what the cold magnitude pass must read)
  rs      r with sendfile to /dev/null, as the merge's readahead thread reads
  d_cold  a with `weighting: magnitude` (base_model set), magnitude cache emptied
  d_warm  the same right after d_cold, statistics from the cache
Measured per job: wall time of the whole process, job time without interpreter
start-up and imports (bench/_child.py), peak anonymous RSS (RssAnon sampled every
10 ms from /proc/PID/status), RssAnon right after the imports, peak RSS (VmHWM, which
includes mmapped file pages), the memory ratio (peak RssAnon - RssAnon after imports -
--out-shard-size) / largest output tensor (bf16), and bytes read (resident pages of the
input files after the job, by `fincore`, against the bytes the job needs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PYTHON = sys.executable
MB = 1 << 20

SHAPES = {
    # layers, hidden, intermediate, heads, kv heads, vocab, tied embeddings
    "1b": dict(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256, tied=True),
    "3b": dict(layers=28, hidden=3072, intermediate=8192, heads=24, kv_heads=8, vocab=128256, tied=True),
    "8b": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, tied=False),
    "70b": dict(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256, tied=False),
    "tiny": dict(layers=16, hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=1024, tied=True),  # smoke test
}
ZONES = dict(bottom_layers=5, top_layers=2, bottom_transition=1, top_transition=1)
# with fewer layers than the zones need (--layers 2 at 70B widths): every layer is a
# transition layer, so every tensor is averaged (the worst case for memory and time)
FEW_LAYER_ZONES = dict(bottom_layers=0, top_layers=0, bottom_transition=1, top_transition=1)
NOISE = {"task": 1e-3, "lang": 2e-3}  # std of expert - base; base weights have std 0.02
OUT_SHARD = "500M"
OUT_SHARD_BYTES = 500 * 1000 * 1000  # mergekit reads "500M" as 500e6 bytes
JOBS = ("a", "b", "c", "ch", "r", "rs", "d_cold", "d_warm")


# ----------------------------------------------------------------- model files
def tensor_specs(s):
    """(name, shape) in HF module order."""
    h, hd = s["hidden"], s["hidden"] // s["heads"]
    specs = [("model.embed_tokens.weight", (s["vocab"], h))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (s["heads"] * hd, h)),
            (p + "self_attn.k_proj.weight", (s["kv_heads"] * hd, h)),
            (p + "self_attn.v_proj.weight", (s["kv_heads"] * hd, h)),
            (p + "self_attn.o_proj.weight", (h, s["heads"] * hd)),
            (p + "mlp.gate_proj.weight", (s["intermediate"], h)),
            (p + "mlp.up_proj.weight", (s["intermediate"], h)),
            (p + "mlp.down_proj.weight", (h, s["intermediate"])),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not s["tied"]:
        specs.append(("lm_head.weight", (s["vocab"], h)))
    return specs


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def llama_config(s):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": s["hidden"] // s["heads"],
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate"],
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": s["heads"],
        "num_hidden_layers": s["layers"],
        "num_key_value_heads": s["kv_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0 if s["layers"] < 32 else 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": s["tied"],
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": s["vocab"],
    }


def model_dirs(data):
    return {m: os.path.join(data, m) for m in ("base", "task", "lang")}


def generate(shape, s, data, shard_bytes):
    """Write base, task and lang once; a marker file says the set is complete."""
    import torch
    from safetensors.torch import save_file

    specs = tensor_specs(s)
    marker = os.path.join(data, "complete.json")
    want = {"shape": s, "noise": NOISE, "shard_bytes": shard_bytes}
    if os.path.exists(marker) and json.load(open(marker)) == want:
        return
    total = sum(numel(shape) * 2 for _, shape in specs)
    need = 4 * total + 2 * (1 << 30)  # 3 inputs + one merge output alive at once
    free = shutil.disk_usage(os.path.dirname(data) if not os.path.exists(data) else data).free
    if free < need:
        raise SystemExit(f"{shape}: needs {need / 1e9:.1f} GB free under {data}, have {free / 1e9:.1f} GB")
    shutil.rmtree(data, ignore_errors=True)
    shards, size = [[]], 0  # HF-style: start a new shard when the next tensor would overflow
    for name, shape_ in specs:
        b = numel(shape_) * 2
        if size and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape_))
        size += b
    n = len(shards)
    print(f"generating {shape}: 3 x {total / 1e9:.2f} GB in {n} shards each under {data}", flush=True)
    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    dirs = model_dirs(data)
    for d in dirs.values():
        os.makedirs(d)
        json.dump(llama_config(s), open(os.path.join(d, "config.json"), "w"), indent=2)
        json.dump(
            {"bos_token_id": 128000, "eos_token_id": 128001}, open(os.path.join(d, "generation_config.json"), "w")
        )
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{n:05d}.safetensors"
        out = {m: {} for m in dirs}
        for name, shape_ in shard:
            if len(shape_) == 1:
                base = 1.0 + 0.05 * torch.randn(shape_, generator=gen)
            else:
                base = 0.02 * torch.randn(shape_, generator=gen)
            out["base"][name] = base.to(torch.bfloat16)
            for m in ("task", "lang"):
                noise = torch.randn(shape_, generator=gen).mul_(NOISE[m])
                out[m][name] = noise.add_(base).to(torch.bfloat16)
                del noise
            del base
            weight_map[name] = file
        for m, d in dirs.items():
            save_file(out[m], os.path.join(d, file), metadata={"format": "pt"})
        del out
        print(f"  shard {k}/{n} done ({time.time() - t0:.0f} s)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for d in dirs.values():
        json.dump(index, open(os.path.join(d, "model.safetensors.index.json"), "w"), indent=2)
    json.dump(want, open(marker, "w"))
    print(f"generated in {time.time() - t0:.0f} s", flush=True)


# ----------------------------------------------------------------- recipes
def zones_for(L):
    return ZONES if L >= 9 else FEW_LAYER_ZONES


def layer_role(layer, L):
    """Algorithm 1 (AND form): 'lang', 'task' or 'blend'. Written out again here so the
    bench does not trust the package it measures."""
    zones = zones_for(L)
    b, u, tb, tu = (zones[k] for k in ("bottom_layers", "top_layers", "bottom_transition", "top_transition"))
    if layer < b or layer > L - 1 - u:
        return "lang"
    if b - 1 + tb < layer < L - u - tu:
        return "task"
    return "blend"


def recipes(data, L):
    d = model_dirs(data)
    swap = {
        "merge_method": "layer_swap",
        "models": [
            {"model": d["task"], "parameters": {"role": "task"}},
            {"model": d["lang"], "parameters": {"role": "language"}},
        ],
        # the default recipe: non_layer (average) and weighting (uniform) left at their defaults
        "parameters": dict(zones_for(L)),
        "dtype": "bfloat16",
    }
    magnitude = json.loads(json.dumps(swap))
    magnitude["base_model"] = d["base"]
    magnitude["parameters"]["weighting"] = "magnitude"
    # the hand-written mergekit recipe: one slice per run of equal layer roles
    runs = []
    for layer in range(L):
        role = layer_role(layer, L)
        if runs and runs[-1][0] == role:
            runs[-1][2] = layer + 1
        else:
            runs.append([role, layer, layer + 1])
    slices = []
    for role, start, end in runs:
        if role == "blend":
            sources = [
                {"model": d[m], "layer_range": [start, end], "parameters": {"weight": 0.5}} for m in ("lang", "task")
            ]
        else:
            sources = [{"model": d[role], "layer_range": [start, end], "parameters": {"weight": 1.0}}]
        slices.append({"sources": sources})
    linear = {"merge_method": "linear", "slices": slices, "dtype": "bfloat16"}
    return {"a": swap, "b": linear, "d": magnitude}


def write_yaml(obj, path):
    import yaml

    with open(path, "w") as handle:
        yaml.safe_dump(obj, handle, sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------- measuring
def files_under(*dirs):
    out = []
    for d in dirs:
        for root, _, names in os.walk(d):
            out += [os.path.join(root, n) for n in names]
    return sorted(out)


def evict(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(paths):
    result = subprocess.run(
        ["fincore", "--bytes", "--json", "--output", "RES,FILE", *paths], check=True, capture_output=True, text=True
    )
    return sum(int(row["res"]) for row in json.loads(result.stdout)["fincore"])


def safetensors_header(path):
    with open(path, "rb") as handle:
        n = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(n))
    header.pop("__metadata__", None)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}


def stored_bytes(model_dir):
    sizes = {}
    for f in os.listdir(model_dir):
        if f.endswith(".safetensors"):
            sizes.update(safetensors_header(os.path.join(model_dir, f)))
    return sizes


def needed_bytes(data, L):
    """Bytes of input tensors each job must read: a and d average the non-layer tensors
    (non_layer: average), b takes them from the language expert (first and last slice)."""
    d = model_dirs(data)
    sizes = {m: stored_bytes(d[m]) for m in d}
    swap = linear = 0
    for name, nbytes in sizes["lang"].items():
        match = re.match(r"model\.layers\.(\d+)\.", name)
        role = layer_role(int(match.group(1)), L) if match else None
        swap += nbytes * (1 if role in ("lang", "task") else 2)  # experts have equal shapes
        linear += nbytes * (2 if role == "blend" else 1)
    every = {m: sum(v.values()) for m, v in sizes.items()}
    return {
        "a": swap,
        "b": linear,
        "c": every["lang"],
        "ch": every["lang"],
        "d_warm": swap,
        "r": sum(every.values()),
        "rs": sum(every.values()),
        # the cold magnitude pass reads all of both experts and the base
        "d_cold": sum(every.values()),
    }


class PeakSampler(threading.Thread):
    """Peak RssAnon of a process, from /proc/PID/status every 10 ms."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.done = pid, 0, threading.Event()

    def run(self):
        path = f"/proc/{self.pid}/status"
        while not self.done.is_set():
            try:
                with open(path) as handle:
                    for line in handle:
                        if line.startswith("RssAnon:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                            break
            except OSError:
                return
            self.done.wait(0.01)


def run_job(argv, env, log_path):
    """Run one child; return its wall time, peak RSS figures and its own report."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        report = handle.name
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [PYTHON, os.path.join(HERE, "_child.py"), argv[0], report, *argv[1:]],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        sampler = PeakSampler(proc.pid)
        sampler.start()
        _, status, _ = os.wait4(proc.pid, 0)  # (ru_maxrss here would include the bench's own RSS at fork)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"job {argv[:2]} failed (exit {proc.returncode}); see {log_path}")
    child = json.load(open(report))
    os.unlink(report)
    return {
        "wall_s": wall,
        "job_s": child["job_s"],
        "imports_s": child["imports_s"],
        "rss_anon_peak_mb": sampler.peak_kb / 1024,
        "rss_anon_after_imports_mb": child.get("RssAnon_after_imports_kB", 0) / 1024,
        "vmhwm_mb": child["VmHWM_kB"] / 1024,
    }


def compare_outputs(dir_a, dir_b, lang_dir, task_dir):
    """Tensor-by-tensor check that the layer tensors of the layer_swap output equal the
    linear+slices ones; the non-layer tensors of a must be the experts' average (checked
    on the first 4096 rows, computed here in float32), those of b the language expert's."""
    import torch
    from safetensors import safe_open

    def load_all(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(d, f), framework="pt") as st:
                    for k in st.keys():
                        out[k] = (os.path.join(d, f), k)
        return out

    def get(ref):
        with safe_open(ref[0], framework="pt") as st:
            return st.get_tensor(ref[1])

    A, B, LANG, TASK = load_all(dir_a), load_all(dir_b), load_all(lang_dir), load_all(task_dir)
    result = {
        "same_names": sorted(A) == sorted(B),
        "only_a": sorted(set(A) - set(B)),
        "only_b": sorted(set(B) - set(A)),
        "equal": 0,
        "allclose": 0,
        "different": [],
        "max_abs_diff": 0.0,
    }
    non_layer = [n for n in B if not n.startswith("model.layers.")]
    result["non_layer_of_a_is_average"] = {}
    for n in non_layer:
        x = get(A[n])[:4096]
        expected = ((get(LANG[n])[:4096].float() + get(TASK[n])[:4096].float()) / 2).to(x.dtype)
        result["non_layer_of_a_is_average"][n] = bool(torch.equal(x, expected))
    for name in sorted((set(A) & set(B)) - set(non_layer)):
        x, y = get(A[name]), get(B[name])
        if x.dtype == y.dtype and torch.equal(x, y):
            result["equal"] += 1
        elif x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=1e-2, atol=1e-5):
            result["allclose"] += 1
            result["max_abs_diff"] = max(result["max_abs_diff"], float((x.float() - y.float()).abs().max()))
        else:
            result["different"].append(name)
    result["non_layer_is_language_expert"] = {
        n: bool(torch.equal(get(B[n]), get(LANG[n]))) for n in non_layer if n in LANG
    }
    return result


# ----------------------------------------------------------------- start-up hook
def hook_bench(scratch, n=40):
    """`python -c pass` with and without mergekit_layerswap.pth, everything else equal.

    A scratch venv from the same base interpreter gets a .pth with *path lines* for
    /tmp/venv's site-packages and the repo (path lines put directories on sys.path but
    are not processed as site directories, so no other .pth runs); the hook is then
    switched by adding/removing a copy of mergekit_layerswap.pth in that venv."""
    import sysconfig

    venv = os.path.join(scratch, "hook-venv")
    if not os.path.exists(venv):
        subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", venv], check=True)
    py = os.path.join(venv, "bin", "python")
    sp = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(sp, "_bench_paths.pth"), "w") as handle:
        handle.write(sysconfig.get_paths()["purelib"] + "\n" + REPO + "\n")
    hook = os.path.join(sp, "mergekit_layerswap.pth")
    source_pth = os.path.join(sysconfig.get_paths()["purelib"], "mergekit_layerswap.pth")

    def once(argv):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True)
        return time.perf_counter() - t0

    def series(argv, count):
        times = {"off": [], "on": []}
        for i in range(count):
            for state in ("off", "on") if i % 2 else ("on", "off"):
                if state == "on":
                    shutil.copyfile(source_pth, hook)
                elif os.path.exists(hook):
                    os.unlink(hook)
                times[state].append(once(argv))
        if os.path.exists(hook):
            os.unlink(hook)
        return times

    for _ in range(3):
        once([py, "-c", "pass"])  # warm the page cache
    pass_times = series([py, "-c", "pass"], n)
    check = subprocess.run(
        [py, "-c", "import sys; print('mergekit_layerswap' in sys.modules)"], check=True, capture_output=True, text=True
    ).stdout.strip()
    mk_times = series([py, "-c", "import mergekit.scripts.run_yaml"], 5)
    # -X importtime in the real dev venv: self+cumulative of this package's modules
    stderr = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", "pass"], check=True, capture_output=True, text=True
    ).stderr
    own = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m and m.group(4).startswith("mergekit_layerswap"):
            own.append((m.group(4), int(m.group(1)), int(m.group(2))))
    med = statistics.median
    return {
        "runs_each": n,
        "pass_ms_without_hook_median": 1000 * med(pass_times["off"]),
        "pass_ms_with_hook_median": 1000 * med(pass_times["on"]),
        "pass_ms_added_median": 1000 * (med(pass_times["on"]) - med(pass_times["off"])),
        "pass_ms_added_min": 1000 * (min(pass_times["on"]) - min(pass_times["off"])),
        "hook_absent_in_baseline": check == "False",
        "import_run_yaml_s_without_hook_median": med(mk_times["off"]),
        "import_run_yaml_s_with_hook_median": med(mk_times["on"]),
        "importtime_mergekit_layerswap_self_us_sum": sum(s for _, s, _ in own),
        "importtime_modules": own,
    }


# ----------------------------------------------------------------- main
def summarize(runs):
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def memory_ratio(row, largest_bytes):
    """(peak RssAnon - RssAnon after imports - out shard size) / largest output tensor."""
    extra = (row["rss_anon_peak_mb"] - row["rss_anon_after_imports_mb"]) * MB - OUT_SHARD_BYTES
    return extra / largest_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="1b")
    ap.add_argument(
        "--layers",
        type=int,
        help="decoder layers (default: the shape's own); the widths, "
        "hence every tensor's size, stay the shape's, so a wide shape fits a small disk",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {','.join(JOBS)}")
    ap.add_argument("--json", help="results file (default bench/results/<shape>[-L<layers>].json)")
    ap.add_argument("--data", default=os.path.join(HERE, "data"), help="generated models (git-ignored)")
    ap.add_argument("--shard-size", type=float, default=2.0, help="input shard size in GB (default 2)")
    ap.add_argument("--clean", action="store_true", help="delete this shape's generated models at the end")
    ap.add_argument(
        "--no-check",
        action="store_true",
        help="skip the a-vs-b output check (saves one "
        "output's disk space: every output is deleted right after its job)",
    )
    ap.add_argument("--generate-only", action="store_true", help="only generate the models")
    ap.add_argument("--no-hook", action="store_true", help="skip the start-up hook timing")
    ap.add_argument("--hook-only", action="store_true", help="only time the start-up hook")
    opts = ap.parse_args()
    shape = dict(SHAPES[opts.shape])
    label = opts.shape
    if opts.layers and opts.layers != shape["layers"]:
        shape["layers"] = opts.layers
        label = f"{opts.shape}-L{opts.layers}"
    jobs = [j for j in JOBS if j in opts.jobs.split(",")]
    if "d_warm" in jobs and "d_cold" not in jobs:
        raise SystemExit("d_warm needs d_cold (it uses the cache d_cold fills)")
    json_path = opts.json or os.path.join(HERE, "results", f"{label}.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    os.makedirs(opts.data, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mem_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
    }
    if opts.hook_only:
        hook = hook_bench(opts.data)
        print(json.dumps(hook, indent=2))
        json.dump({"machine": machine, "hook": hook}, open(json_path, "w"), indent=2)
        return

    data = os.path.join(opts.data, label)
    generate(label, shape, data, int(opts.shard_size * 1e9))
    if opts.generate_only:
        return
    L = shape["layers"]
    dirs = model_dirs(data)
    inputs = files_under(*dirs.values())
    needed = needed_bytes(data, L)
    largest = max(numel(s) for _, s in tensor_specs(shape)) * 2  # bf16 output
    outdir = os.path.join(data, "out")
    cache = os.path.join(data, "magnitude-cache")
    recipe_paths = {}
    for key, recipe in recipes(data, L).items():
        recipe_paths[key] = os.path.join(data, f"recipe_{key}.yaml")
        write_yaml(recipe, recipe_paths[key])
    env = dict(os.environ, MERGEKIT_LAYERSWAP_CACHE=cache, TOKENIZERS_PARALLELISM="false")
    env.pop("MERGEKIT_LAYERSWAP_NO_CACHE", None)
    env.pop("MERGEKIT_LAYERSWAP_READ_ALL", None)

    def argv(job):
        out = os.path.join(outdir, job)
        if job in ("c", "ch"):
            return ["copy" if job == "c" else "copy-hinted", dirs["lang"], out]
        if job in ("r", "rs"):
            return ["read" if job == "r" else "read-sendfile", dirs["base"], dirs["task"], dirs["lang"]]
        recipe = recipe_paths["d" if job.startswith("d") else job]
        return ["merge", recipe, out, "--out-shard-size", OUT_SHARD]

    groups = [[j] for j in ("a", "b", "c", "ch", "r", "rs") if j in jobs] + (
        [[j for j in ("d_cold", "d_warm") if j in jobs]] if "d_cold" in jobs else []
    )
    results = {job: [] for job in jobs}
    check = None
    want_check = not opts.no_check and "a" in jobs and "b" in jobs
    for rep in range(opts.repeats):
        shutil.rmtree(outdir, ignore_errors=True)
        k = rep % len(groups)
        order = [job for group in groups[k:] + groups[:k] for job in group]
        for job in order:
            if job == "d_cold":
                shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(os.path.join(outdir, job), ignore_errors=True)
            os.sync()
            evict(files_under(data))  # inputs and any earlier outputs
            before = resident_bytes(inputs)
            row = run_job(argv(job), env, os.path.join(data, f"log_{job}_{rep}.txt"))
            row["read_bytes"] = resident_bytes(inputs) - before
            row["resident_before"] = before
            row["read_over_needed"] = row["read_bytes"] / needed[job]
            if job not in ("c", "ch", "r", "rs"):
                row["memory_ratio"] = memory_ratio(row, largest)
            results[job].append(row)
            print(
                f"repeat {rep + 1}/{opts.repeats} {job:7s} wall {row['wall_s']:6.1f} s  job "
                f"{row['job_s']:6.1f} s  RssAnon {row['rss_anon_peak_mb']:6.0f} MB (after imports "
                f"{row['rss_anon_after_imports_mb']:4.0f})  VmHWM {row['vmhwm_mb']:6.0f} MB  read "
                f"{row['read_bytes'] / 1e9:5.2f} GB ({row['read_over_needed']:.3f} x needed)"
                + (f"  memory ratio {row['memory_ratio']:.2f}" if "memory_ratio" in row else ""),
                flush=True,
            )
            if check is None and want_check and all(os.path.exists(os.path.join(outdir, j)) for j in "ab"):
                check = compare_outputs(
                    os.path.join(outdir, "a"), os.path.join(outdir, "b"), dirs["lang"], dirs["task"]
                )
                print(
                    "a vs b:",
                    json.dumps({k: v for k, v in check.items() if k != "non_layer_is_language_expert"}),
                    "non-layer of b == language expert:",
                    check["non_layer_is_language_expert"],
                    flush=True,
                )
            if not (want_check and check is None and job in "ab"):
                shutil.rmtree(os.path.join(outdir, job), ignore_errors=True)  # disk: one output at a time
        shutil.rmtree(outdir, ignore_errors=True)
    shutil.rmtree(outdir, ignore_errors=True)

    med = {job: summarize(rows) for job, rows in results.items()}
    ratios = {}
    for x, y in (("a", "b"), ("a", "c"), ("a", "ch"), ("b", "c"), ("d_cold", "a"), ("d_warm", "a")):
        if x in med and y in med:
            ratios[f"{x}/{y} job"] = med[x]["job_s"] / med[y]["job_s"]
            ratios[f"{x}/{y} wall"] = med[x]["wall_s"] / med[y]["wall_s"]
    if "d_cold" in med and "d_warm" in med and "r" in med:
        # the magnitude pass alone (cold job minus the same merge from the cache) against
        # reading the files it reads (base and both experts) once
        ratios["magnitude pass / reading its inputs"] = (med["d_cold"]["job_s"] - med["d_warm"]["job_s"]) / med["r"][
            "job_s"
        ]
    if "d_cold" in med and "d_warm" in med and "rs" in med:
        ratios["magnitude pass / reading its inputs with sendfile"] = (
            med["d_cold"]["job_s"] - med["d_warm"]["job_s"]
        ) / med["rs"]["job_s"]
    model_bytes = sum(stored_bytes(dirs["lang"]).values())
    print(
        f"\nshape {label}: {L} layers, hidden {shape['hidden']}, vocab {shape['vocab']}, "
        f"{model_bytes / 1e9:.2f} GB per model, largest output tensor {largest / 1e6:.0f} MB (bf16), "
        f"medians of {opts.repeats} repeats, --out-shard-size {OUT_SHARD}"
    )
    print(
        f"{'job':8s} {'wall s':>7s} {'job s':>7s} {'imp. s':>7s} {'RssAnon MB':>10s} {'imp. MB':>8s} "
        f"{'mem ratio':>9s} {'VmHWM MB':>9s} {'read GB':>8s} {'need GB':>8s} {'read/need':>9s}"
    )
    for job in jobs:
        m = med[job]
        mem = f"{m['memory_ratio']:9.2f}" if "memory_ratio" in m else f"{'':9s}"
        print(
            f"{job:8s} {m['wall_s']:7.1f} {m['job_s']:7.1f} {m['imports_s']:7.1f} "
            f"{m['rss_anon_peak_mb']:10.0f} {m['rss_anon_after_imports_mb']:8.0f} {mem} {m['vmhwm_mb']:9.0f} "
            f"{m['read_bytes'] / 1e9:8.2f} {needed[job] / 1e9:8.2f} {m['read_over_needed']:9.3f}"
        )
    for name, value in ratios.items():
        print(f"{name:30s} {value:.3f}")

    hook = None if opts.no_hook else hook_bench(opts.data)
    if hook:
        print(
            f"start-up hook: python -c pass {hook['pass_ms_without_hook_median']:.1f} ms without, "
            f"{hook['pass_ms_with_hook_median']:.1f} ms with: +{hook['pass_ms_added_median']:.1f} ms (median)"
        )
    out = {
        "shape": label,
        "config": shape,
        "zones": zones_for(L),
        "repeats": opts.repeats,
        "out_shard_size": OUT_SHARD,
        "model_bytes": model_bytes,
        "largest_output_tensor_bytes": largest,
        "needed_bytes": needed,
        "machine": machine,
        "median": med,
        "ratios": ratios,
        "runs": results,
        "a_vs_b": check,
        "hook": hook,
        "recipes": {k: open(p).read() for k, p in recipe_paths.items()},
    }
    json.dump(out, open(json_path, "w"), indent=2)
    print(f"wrote {json_path}")
    if opts.clean:
        shutil.rmtree(data, ignore_errors=True)
        print(f"deleted {data}")


if __name__ == "__main__":
    main()
