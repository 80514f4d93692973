# SPDX-License-Identifier: LGPL-3.0-only
"""Nothing lost: a layer_swap merge never writes into, over or inside an input, never leaves
a half-written output, and replaces an earlier merge only as a whole (adapter/output.py).

Faults are real: a ``mergekit-yaml`` process killed with SIGKILL / SIGINT mid-write, a
small tmpfs, a per-process file size limit (RLIMIT_FSIZE), a read-only bind mount (root
ignores chmod). Every refusal is checked for its exit status, its single ``Error:``
line, no traceback, nothing written and inputs byte-identical (sha256).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import yaml
from checkpoints import ARCHS, SPECIAL, load_tensors, make_model
from click.testing import CliRunner
from helpers import Family, assert_one_line_error, run_yaml_inprocess, swap_recipe, write_recipe

REPLACE_ENV = "MERGEKIT_LAYERSWAP_REPLACE_OUTPUT"


# ------------------------------------------------------------------ helpers
def tree_digest(*roots) -> dict:
    """relative path -> sha256 of every file under ``roots`` (symlinks by target)."""
    out = {}
    for root in map(str, roots):
        if os.path.isfile(root):
            out[root] = hashlib.sha256(open(root, "rb").read()).hexdigest()
            continue
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(folder, name)
                out[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert out, f"nothing under {roots}"
    return out


def leftovers(parent) -> list:
    """Temporary or set-aside directories of this package next to an output."""
    return sorted(n for n in os.listdir(parent) if ".layerswap-tmp-" in n or ".layerswap-old-" in n)


def cli_error_line(completed) -> str:
    """A console-script run that failed with exactly one ``Error:`` line and no traceback."""
    assert completed.returncode == 1, (completed.returncode, completed.stderr[-3000:])
    text = completed.stdout + completed.stderr
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, text[-3000:]
    assert text.rstrip().endswith(errors[0]), text[-3000:]
    return errors[0]


def yaml_exe() -> str:
    return os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")


@contextlib.contextmanager
def mounted(kind: str, where, size: int = 0, source=None):
    """A real mount for the test's duration: a tmpfs of ``size`` bytes, or ``source``
    bind-mounted read-only (root writes through chmod, not through a read-only mount)."""
    os.makedirs(where, exist_ok=True)
    if kind == "tmpfs":
        commands = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]]
    else:
        commands = [["mount", "--bind", str(source), str(where)], ["mount", "-o", "remount,ro,bind", str(where)]]
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", str(where)], capture_output=True)
            pytest.fail(f"these tests need mounts (run as root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield str(where)
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A family of this module's own: a broken build must not damage other tests' experts."""
    return Family.build(tmp_path_factory.mktemp("own-family"), ARCHS["llama"])


