# SPDX-License-Identifier: LGPL-3.0-only
"""A quick look at the merged model: a short greedy answer to one Swahili problem."""

from __future__ import annotations

from dataclasses import dataclass

from mergekit_layerswap.demo.data import HELD_OUT_TEMPLATES, TemplateSource, generate_problems


@dataclass(frozen=True)
class SanityAnswer:
    question: str
    expected: str
    generated: str


def greedy_answer(model_dir: str, source: TemplateSource, max_new_tokens: int = 48) -> SanityAnswer:
    """Answer the first held-out Swahili problem (templates 60-99, seed 0) greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_layerswap.demo.finetune import default_threads

    torch.set_num_threads(default_threads())
    problem = generate_problems(source, "swh", HELD_OUT_TEMPLATES[:1], per_template=1, seed=0)[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    start = prompt["input_ids"].shape[1]
    generated = tokenizer.decode(output[0][start:], skip_special_tokens=True)
    return SanityAnswer(problem.question, problem.answer, " ".join(generated.split()))
