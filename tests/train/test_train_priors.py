"""Training start-up checks and every cache-servable prior, in-process (one process, gloo).

Each prior's first logged loss (mean over the first global batch, policy == reference) must equal its
closed form computed here from the cached reference log-probs (tolerance 1e-5):
  dpo, dice, tisdpo: ln 2 (every reward is 0);
  centropy: softplus(-b (c - 1)(S_w - S_l));          S = cached sequence log-prob sum
  simpo:    softplus(-(b (S_w/|w| - S_l/|l|) - b * gamma_beta_ratio));
  rdpo:     softplus(-r (|w| - |l|)).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from train_helpers import (  # noqa: F401
    make_model,
    make_run,
    process_group,
    read_jsonl,
    recipe_text,
    reseal,
    rewrite_split,
)

from midpo.config import load_config

# one gloo group for all in-process runs (shared with test_train_online; `main` leaves a caller's group alone)
pytestmark = pytest.mark.usefixtures("process_group")


def _softplus(x):
    return np.logaddexp(0.0, x)




@pytest.fixture(scope="module")
def prior_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("priors")
    recipe = make_run(root / "base", n_train=16, n_eval=4, max_steps=3, save_every=0, eval_every=0, keep_last=1,
                      warmup_ratio=0.0)
    return {"root": root, "recipe": recipe, "run": root / "base" / "run", "model": root / "base" / "model"}


def _copy_run(prior_run: dict, name: str) -> tuple[Path, Path]:
    d = prior_run["root"] / name
    (d / "run").mkdir(parents=True)
    for sub in ("data", "ref"):
        shutil.copytree(prior_run["run"] / sub, d / "run" / sub)
    recipe = d / "recipe.yaml"
    recipe.write_text(recipe_text(d / "run", prior_run["model"], max_steps=3, save_every=0, eval_every=0,
                                  keep_last=1, warmup_ratio=0.0))
    return recipe, d / "run"


def _train(recipe: Path, *overrides: str, callbacks=()) -> dict:
    from midpo.stages.train import main

    return main(load_config(recipe, ["train.export_at_end=false", *overrides]), callbacks=callbacks)


def _first_batch(run: Path) -> list[dict]:
    """The cached rows of step 1's global batch (the sampler is deterministic)."""
    from datasets import load_from_disk

    from midpo.train.sampler import PairSampler

    data = load_from_disk(str(run / "data" / "train"))
    cache = load_from_disk(str(run / "ref" / "train"))
    s = PairSampler(len(data), micro_batch_size=2, grad_accum=2, world_size=1, rank=0, seed=0)
    idx = [int(i) for i in s.global_step_rows()]
    return [{**data[i], **cache[i]} for i in idx]


def _add_token_weights(run: Path, seed: int = 0) -> None:
    """A `midpo weights` output (its on-disk contract): weights in [0.7, 1.3], EOS 0, same rows as the data."""
    import json

    from datasets import Dataset, load_from_disk

    rng = np.random.default_rng(seed)
    manifest = json.loads((run / "ref" / "manifest.json").read_text())
    for split in ("train", "eval"):
        ref = load_from_disk(str(run / "ref" / split))
        cols = {"id": ref["id"], "tokens_hash": ref["tokens_hash"]}
        for side in ("chosen", "rejected"):
            cols[f"{side}_weights"] = [rng.uniform(0.7, 1.3, size=len(x)).astype(np.float32).tolist()[:-1] + [0.0]
                                       for x in ref[f"{side}_ref_logps"]]
        Dataset.from_dict(cols).save_to_disk(str(run / "weights" / split))
    (run / "weights" / "manifest.json").write_text(json.dumps({**manifest, "stage": "weights"}))
    for split in ("train", "eval"):
        reseal(run / "weights", split)  # its files' hashes, as the writer records them


def _expected(name: str, rows: list[dict], beta: float, opts: dict) -> float:
    Sw = np.array([sum(r["chosen_ref_logps"]) for r in rows])
    Sl = np.array([sum(r["rejected_ref_logps"]) for r in rows])
    nw = np.array([len(r["chosen_ids"]) for r in rows], dtype=float)
    nl = np.array([len(r["rejected_ids"]) for r in rows], dtype=float)
    if name in ("dpo", "dice", "tisdpo"):
        return math.log(2)
    if name == "centropy":
        return float(_softplus(-beta * (opts["c"] - 1) * (Sw - Sl)).mean())
    if name == "simpo":
        return float(_softplus(-(beta * (Sw / nw - Sl / nl) - beta * opts["gamma_beta_ratio"])).mean())
    if name == "rdpo":
        return float(_softplus(-opts["r"] * (nw - nl)).mean())
    raise AssertionError(name)


PRIOR_CASES = [
    ("dpo", 0.1, {}),
    ("dice", 0.1, {}),
    ("centropy", 0.1, {"c": 0.5}),
    ("simpo", 2.0, {"gamma_beta_ratio": 0.5}),
    ("rdpo", 0.1, {"r": 0.5}),
    ("tisdpo", 0.1, {}),
]


