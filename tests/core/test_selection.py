"""Pair selection of `midpo iterate` (midpo.core.selection): DICE's length-regularized best vs worst, ties and
margins dropped, the replay count; each against the formula written out here."""

from __future__ import annotations

import random

import pytest

from midpo.core import selection as sel


def test_length_regularized_selection_equals_the_formula() -> None:
    rng = random.Random(0)
    for _ in range(200):
        k = rng.randint(2, 9)
        logp = [rng.uniform(-80, -5) for _ in range(k)]
        ref = [rng.uniform(-80, -5) for _ in range(k)]
        lengths = [rng.randint(1, 40) for _ in range(k)]
        beta, alpha = rng.choice([0.1, 0.5]), rng.choice([0.0, 0.01, 0.2])
        # DICE: r = beta * (log pi_t - log pi_{t-1}); select by r - alpha * |y|
        shaped = [beta * (p - q) - alpha * n for p, q, n in zip(logp, ref, lengths)]
        want_best = max(range(k), key=lambda i: shaped[i])  # first maximum
        want_worst = max(i for i in range(k) if shaped[i] == min(shaped))  # last minimum
        got = sel.select_pair(sel.length_regularized(sel.implicit_rewards(logp, ref, beta), lengths, alpha))
        assert got == (want_best, want_worst)


def test_the_length_term_changes_the_choice() -> None:
    # sample 0 has the higher reward but is 30 tokens longer: alpha = 0.1 turns the preference around
    assert sel.select_pair(sel.length_regularized([2.0, 0.5], [40, 10], 0.0)) == (0, 1)
    assert sel.select_pair(sel.length_regularized([2.0, 0.5], [40, 10], 0.1)) == (1, 0)


def test_ties_margins_and_too_few_are_dropped() -> None:
    assert sel.select_pair([1.0, 1.0, 1.0]) == sel.DROP_TIE
    assert sel.select_pair([0.3]) == sel.DROP_TOO_FEW
    assert sel.select_pair([0.0, 0.2], min_margin=0.2) == sel.DROP_MARGIN
    assert sel.select_pair([0.0, 0.25], min_margin=0.2) == (1, 0)
    with pytest.raises(ValueError, match="non-finite"):
        sel.select_pair([0.0, float("nan")])


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.8])
def test_replay_count_makes_the_fraction(fraction: float) -> None:
    for n_on in (1, 7, 40, 333, 1000):
        n = sel.replay_count(n_on, fraction, available=10**6)
        # the nearest integer to the solution of n / (n_on + n) = fraction
        exact = n_on * fraction / (1 - fraction)
        assert abs(n - exact) <= 0.5
        assert sel.replay_count(n_on, fraction, available=3) == min(3, n)
