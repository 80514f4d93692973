# SPDX-License-Identifier: LGPL-3.0-only
"""Regenerate the example figures of docs/analysis.md from small planted-delta models.

    python docs/img/make_planted_example.py

A 16-layer Llama-shaped model (hidden size 64) is the base. The "language" expert
moves most in its bottom 4 and top 2 layers, most of all at the very bottom; the "math"
expert moves most in layers 6-13, peaking in the upper half. Every layer of both moves a
little. Nothing is downloaded.
"""

import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))

from checkpoints import Arch, make_model  # noqa: E402


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


# noise scale per layer (None: embeddings, final norm, lm_head); every layer moves a little
LANGUAGE = {
    **{layer: 0.004 for layer in range(16)},
    0: 0.05,
    1: 0.04,
    2: 0.03,
    3: 0.02,
    14: 0.025,
    15: 0.04,
    None: 0.01,
}
MATH = {
    **{layer: 0.003 for layer in range(16)},
    6: 0.006,
    7: 0.008,
    8: 0.01,
    9: 0.014,
    10: 0.016,
    11: 0.018,
    12: 0.016,
    13: 0.012,
}


def main():
    from click.testing import CliRunner

    from mergekit_layerswap.cli.main import main as cli

    arch = Arch("llama16", _config, "model.layers.{}.", 16)
    with tempfile.TemporaryDirectory() as root:
        base = make_model(arch, os.path.join(root, "base"), seed=1)
        language = make_model(arch, os.path.join(root, "language"), seed=2, base_path=base, noise_by_layer=LANGUAGE)
        math = make_model(arch, os.path.join(root, "math"), seed=3, base_path=base, noise_by_layer=MATH)
        out = os.path.join(root, "analysis")
        result = CliRunner().invoke(
            cli, ["analyze", "--base", base, "--expert", language, "--expert", math, "--out", out, "--quiet"]
        )
        print(result.output)
        if result.exit_code:
            raise SystemExit(result.exit_code)
        for name in ("comparison_heatmap.png", "profile.png"):
            shutil.copy(os.path.join(out, name), os.path.join(HERE, f"planted_{name}"))
        print(
            CliRunner()
            .invoke(
                cli,
                [
                    "suggest",
                    "--base",
                    base,
                    "--task",
                    math,
                    "--language",
                    language,
                    "--quiet",
                    "--out",
                    os.path.join(root, "recipe.yaml"),
                ],
            )
            .output
        )


if __name__ == "__main__":
    main()