@pytest.mark.parametrize("name,beta,opts", PRIOR_CASES, ids=[c[0] for c in PRIOR_CASES])
def test_cache_servable_prior_starts_at_its_formula(prior_run, name, beta, opts):
    recipe, run = _copy_run(prior_run, name)
    if name == "tisdpo":
        _add_token_weights(run)
    overrides = [f"loss.prior={name}", f"loss.beta={beta}"] + [f"loss.options.{k}={v}" for k, v in opts.items()]
    summary = _train(recipe, *overrides)
    assert summary["step"] == 3 and summary["bad_steps_total"] == 0
    logged = [r["loss"] for r in read_jsonl(run / "logs" / "train_metrics.jsonl")]
    want = _expected(name, _first_batch(run), beta, opts)
    assert logged[0] == pytest.approx(want, abs=1e-5)
    assert all(np.isfinite(logged)) and abs(logged[-1] - logged[0]) > 1e-5  # it trains
    if name != "dpo":  # not trivially the same numbers as another prior
        assert (run / "checkpoints" / "latest").exists()


def test_tisdpo_without_weights_is_refused(prior_run):
    recipe, _ = _copy_run(prior_run, "tis_noweights")
    with pytest.raises(ValueError, match="token weights|token_weights"):
        _train(recipe, "loss.prior=tisdpo")


def test_cache_of_another_reference_is_refused(prior_run):
    from midpo.runtime.cache import CacheMismatchError

    recipe, _ = _copy_run(prior_run, "otherref")
    other = make_model(prior_run["root"] / "other_model", seed=7)
    with pytest.raises(CacheMismatchError, match="reference model fingerprint differs"):
        _train(recipe, f"model.reference={other}")


def test_data_of_another_tokenizer_is_refused(prior_run):
    from midpo.runtime.cache import CacheMismatchError

    recipe, _ = _copy_run(prior_run, "othertok")
    other = make_model(prior_run["root"] / "other_tok", seed=0, tokenizer_extra=5)
    with pytest.raises(CacheMismatchError, match="tokenizer"):
        _train(recipe, f"data.tokenizer={other}")


def test_probe_stops_a_cache_that_does_not_match_the_policy(prior_run):
    """Same fingerprints, wrong values (what a dtype/attention/template mismatch looks like): the probe stops it."""
    from midpo.stages.train import TrainError

    recipe, run = _copy_run(prior_run, "badvalues")

    def shift(rows):  # plausible values (finite, < 0, sums not used by the probe), hashes recorded anew
        for r in rows:
            r["chosen_ref_logps"] = [x - 0.05 for x in r["chosen_ref_logps"]]
            r["chosen_ref_logp_sum"] = float(np.sum(np.asarray(r["chosen_ref_logps"], np.float32), dtype=np.float64))
        return rows

    rewrite_split(run / "ref", "train", shift)
    with pytest.raises(TrainError, match="probe failed.*tokenizer.*dtype"):
        _train(recipe)


def test_nan_steps_are_skipped_counted_and_stop_the_run(prior_run):
    from faults import NanLoss

    from midpo.stages.train import TrainError

    recipe, run = _copy_run(prior_run, "nan")
    summary = _train(recipe, callbacks=[NanLoss({2})])
    assert summary["step"] == 3 and summary["bad_steps_total"] == 1
    rows = read_jsonl(run / "logs" / "consumed_rows.jsonl")
    assert [r["skipped"] for r in rows] == [False, True, False]
    logged = read_jsonl(run / "logs" / "train_metrics.jsonl")
    assert ["loss" in r for r in logged] == [True, False, True]  # the skipped step logs no loss, never NaN
    assert all(np.isfinite(r["loss"]) for r in logged if "loss" in r)

    recipe2, run2 = _copy_run(prior_run, "nan_stop")
    with pytest.raises(TrainError, match="2 consecutive non-finite"):
        _train(recipe2, "train.max_bad_steps=2", callbacks=[NanLoss({1, 2})])
    assert not (run2 / "checkpoints" / "latest").exists()


def test_relaunching_a_finished_run_keeps_its_checkpoint(prior_run):
    recipe, run = _copy_run(prior_run, "relaunch")
    _train(recipe)
    state = (run / "checkpoints" / "step-0000003" / "trainer_state.json").read_text()
    summary = _train(recipe)  # resumes at step 3 of 3: nothing to train, nothing rewritten
    assert summary["step"] == 3
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert (run / "checkpoints" / "step-0000003" / "trainer_state.json").read_text() == state
    assert len(read_jsonl(run / "logs" / "train_metrics.jsonl")) == 3


def test_learned_prior_trains_through_the_engine_hook(prior_run):
    """MI-DPO proper: the prior network (a copy of the reference, conditioned on the prompt) starts equal to
    the reference, so step 1's loss is ln 2; its own engine updates it; checkpoint and export include it."""
    recipe, run = _copy_run(prior_run, "learned")
    summary = _train(recipe, "loss.prior=learned", "prior_net.condition_on_prompt=true", "prior_net.lr=1e-3",
                     "train.export_at_end=true")
    assert summary["step"] == 3 and summary["bad_steps_total"] == 0
    logged = read_jsonl(run / "logs" / "train_metrics.jsonl")
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all("prior/kl_policy" in r and np.isfinite(r["prior/kl_policy"]) for r in logged)
    assert abs(logged[-1]["loss"] - logged[0]["loss"]) > 1e-5
    assert (run / "export" / "model.safetensors").exists() and (run / "export" / "prior").is_dir()
