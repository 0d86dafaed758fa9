"""Issue #23's decision rule (midpo/core/decision.py) against hand-computed intervals and each reading's case."""

from __future__ import annotations

import math

import pytest

from midpo.core.decision import choose_by_validation, decide, mean_interval, paired, t975


def test_interval_by_hand():
    # diffs 0.01, 0.02, 0.03: mean 0.02, sd 0.01, half = 4.303 * 0.01 / sqrt(3)
    iv = paired({0: 0.51, 1: 0.52, 2: 0.53, 9: 1.0}, {0: 0.50, 1: 0.50, 2: 0.50})
    assert iv["seeds"] == [0, 1, 2] and iv["diffs"] == pytest.approx([0.01, 0.02, 0.03])
    assert iv["mean"] == pytest.approx(0.02) and iv["sd"] == pytest.approx(0.01)
    assert iv["half"] == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert t975(7) == 2.365 and t975(100) == 1.96
    assert math.isnan(mean_interval([0.3])["half"])
    with pytest.raises(ValueError):
        t975(0)


def _iv(m, half, n=8):
    return {"n": n, "mean": m, "lo": m - half, "hi": m + half}


@pytest.mark.parametrize("iv,want", [
    (_iv(0.015, 0.005), "beats"),              # lo 0.010 > 0, mean >= 0.01
    (_iv(0.008, 0.005), "inconclusive"),       # above 0 but below the minimum effect, and not within +-0.01
    (_iv(0.002, 0.005), "no difference"),      # [-0.003, 0.007] inside (-0.01, 0.01)
    (_iv(0.0, 0.012), "inconclusive"),         # too wide to say either
    (_iv(-0.02, 0.005), "worse"),
    (_iv(0.02, 0.005, n=1), "inconclusive"),
])
def test_readings(iv, want):
    assert decide(iv, 0.01) == want


def test_lower_is_better_mirrors():
    assert decide(_iv(-0.08, 0.02), 0.05, higher_is_better=False) == "beats"
    assert decide(_iv(0.08, 0.02), 0.05, higher_is_better=False) == "worse"
    assert decide(_iv(0.01, 0.02), 0.05, higher_is_better=False) == "no difference"


def test_lr_choice_takes_the_best_and_breaks_ties_to_the_smaller():
    assert choose_by_validation({1e-4: 0.380, 1e-3: 0.390, 3e-3: 0.385}) == 1e-3
    assert choose_by_validation({1e-4: 0.3895, 1e-3: 0.390, 3e-3: 0.391}) == 1e-4  # within 0.002 of the best
    assert choose_by_validation({1e-4: 0.380, 1e-3: 0.390, 3e-3: 0.391}) == 1e-3
    with pytest.raises(ValueError):
        choose_by_validation({})
