import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from checkpoints import ARCHS  # noqa: E402
from helpers import Family  # noqa: E402

# the Hub is never needed: every model in these tests is a local directory
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval's local tasks load JSONL through datasets


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["MERGEKIT_LAYERSWAP_CACHE"] = str(tmp_path_factory.mktemp("magnitude-cache"))


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Family.build(tmp_path_factory.mktemp(name), ARCHS[name])
        return cache[name]

    return get
