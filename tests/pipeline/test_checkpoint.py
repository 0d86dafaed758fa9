"""Checkpoint helpers without DeepSpeed: RNG state round trip (weights_only load), `latest` handling."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.checkpoint import _prune, latest_checkpoint, rng_state, set_rng_state, step_dir_name


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "latest").write_text("step-0000005\n")
    with pytest.raises(RuntimeError, match="trainer_state.json is missing"):
        latest_checkpoint(tmp_path)
    (tmp_path / "step-0000005").mkdir()
    (tmp_path / "step-0000005" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-0000005"


def test_prune_keeps_the_last_k(tmp_path):
    for s in (1, 2, 3, 10):
        (tmp_path / step_dir_name(s)).mkdir()
    _prune(tmp_path, 2, keep=step_dir_name(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000003", "step-0000010"]