@pytest.fixture(scope="module")
def adapter(fam, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(fam.base, dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    path = str(tmp_path_factory.mktemp("lora") / "adapter")
    lora.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def previous_merge(fam, tmp_path_factory):
    """A finished merge (bottom_layers=1) to be found in a target before a new merge."""
    root = tmp_path_factory.mktemp("previous")
    recipe = write_recipe(root / "recipe.yaml", swap_recipe(fam, bottom_layers=1, top_layers=1))
    result = run_yaml_inprocess(recipe, root / "out")
    assert result.exit_code == 0, result.output
    return str(root / "out")


def copy_merge(previous_merge, target) -> str:
    import shutil

    shutil.copytree(previous_merge, target)
    return str(target)


def assert_is_previous_merge(target, previous_merge):
    """The target holds the earlier merge, byte for byte, and transformers loads it."""
    from transformers import AutoModelForCausalLM

    rel = lambda d: {os.path.relpath(p, d): h for p, h in tree_digest(d).items()}  # noqa: E731
    assert rel(target) == rel(previous_merge)
    AutoModelForCausalLM.from_pretrained(str(target))


# ------------------------------------------- output overlapping an input
def _lora_recipe(fam, adapter):
    return swap_recipe(
        fam,
        models=[
            {"model": fam.task, "parameters": {"role": "task"}},
            {"model": f"{fam.lang}+{adapter}", "parameters": {"role": "language"}},
        ],
    )


# name -> (recipe(fam, adapter), output(fam, adapter, tmp_path), words the line must hold, extra options)
OVERLAPS = {
    "expert, absolute": (swap_recipe, lambda f, a, t: f.task, ["is an input", "task expert models[0]"]),
    "expert, relative": (swap_recipe, lambda f, a, t: os.path.relpath(f.task), ["is an input", "task expert"]),
    "expert, trailing slash": (swap_recipe, lambda f, a, t: f.lang + "/", ["is an input", "language expert"]),
    "expert, ./relative": (swap_recipe, lambda f, a, t: "./" + os.path.relpath(f.lang), ["is an input"]),
    "expert, ./relative/": (swap_recipe, lambda f, a, t: "./" + os.path.relpath(f.task) + "/", ["is an input"]),
    "expert, via ..": (swap_recipe, lambda f, a, t: os.path.join(f.lang, "..", "task"), ["is an input", "task"]),
    "expert, symlink": (swap_recipe, lambda f, a, t: _link(t, f.lang), ["is an input", "language expert"]),
    "inside an expert": (
        swap_recipe,
        lambda f, a, t: os.path.join(f.task, "merged"),
        ["is inside an input", "task expert"],
    ),
    "inside an expert via symlink": (
        swap_recipe,
        lambda f, a, t: os.path.join(_link(t, f.task), "m"),
        ["is inside an input"],
    ),
    "contains the experts": (swap_recipe, lambda f, a, t: f.root, ["contains an input"]),
    "base_model": (
        lambda f, a: swap_recipe(f, base=True, weighting="magnitude"),
        lambda f, a, t: f.base,
        ["is an input", "base_model"],
    ),
    "tokenizer source": (
        lambda f, a: {**swap_recipe(f), "tokenizer": {"source": f.base}},
        lambda f, a, t: f.base,
        ["is an input", "tokenizer.source"],
    ),
    "tokenizer_source": (
        lambda f, a: {**swap_recipe(f), "tokenizer_source": f.base},
        lambda f, a, t: f.base + "/",
        ["is an input", "tokenizer_source"],
    ),
    "LoRA adapter": (_lora_recipe, lambda f, a, t: a, ["is an input", "LoRA adapter"]),
    "inside a LoRA adapter": (_lora_recipe, lambda f, a, t: os.path.join(a, "out"), ["is inside", "LoRA adapter"]),
}


def _link(tmp_path, target) -> str:
    link = os.path.join(str(tmp_path), "link")
    os.symlink(target, link)
    return link


@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_output_overlapping_an_input_is_refused(fam, adapter, tmp_path, monkeypatch, case):
    make_recipe, make_output, words = OVERLAPS[case]
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path / "recipe.yaml", make_recipe(fam, adapter))
    out = make_output(fam, adapter, tmp_path)
    before = tree_digest(fam.root, adapter)
    existed = os.path.lexists(out)
    result = run_yaml_inprocess(recipe, out, "--lora-merge-cache", str(tmp_path / "lora-cache"))
    message = assert_one_line_error(result, "output directory", *words)
    assert "outside every model" in message
    assert tree_digest(fam.root, adapter) == before
    assert os.path.lexists(out) == existed
    assert not (tmp_path / "lora-cache").exists()
    assert not leftovers(os.path.dirname(os.path.realpath(out)))


def test_output_equal_to_the_lora_merge_cache_is_refused(fam, adapter, tmp_path):
    cache = tmp_path / "lora-cache"
    recipe = write_recipe(tmp_path / "recipe.yaml", _lora_recipe(fam, adapter))
    assert run_yaml_inprocess(recipe, tmp_path / "first", "--lora-merge-cache", str(cache)).exit_code == 0
    before = tree_digest(cache, fam.root, adapter)
    result = run_yaml_inprocess(recipe, cache, "--lora-merge-cache", str(cache))
    assert_one_line_error(result, "is an input", "LoRA merge cache")
    assert tree_digest(cache, fam.root, adapter) == before


def test_installed_mergekit_yaml_refuses_an_expert_as_output(fam, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam))
    before = tree_digest(fam.root)
    done = subprocess.run(
        [yaml_exe(), str(recipe), os.path.relpath(fam.task, tmp_path) + "/"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    line = cli_error_line(done)
    assert "is an input of the merge, the task expert models[0]" in line
    assert tree_digest(fam.root) == before


def test_run_merge_python_api_refuses_an_expert_as_output(fam):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from mergekit_layerswap.core.errors import OutputError

    before = tree_digest(fam.root)
    config = MergeConfiguration.model_validate(swap_recipe(fam))
    with pytest.raises(OutputError, match="is an input of the merge"):
        run_merge(config, fam.lang, options=MergeOptions(quiet=True))
    assert tree_digest(fam.root) == before


# ----------------------------------------------------- existing targets
def test_rerun_replaces_an_earlier_merge_without_stale_files(fam, tmp_path):
    """Sharded over single-file and back: the target ends with exactly a fresh merge's files,
    and no file names the temporary directory."""
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, bottom_layers=2, top_layers=2))
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert run_yaml_inprocess(recipe, fresh).exit_code == 0
    assert run_yaml_inprocess(recipe, fresh.with_name("fresh-sharded"), "--out-shard-size", "50K").exit_code == 0
    sharded = sorted(os.listdir(fresh.with_name("fresh-sharded")))
    assert "model.safetensors.index.json" in sharded and len([n for n in sharded if n.startswith("model-")]) > 2

    for options, expected in ((("--out-shard-size", "50K"), fresh.with_name("fresh-sharded")), ((), fresh)):
        result = run_yaml_inprocess(recipe, out, *options)
        assert result.exit_code == 0, result.output
        assert sorted(os.listdir(out)) == sorted(os.listdir(expected))
        assert _digests_without_card(out) == _digests_without_card(expected)  # the card names its directory
    for path in tree_digest(out):
        assert b"layerswap-tmp" not in open(path, "rb").read(), path
    assert "\n# out\n" in (out / "README.md").read_text()
    assert not leftovers(tmp_path)


