# SPDX-License-Identifier: LGPL-3.0-only
"""Write the example's results: results.csv, results.json and the plot."""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List

COLUMNS = [
    "variant",
    "description",
    "bottom_layers",
    "top_layers",
    "bottom_transition",
    "top_transition",
    "weighting",
    "problems",
    "nll",
    "nll_low",
    "nll_high",
    "nll_minus_math",
    "diff_low",
    "diff_high",
    "diff_verdict",
    "nll_minus_swap_demo",
    "correct",
    "accuracy",
    "acc_low",
    "acc_high",
    "nll_seconds",
    "generate_seconds",
]


def _interval(item) -> str:
    return f"{item['value']:+.4f} [{item['low']:+.4f}, {item['high']:+.4f}]" if item else ""


def flat_row(row: Dict[str, Any]) -> Dict[str, Any]:
    zones = row.get("zones") or {}
    acc = row.get("accuracy") or {}
    diff = row.get("nll_minus_math") or {}
    return {
        "variant": row["name"],
        "description": row["description"],
        **{k: zones.get(k, "") for k in ("bottom_layers", "top_layers", "bottom_transition", "top_transition")},
        "weighting": row.get("weighting", ""),
        "problems": row["nll"]["n"],
        "nll": round(row["nll"]["value"], 5),
        "nll_low": round(row["nll"]["low"], 5),
        "nll_high": round(row["nll"]["high"], 5),
        "nll_minus_math": round(diff["value"], 5) if diff else "",
        "diff_low": round(diff["low"], 5) if diff else "",
        "diff_high": round(diff["high"], 5) if diff else "",
        "diff_verdict": row.get("diff_verdict", ""),
        "nll_minus_swap_demo": _interval(row.get("nll_minus_swap_demo")),
        "correct": row.get("correct", ""),
        "accuracy": round(acc["value"], 4) if acc else "",
        "acc_low": round(acc["low"], 4) if acc else "",
        "acc_high": round(acc["high"], 4) if acc else "",
        "nll_seconds": round(row["nll_seconds"], 1),
        "generate_seconds": round(row.get("generate_seconds", 0.0), 1),
    }


def write_results(out_dir: str, settings: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(flat_row(r) for r in rows)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"settings": settings, "variants": rows}, handle, indent=1)


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_acc = [r for r in rows if r.get("accuracy")]
    show_acc = any(r["accuracy"]["value"] > 0 for r in with_acc)
    panels = 3 if show_acc else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 0.42 * len(rows) + 1.8), sharey=False)
    labels = [r["name"] for r in rows]
    ys = list(range(len(rows)))[::-1]

    def bars(ax, key, title, xlabel, zero=False):
        for y, r in zip(ys, rows):
            item = r.get(key)
            if not item:
                continue
            colour = "tab:orange" if r["name"].startswith(("swap", "no-", "bottom", "top", "sweep")) else "tab:blue"
            ax.errorbar(
                item["value"],
                y,
                xerr=[[max(0.0, item["value"] - item["low"])], [max(0.0, item["high"] - item["value"])]],
                fmt="o",
                color=colour,
                capsize=3,
            )
        if zero:
            ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(ys)
        ax.set_yticklabels(labels)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)

    bars(axes[0], "nll", "loss of the reference solution (95% CI)", "mean per-token NLL (lower is better)")
    bars(
        axes[1], "nll_minus_math", "paired difference vs math expert (95% CI)", "NLL minus math expert's NLL", zero=True
    )
    if show_acc:
        bars(axes[2], "accuracy", "answer accuracy (Wilson 95% CI)", "exact match on the final number")
    fig.suptitle("Swahili math, held-out templates: SmolLM2-135M experts and their merges", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
