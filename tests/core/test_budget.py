"""Token-budget micro-batches (core.budget): the cost is what collate_pairs lays out; the cut keeps order, covers
every pair once and stays under the budget (a pair over it alone)."""

from __future__ import annotations

import random

import pytest

from midpo.core.batching import collate_pairs
from midpo.core.budget import budget_cost, fill_to_budget


def _lengths(n: int, seed: int) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, 30), rng.randint(1, 60), rng.randint(1, 60)) for _ in range(n)]


@pytest.mark.parametrize("layout", ["padded", "shared", "packed"])
def test_cost_is_what_collate_lays_out(layout):
    lengths = _lengths(5, 0)
    rows = [{"prompt_ids": [1] * p, "chosen_ids": [3] * c, "rejected_ids": [4] * r} for p, c, r in lengths]
    b = collate_pairs(rows, layout=layout, pad_id=0)
    assert budget_cost(lengths, layout) == (b.num_tokens if layout == "packed" else b.input_ids.numel())


@pytest.mark.parametrize("layout", ["padded", "shared", "packed"])
def test_cut_in_order_under_budget(layout):
    lengths = _lengths(40, 1)
    budget = 300
    groups = fill_to_budget(lengths, budget, layout)
    assert [i for g in groups for i in g] == list(range(40))
    for g in groups:
        cost = budget_cost([lengths[i] for i in g], layout)
        assert cost <= budget or len(g) == 1
    # greedy: the next pair would not have fit the group before it
    for g, nxt in zip(groups, groups[1:]):
        assert budget_cost([lengths[i] for i in g + [nxt[0]]], layout) > budget
