# SPDX-License-Identifier: LGPL-3.0-only
"""The statistics behind docs/example.md (no models needed)."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
from example_stats import Z95, mean_ci, paired_difference, verdict, wilson  # noqa: E402


def test_wilson_at_zero_correct_has_the_closed_form_upper_bound():
    # p = 0: the Wilson interval is [0, (z^2/n) / (1 + z^2/n)]
    ci = wilson(0, 10)
    q = Z95**2 / 10
    assert ci["value"] == 0 and ci["low"] == 0
    assert ci["high"] == pytest.approx(q / (1 + q))
    assert ci["high"] == pytest.approx(0.2775, abs=1e-4)


def test_wilson_half_correct_is_symmetric_around_one_half():
    ci = wilson(5, 10)  # textbook value: [0.2366, 0.7634]
    assert ci["low"] == pytest.approx(0.2366, abs=1e-4)
    assert ci["high"] == pytest.approx(0.7634, abs=1e-4)


def test_mean_ci_uses_the_sample_standard_deviation():
    ci = mean_ci([1, 2, 3, 4, 5])  # mean 3, sd sqrt(10/4), se sd/sqrt(5)
    half = Z95 * math.sqrt(2.5) / math.sqrt(5)
    assert ci["value"] == 3
    assert (ci["low"], ci["high"]) == (pytest.approx(3 - half), pytest.approx(3 + half))


def test_paired_difference_removes_the_spread_shared_by_both_variants():
    reference = [1.0, 3.0, 2.0, 5.0, 4.0]
    shifted = [v + 0.1 for v in reference]
    separate = mean_ci(shifted)
    paired = paired_difference(shifted, reference)
    assert separate["low"] < mean_ci(reference)["value"]  # unpaired intervals overlap
    assert paired["value"] == pytest.approx(0.1)
    assert paired["high"] - paired["low"] == pytest.approx(0.0, abs=1e-12)
    assert verdict(paired) == "worse"  # a higher loss on every problem


def test_paired_difference_by_hand_and_noise_verdict():
    d = paired_difference([2, 3, 4], [1, 1, 1])  # differences 1, 2, 3: mean 2, sd 1
    assert d["value"] == 2
    assert d["high"] - d["value"] == pytest.approx(Z95 / math.sqrt(3))
    assert verdict(d) == "worse" and verdict(d, lower_is_better=False) == "better"
    assert verdict(paired_difference([1, -1, 2, -2], [0, 0, 0, 0])) == "within noise"
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])
