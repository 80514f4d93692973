# SPDX-License-Identifier: LGPL-3.0-only
"""``mergekit-layerswap evidence``: the 0.5B evidence run (issue 23) and its table."""

from __future__ import annotations

import click


@click.group("evidence")
def evidence_group():
    """Does the swap beat both experts and the soup? Qwen2.5-Coder-0.5B, offline, resumable."""


@evidence_group.command("run")
@click.option(
    "--run-dir",
    default="evidence-run",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where checkpoints, data and each stage's result go; rerun with the same one to resume.",
)
@click.option(
    "--expert-cpu-s",
    type=click.FloatRange(min=1.0),
    default=None,
    help="CPU seconds each expert's fine-tune may take; steps follow from the measured rate [default: 1500].",
)
@click.option("--no-generation", is_flag=True, help="Stop after the answer-loss stages (skip exact match).")
@click.option(
    "--part",
    type=click.Choice(["all", "build", "score"]),
    default="all",
    show_default=True,
    help="build: base, experts and merges only; score: only the scores, each model once it exists "
    "(run one of each side by side to use two cores).",
)
@click.option(
    "--mgsm-tsv",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The real MGSM Swahili test file (mgsm_sw.tsv, CC BY 4.0), if you have a copy; not shipped.",
)
def run_command(run_dir, expert_cpu_s, no_generation, part, mgsm_tsv):
    """Build, merge and score everything; a rerun skips finished stages."""
    import dataclasses

    from mergekit_layerswap.evidence.pipeline import Evidence, EvidenceSettings

    settings = EvidenceSettings()
    if expert_cpu_s is not None:
        settings = dataclasses.replace(settings, expert_cpu_s=expert_cpu_s)
    Evidence(run_dir, settings, mgsm_tsv=mgsm_tsv, log=click.echo).run_all(part, generation=not no_generation)


@evidence_group.command("report")
@click.option("--run-dir", default="evidence-run", show_default=True, type=click.Path(file_okay=False, exists=True))
@click.option("--json", "json_out", default="docs/evidence-results.json", show_default=True)
@click.option("--markdown", default="docs/evidence.md", show_default=True, help="Its results section is rewritten.")
def report_command(run_dir, json_out, markdown):
    """Write the results table (small JSON and the table in docs/evidence.md) from a run directory."""
    from mergekit_layerswap.evidence.report import write_report

    click.echo(write_report(run_dir, json_out, markdown))
