"""TIS-DPO token weights: the rank transform in closed form, and `midpo.stages.weights` end to end
against an independent per-sequence computation with two tiny contrastive models."""

from __future__ import annotations

import json

import numpy as np
import torch
from ref_helpers import make_model, make_run, naive_response_logps, run_stage  # noqa: E402

from midpo.core.token_weights import average_ranks, rank_weights, tis_scores


def test_rank_weights_closed_form():
    # body scores [3, -1, 2, 0.5] -> ranks [3, 0, 2, 1] -> 0.7 + 0.6 * r / 3; EOS weight 0
    w = rank_weights(np.array([3.0, -1.0, 2.0, 0.5, 9.9]))
    np.testing.assert_allclose(w, [1.3, 0.7, 1.1, 0.9, 0.0], atol=1e-6)
    np.testing.assert_allclose(average_ranks(np.array([1.0, 5.0, 1.0, 2.0])), [0.5, 3.0, 0.5, 2.0])
    # ties share their mean rank: body [4, 4, 1] -> ranks [1.5, 1.5, 0] -> 0.7 + 0.6 * r / 2
    np.testing.assert_allclose(rank_weights(np.array([4.0, 4.0, 1.0, -2.0])), [1.15, 1.15, 0.7, 0.0], atol=1e-6)
    np.testing.assert_allclose(rank_weights(np.array([0.3, -5.0])), [1.0, 0.0])  # one body token: midpoint
    np.testing.assert_allclose(rank_weights(np.array([-5.0])), [0.0])  # EOS only
    # rejected side: negated scores, so the token the reverse model prefers most gets the top weight
    np.testing.assert_allclose(tis_scores(np.array([-1.0, -2.0]), np.array([-3.0, -1.0]), "rejected"), [-2.0, 1.0])


def test_weights_stage_matches_independent_computation(tmp_path):
    recipe = make_run(tmp_path, n_train=7, n_eval=2)
    fwd, rev = make_model(tmp_path / "fwd", seed=11), make_model(tmp_path / "rev", seed=12)
    run_stage(recipe, 1, f"ref.weights_forward={fwd}", f"ref.weights_reverse={rev}", "ref.weights_min=0.5",
              module="midpo.stages.weights")
    out = tmp_path / "run" / "weights"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights_min"] == 0.5 and manifest["splits"]["train"]["rows"] == 7

    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (fwd, rev)]
    data = load_from_disk(str(tmp_path / "run" / "data" / "train"))
    cache = load_from_disk(str(out / "train"))
    assert cache["id"] == data["id"]
    n_distinct = 0
    for row, c in zip(data, cache, strict=True):
        for side in ("chosen", "rejected"):
            lp_f, lp_r = (naive_response_logps(m, row["prompt_ids"], row[f"{side}_ids"]) for m in models)
            s = lp_f - lp_r if side == "chosen" else lp_r - lp_f
            n = len(s) - 1  # EOS excluded from the ranking
            want = np.zeros(len(s))
            if n == 1:
                want[0] = 0.9
            elif n > 1:
                want[:n] = 0.5 + 0.8 * np.argsort(np.argsort(s[:n])) / (n - 1)
            np.testing.assert_allclose(c[f"{side}_weights"], want, atol=1e-6)
            n_distinct += len(set(np.round(want, 6)))
    assert n_distinct > 20  # weights actually vary
