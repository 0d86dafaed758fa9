"""The pair sampler: deterministic, rank-disjoint, resumable mid-epoch, tail dropped and counted."""

from __future__ import annotations

import numpy as np
import pytest

from midpo.train.sampler import PairSampler


def _steps(n, micro, accum, world, steps, seed=0):
    """Row indices of `steps` optimizer steps in global-batch order, from per-rank samplers."""
    samplers = [PairSampler(n, micro_batch_size=micro, grad_accum=accum, world_size=world, rank=r, seed=seed)
                for r in range(world)]
    out = []
    for _ in range(steps):
        per_rank = [s.next_step() for s in samplers]  # [rank][k] -> rows
        out.append([int(i) for k in range(accum) for r in range(world) for i in per_rank[r][k]])
    return out, samplers


def test_one_rank_with_accumulation_sees_the_rows_of_two_ranks():
    a, _ = _steps(23, micro=2, accum=2, world=1, steps=10)
    b, _ = _steps(23, micro=2, accum=1, world=2, steps=10)
    assert a == b


def test_epoch_covers_rows_once_and_drops_the_tail():
    n, g = 23, 4
    rows, (s,) = _steps(n, micro=2, accum=2, world=1, steps=n // g)
    flat = [i for r in rows for i in r]
    assert len(flat) == len(set(flat)) == (n // g) * g
    assert s.dropped_per_epoch == n % g == 3
    nxt = s.next_step()  # rolls into epoch 1 with a new permutation
    assert s.state.epoch == 1 and s.state.offset == g
    assert len(np.concatenate(nxt)) == g


def test_resume_from_state_continues_exactly():
    straight, _ = _steps(30, micro=3, accum=1, world=2, steps=12, seed=5)
    first, samplers = _steps(30, micro=3, accum=1, world=2, steps=7, seed=5)
    states = [s.state_dict() for s in samplers]
    resumed = []
    fresh = [PairSampler(30, micro_batch_size=3, grad_accum=1, world_size=2, rank=r, seed=5) for r in range(2)]
    for s, st in zip(fresh, states):
        s.load_state_dict(st)
    for _ in range(5):
        per_rank = [s.next_step() for s in fresh]
        resumed.append([int(i) for r in range(2) for i in per_rank[r][0]])
    assert first + resumed == straight


def test_too_few_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PairSampler(3, micro_batch_size=2, grad_accum=1, world_size=2, rank=0)


def _budget_samplers(lengths, world, budget, seed=3, micro=4, accum=2, layout="padded"):
    return [PairSampler(len(lengths), micro_batch_size=micro, grad_accum=accum, world_size=world, rank=r, seed=seed,
                        token_budget=budget, lengths=lengths, layout=layout) for r in range(world)]


def test_token_budget_ranks_in_lockstep_with_the_fixed_count_rows():
    """Uneven lengths: ranks cut their rows differently, yet run the same number of micro-steps, over exactly the
    rows the fixed-count sampler gives them, in the same order; micro-batches stay under the budget where the
    lockstep split did not have to cut further."""
    from midpo.core.budget import budget_cost

    rng = np.random.default_rng(0)
    lengths = [(int(rng.integers(1, 20)), int(rng.integers(1, 200)), int(rng.integers(1, 200))) for _ in range(64)]
    budgeted = _budget_samplers(lengths, world=2, budget=600)
    fixed = [PairSampler(64, micro_batch_size=4, grad_accum=2, world_size=2, rank=r, seed=3) for r in range(2)]
    counts_differ = False
    for _ in range(8):
        got = [s.next_step() for s in budgeted]
        want = [np.concatenate(s.next_step()) for s in fixed]
        assert len(got[0]) == len(got[1])
        natural = [len(s._cut(w)) for s, w in zip(budgeted, want)]
        counts_differ |= natural[0] != natural[1]
        for g, w in zip(got, want):
            assert np.array_equal(np.concatenate(g), w)
            assert all(budget_cost([lengths[int(i)] for i in mb], "padded") <= 600 or len(mb) == 1 for mb in g)
    assert counts_differ  # the lockstep split was exercised


def test_token_budget_resume_continues_exactly():
    rng = np.random.default_rng(1)
    lengths = [(int(rng.integers(1, 20)), int(rng.integers(1, 100)), int(rng.integers(1, 100))) for _ in range(40)]
    (a,) = _budget_samplers(lengths, world=1, budget=300)
    straight = [a.next_step() for _ in range(12)]
    (b,) = _budget_samplers(lengths, world=1, budget=300)
    for _ in range(7):
        b.next_step()
    (c,) = _budget_samplers(lengths, world=1, budget=300)
    c.load_state_dict(b.state_dict())
    resumed = [c.next_step() for _ in range(5)]
    for x, y in zip(straight[7:], resumed):
        assert len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y))