def _digests_without_card(directory):
    return {os.path.relpath(p, directory): h for p, h in tree_digest(directory).items() if not p.endswith("README.md")}


@pytest.mark.parametrize("foreign", ["notes.txt", "checkpoint-500/", ".git/", "model.safetensors.bak"])
def test_existing_target_with_foreign_files_is_refused(fam, previous_merge, tmp_path, foreign):
    target = copy_merge(previous_merge, tmp_path / "out")
    path = os.path.join(target, foreign.rstrip("/"))
    if foreign.endswith("/"):
        os.mkdir(path)
        open(os.path.join(path, "state.bin"), "wb").write(b"precious")
    else:
        open(path, "wb").write(b"precious")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, bottom_layers=2))
    before = tree_digest(target, fam.root)
    message = assert_one_line_error(
        run_yaml_inprocess(recipe, target), "holds files a merge does not write", foreign, f"{REPLACE_ENV}=1"
    )
    assert "choose another output directory" in message
    assert tree_digest(target, fam.root) == before
    assert not leftovers(tmp_path)


def test_opt_in_replaces_a_target_with_foreign_files(fam, previous_merge, tmp_path, monkeypatch):
    target = copy_merge(previous_merge, tmp_path / "out")
    open(os.path.join(target, "notes.txt"), "w").write("mine")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, bottom_layers=2))
    assert run_yaml_inprocess(recipe, tmp_path / "fresh").exit_code == 0
    monkeypatch.setenv(REPLACE_ENV, "1")
    result = run_yaml_inprocess(recipe, target)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(target)) == sorted(os.listdir(tmp_path / "fresh"))
    assert load_tensors(target).keys() == load_tensors(str(tmp_path / "fresh")).keys()


def test_opt_in_never_replaces_a_directory_holding_an_input(fam, tmp_path, monkeypatch):
    monkeypatch.setenv(REPLACE_ENV, "1")
    before = tree_digest(fam.root)
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam))
    assert_one_line_error(run_yaml_inprocess(recipe, fam.root), "contains an input")
    assert tree_digest(fam.root) == before


def test_target_that_is_a_file_is_refused(fam, tmp_path):
    (tmp_path / "out").write_text("not a model")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam))
    assert_one_line_error(run_yaml_inprocess(recipe, tmp_path / "out"), "exists and is not a directory")
    assert (tmp_path / "out").read_text() == "not a model"


def test_stale_temporaries_of_dead_processes_are_removed(fam, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is now free
    alive = subprocess.Popen(["sleep", "60"])
    try:
        for pid in (dead.pid, alive.pid):
            stale = tmp_path / f"out.layerswap-tmp-{pid}"
            stale.mkdir()
            (stale / "model-00001-of-00009.safetensors").write_bytes(b"half")
        (tmp_path / f"other.layerswap-tmp-{dead.pid}").mkdir()  # another target's: not ours to judge
        recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam))
        result = run_yaml_inprocess(recipe, tmp_path / "out")
        assert result.exit_code == 0, result.output
        assert leftovers(tmp_path) == sorted([f"out.layerswap-tmp-{alive.pid}", f"other.layerswap-tmp-{dead.pid}"])
    finally:
        alive.kill()
        alive.wait()


