"""LR schedule and the eval plan (pure functions)."""

from __future__ import annotations

import math

import pytest

from midpo.core.schedule import lr_multiplier, warmup_steps
from midpo.train.step import eval_plan


def test_warmup_then_cosine_to_zero():
    total, warm = 10, warmup_steps(10, 0.2)
    m = [lr_multiplier(s, total, warm, "cosine") for s in range(total + 1)]
    assert warm == 2 and m[0] == 0.5 and m[1] == 1.0 and m[2] == 1.0
    assert m[total] == pytest.approx(0.0, abs=1e-12)
    assert m[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(m[1:], m[2:]))


def test_linear_and_constant():
    assert lr_multiplier(5, 10, 0, "linear") == pytest.approx(0.5)
    assert lr_multiplier(7, 10, 0, "constant") == 1.0


@pytest.mark.parametrize("n,micro,world", [(10, 2, 2), (7, 3, 2), (1, 4, 2), (9, 2, 1)])
def test_eval_plan_covers_every_row_once_in_lockstep(n, micro, world):
    plans = [eval_plan(n, micro, world, r) for r in range(world)]
    assert len({len(p) for p in plans}) == 1  # same number of forwards on every rank
    real = [i for p in plans for idx, ok in p if ok for i in idx]
    assert sorted(real) == list(range(n))


def test_profile_window_parsing():
    from midpo.config import ConfigError, TrainConfig, check_step_window, load_config

    assert check_step_window([3, 7], "w") == (3, 7) and check_step_window([5, 5], "w") == (5, 5)
    assert TrainConfig().profile_steps == [] and load_config(None, ["train.profile_steps=[2,3]"]).train.profile_steps \
        == [2, 3]
    for bad in ([7, 3], [0, 2], [3], [1, 2, 3]):
        with pytest.raises(ValueError, match="train.profile_steps"):
            TrainConfig(profile_steps=bad)
        with pytest.raises(ConfigError, match="w"):
            check_step_window(bad, "w")