# ------------------------------------------------------------- real faults
@pytest.fixture(scope="module")
def big_family(tmp_path_factory):
    """Experts of ~31 MB each: written as 1 MB shards the merge takes seconds to write."""
    arch = SPECIAL["llama-wide"]
    root = tmp_path_factory.mktemp("big")
    task = make_model(arch, str(root / "task"), seed=2)
    lang = make_model(arch, str(root / "lang"), seed=3)
    return Family(arch=arch, base="", task=task, lang=lang, root=str(root))


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT"])
def test_merge_killed_mid_write_leaves_the_previous_merge(big_family, previous_merge, fam, tmp_path, signal_name):
    target = copy_merge(previous_merge, tmp_path / "out")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(big_family, bottom_layers=2))
    inputs = tree_digest(big_family.root)
    process = subprocess.Popen(
        [yaml_exe(), str(recipe), str(target), "--out-shard-size", "1M"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    temp = f"{target}.layerswap-tmp-{process.pid}"
    deadline = time.monotonic() + 600
    while not (os.path.isdir(temp) and any(n.endswith(".safetensors") for n in os.listdir(temp))):
        assert process.poll() is None, "the merge ended before it was interrupted: " + process.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(getattr(signal, signal_name))
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode != 0
    assert_is_previous_merge(target, previous_merge)
    assert tree_digest(big_family.root) == inputs
    if signal_name == "SIGINT":  # Ctrl-C: the partial merge is removed on the way out
        assert not leftovers(tmp_path), output[-2000:]
    else:  # kill -9 leaves it; the next merge into the same target removes it
        assert leftovers(tmp_path) == [os.path.basename(temp)]
        result = run_yaml_inprocess(write_recipe(tmp_path / "small.yaml", swap_recipe(fam)), target)
        assert result.exit_code == 0, result.output
        assert not leftovers(tmp_path)


def _limit_file_size(limit: int):
    def limit_in_child():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG

    return limit_in_child


def test_write_failure_mid_merge_leaves_the_previous_merge(fam, previous_merge, tmp_path):
    """RLIMIT_FSIZE makes the first shard's write fail, as a full disk does."""
    target = copy_merge(previous_merge, tmp_path / "out")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, bottom_layers=2))
    before = tree_digest(fam.root)
    done = subprocess.run(
        [yaml_exe(), str(recipe), str(target)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        preexec_fn=_limit_file_size(64 * 1024),
    )
    line = cli_error_line(done)
    for words in ("writing the merge failed", "File too large", "was left as it was", "partial output was removed"):
        assert words in line, line
    assert_is_previous_merge(target, previous_merge)
    assert tree_digest(fam.root) == before
    assert not leftovers(tmp_path)


def test_full_disk_is_refused_up_front(fam, previous_merge, tmp_path):
    """On a tmpfs smaller than one merge nothing is written; on one holding a merge but
    without room for a second (the new merge is built before the old one goes) the old
    merge stays."""
    merge_size = sum(os.path.getsize(p) for p in tree_digest(previous_merge))
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, bottom_layers=2))
    before = tree_digest(fam.root)
    with mounted("tmpfs", tmp_path / "small", size=merge_size // 2) as disk:
        result = run_yaml_inprocess(recipe, os.path.join(disk, "out"))
        assert_one_line_error(result, "not enough free space", "free some space")
        assert os.listdir(disk) == []
    with mounted("tmpfs", tmp_path / "one", size=merge_size * 19 // 10) as disk:
        target = os.path.join(disk, "out")
        result = run_yaml_inprocess(recipe, target)  # the first merge fits
        assert result.exit_code == 0, result.output
        first = tree_digest(target)
        result = run_yaml_inprocess(recipe, target)
        assert_one_line_error(result, "not enough free space", "out")
        assert tree_digest(target) == first
        assert sorted(os.listdir(disk)) == ["out"]
    assert tree_digest(fam.root) == before


def test_disk_filling_up_mid_merge_leaves_the_previous_merge(big_family, previous_merge, tmp_path):
    """The up-front check passes; then another writer fills the tmpfs while the merge writes."""
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(big_family, bottom_layers=2))
    inputs = tree_digest(big_family.root)
    with mounted("tmpfs", tmp_path / "disk", size=48 << 20) as disk:
        target = copy_merge(previous_merge, os.path.join(disk, "out"))
        process = subprocess.Popen(
            [yaml_exe(), str(recipe), target, "--out-shard-size", "1M"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )
        temp = f"{target}.layerswap-tmp-{process.pid}"
        deadline = time.monotonic() + 600
        while not (os.path.isdir(temp) and any(n.endswith(".safetensors") for n in os.listdir(temp))):
            assert process.poll() is None, "the merge ended before the disk filled up: " + process.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with open(os.path.join(disk, "filler"), "wb") as filler:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(b"\0" * (1 << 20))
                    filler.flush()
        output = process.communicate(timeout=300)[0]
        done = subprocess.CompletedProcess(process.args, process.returncode, "", output)
        line = cli_error_line(done)
        assert "writing the merge failed: No space left on device" in line and "out was left as it was" in line
        assert_is_previous_merge(target, previous_merge)
        assert sorted(os.listdir(disk)) == ["filler", "out"]
    assert tree_digest(big_family.root) == inputs


@pytest.mark.parametrize("existing", [True, False])
def test_read_only_output_location(fam, previous_merge, tmp_path, existing):
    writable = tmp_path / "rw"
    writable.mkdir()
    if existing:
        copy_merge(previous_merge, writable / "out")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam))
    before = tree_digest(fam.root)
    with mounted("ro-bind", tmp_path / "ro", source=writable) as read_only:
        result = run_yaml_inprocess(recipe, os.path.join(read_only, "out"))
        assert_one_line_error(result, "cannot write to the output location", "Read-only file system", "writable disk")
    if existing:
        assert_is_previous_merge(writable / "out", previous_merge)
    assert sorted(os.listdir(writable)) == (["out"] if existing else [])
    assert tree_digest(fam.root) == before


# ------------------------------------------------------------ mergekit-multi
def test_mergekit_multi_lazy_skips_a_layer_swap_stage_only_when_unchanged(fam, tmp_path):
    from mergekit.scripts.multimerge import main as multimerge

    stage = {"name": "swap", **swap_recipe(fam, bottom_layers=1, top_layers=1)}
    path = tmp_path / "multi.yaml"
    out = tmp_path / "stages" / "swap"

    def run(recipe_stage):
        path.write_text(yaml.safe_dump_all([recipe_stage], sort_keys=False))
        result = CliRunner().invoke(multimerge, [str(path), "-I", str(tmp_path / "stages"), "--quiet"])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return os.stat(out).st_ino, tree_digest(out)

    first_inode, first = run(stage)
    assert run(stage) == (first_inode, first)  # same stage: skipped, untouched
    changed = {**stage, "parameters": {"bottom_layers": 2, "top_layers": 1}}
    inode, digest = run(changed)
    assert inode != first_inode and digest != first
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["parameters"]["bottom_layers"] == 2
    assert "\n# swap\n" in (out / "README.md").read_text()
    assert run(changed)[1] == digest
    assert not leftovers(tmp_path / "stages")


# ------------------------------------------- without renameat2 (macOS, old kernels)
def test_fallback_swap_without_rename_exchange(fam, previous_merge, tmp_path, monkeypatch):
    """Where RENAME_EXCHANGE is missing the old target is renamed aside, then replaced."""
    from mergekit_layerswap.adapter import output

    monkeypatch.setattr(output, "exchange", lambda new, target: False)
    target = copy_merge(previous_merge, tmp_path / "out")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, bottom_layers=2))
    assert run_yaml_inprocess(recipe, tmp_path / "fresh").exit_code == 0
    result = run_yaml_inprocess(recipe, target)
    assert result.exit_code == 0, result.output
    assert load_tensors(target).keys() == load_tensors(str(tmp_path / "fresh")).keys()
    assert (
        tree_digest(os.path.join(target, "model.safetensors")).popitem()[1]
        == tree_digest(str(tmp_path / "fresh" / "model.safetensors")).popitem()[1]
    )
    assert not leftovers(tmp_path)


def test_previous_merge_set_aside_by_a_killed_run_is_restored(fam, previous_merge, tmp_path):
    """A run killed between the fallback's two renames leaves no target and the previous
    merge in <target>.layerswap-old-<pid>; the next run (here one refused by the recipe
    check) moves it back."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    copy_merge(previous_merge, tmp_path / f"out.layerswap-old-{dead.pid}")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, bottom_layers=99))
    assert_one_line_error(run_yaml_inprocess(recipe, tmp_path / "out"), "bottom_layers")
    assert_is_previous_merge(tmp_path / "out", previous_merge)
    assert not leftovers(tmp_path)
