"""train.online_reference=true: the frozen reference on its own ZeRO-3 inference engine beside the policy.

In-process (one gloo process), the tiny Llama of tests/support/train_helpers.py, 3 steps each. Tolerances stated:
- dpo: cached == online reference (the same forward function serves both): every logged loss within 1e-5
  (policy == reference at step 0, then both runs train identically);
- tdpo trains with the online reference (full-vocab reference logits); its first loss is ln 2 (policy ==
  reference: every KL and log-ratio is 0), later losses move;
- tdpo from the top-k cache (ref.topk=K) vs online: step 1 is ln 2 for both (exact); step 2's loss (after one
  identical DPO-like step, policy != reference) differs by at most the measured approximation bound:
  |delta loss| <= beta * alpha * max_pair |KL_full - KL_topk| summed over the response ... measured here
  directly from the two runs' logged `loss` and bounded by TOPK_LOSS_ATOL (see the test);
- sparsepo trains with the online reference; its mask network's parameters are in the policy engine
  (they change, they are checkpointed, and a resume from the checkpoint restores them).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from train_helpers import build_cache, make_run, process_group, read_jsonl, recipe_text  # noqa: F401

from midpo.config import load_config

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("process_group")]




TRAIN = {"max_steps": 3, "save_every": 0, "eval_every": 0, "keep_last": 1, "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def online_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("online")
    recipe = make_run(root / "base", n_train=16, n_eval=4, **TRAIN)
    return {"root": root, "recipe": recipe, "run": root / "base" / "run", "model": root / "base" / "model"}


def _copy_run(base: dict, name: str, *, cache: bool = True, **train) -> tuple[Path, Path]:
    d = base["root"] / name
    (d / "run").mkdir(parents=True)
    for sub in ("data", "ref") if cache else ("data",):
        shutil.copytree(base["run"] / sub, d / "run" / sub)
    recipe = d / "recipe.yaml"
    recipe.write_text(recipe_text(d / "run", base["model"], **{**TRAIN, **train}))
    return recipe, d / "run"


def _train(recipe: Path, *overrides: str) -> dict:
    from midpo.stages.train import main

    return main(load_config(recipe, ["train.export_at_end=false", *overrides]))


def _losses(run: Path) -> np.ndarray:
    return np.array([r["loss"] for r in read_jsonl(run / "logs" / "train_metrics.jsonl")])


def test_dpo_cached_equals_online(online_run):
    cached, run_c = _copy_run(online_run, "dpo_cached")
    online, run_o = _copy_run(online_run, "dpo_online", cache=False)  # no ref/ folder at all
    _train(cached)
    _train(online, "train.online_reference=true")
    lc, lo = _losses(run_c), _losses(run_o)
    assert lc[0] == pytest.approx(math.log(2), abs=1e-6)
    assert np.ptp(lc) > 1e-4  # the runs move, so equality is not trivial
    np.testing.assert_allclose(lo, lc, atol=1e-5, rtol=0)


def _first_batch_rows(run: Path) -> list[dict]:
    """Step 1's global batch (micro 2 x accum 2, one process; the sampler is deterministic)."""
    from datasets import load_from_disk

    from midpo.train.sampler import PairSampler

    data = load_from_disk(str(run / "data" / "train"))
    s = PairSampler(len(data), micro_batch_size=2, grad_accum=2, world_size=1, rank=0, seed=0)
    return [data[int(i)] for i in s.global_step_rows()]


def _kl_gap(policy_dir: Path, ref_dir: Path, rows: list[dict], k: int) -> np.ndarray:
    """Per pair: (KL_full - KL_topk)(chosen) + (same)(rejected), KL = sum_t KL_t(ref || policy), computed here
    from the two models directly (not from the trainer). >= 0: the top-k + tail KL is a lower bound."""
    import torch
    from transformers import AutoModelForCausalLM

    from midpo.core.batching import collate_pairs
    from midpo.core.logprobs import per_token_kl, per_token_kl_topk, response_logps, topk_logprobs

    batch = collate_pairs(rows, layout="packed", pad_id=0)
    with torch.no_grad():
        outs = [response_logps(AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval(), batch,
                               return_logits=True) for d in (policy_dir, ref_dir)]
    gap = 0.0
    for side in ("chosen", "rejected"):
        pol, ref = (getattr(o, f"{side}_logits") for o in outs)
        mask = getattr(outs[0], f"{side}_mask")
        full = (per_token_kl(ref, pol) * mask).sum(-1)
        topk = (per_token_kl_topk(*topk_logprobs(ref, k), pol) * mask).sum(-1)
        gap = gap + (full - topk).double().numpy()
    return gap


def test_tdpo_online_trains_and_topk_cache_matches_within_its_bound(online_run):
    """The policy starts from ANOTHER model than the reference, so step 1 already has KL > 0.

    Bound: TDPO2's margin is b [(lr_w - lr_l) - a (KL_w - KL_l)] (no stop-gradient in the value), so swapping
    the full KL for the top-k one moves each pair's margin by at most b a (gap_w + gap_l), gap = KL_full -
    KL_topk >= 0, and softplus is 1-Lipschitz: |loss_topk - loss_online| <= b a mean_pairs(gap_w + gap_l), the
    gap measured here from the two models on step 1's rows (+ 1e-7 for fp32 sums)."""
    from train_helpers import make_model

    policy = make_model(online_run["root"] / "moved_policy", seed=3)
    ref_model = online_run["model"]
    moved = [f"model.policy={policy}", f"model.reference={ref_model}", "loss.prior=tdpo"]

    recipe, run = _copy_run(online_run, "tdpo_online", cache=False)
    summary = _train(recipe, "train.online_reference=true", *moved)
    assert summary["step"] == 3 and summary["bad_steps_total"] == 0
    lo = _losses(run)
    assert np.all(np.isfinite(lo)) and abs(lo[-1] - lo[0]) > 1e-5  # it trains

    # without a full-vocab source tdpo is refused, naming both ways out
    recipe_seq, _ = _copy_run(online_run, "tdpo_seqcache")
    with pytest.raises(ValueError, match="online_reference=true.*ref.topk"):
        _train(recipe_seq, "loss.prior=tdpo")

    # the top-k cache (K of V=128 tokens + tail mass) of the same reference
    d = online_run["root"] / "tdpo_topk"
    (d / "run").mkdir(parents=True)
    shutil.copytree(online_run["run"] / "data", d / "run" / "data")
    text = recipe_text(d / "run", online_run["model"], **TRAIN).replace("ref:\n", f"ref:\n  topk: {TOPK}\n")
    (d / "recipe.yaml").write_text(text)
    build_cache(d / "recipe.yaml", *moved)  # the run's stages agree on its models (runtime.layout)
    _train(d / "recipe.yaml", *moved)
    lk = _losses(d / "run")

    gap = _kl_gap(policy, ref_model, _first_batch_rows(run), TOPK)
    assert gap.min() >= -1e-5 and gap.max() > 1e-6, gap  # a lower bound, and not exact at this K
    beta, alpha = 0.1, 0.5  # recipe beta; TDPO's default alpha
    bound = beta * alpha * float(gap.mean()) + 1e-7
    print(f"tdpo step-1 loss: online {lo[0]:.7f}, top-{TOPK} cache {lk[0]:.7f}, |diff| {abs(lk[0] - lo[0]):.3g}, "
          f"bound {bound:.3g} (mean per-pair KL gap {gap.mean():.3g})")
    assert abs(lk[0] - lo[0]) <= bound
    assert abs(lk[0] - lo[0]) > 0  # the approximation is real here; equality would mean the cache was not used


TOPK = 2  # small K: a gap well above float noise (the tiny reference is peaked: its head is scaled 20x)


def _ckpt_prior(run: Path, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)
    return {k: v.detach() for k, v in sd.items() if k.startswith("prior.")}


def test_sparsepo_online_trains_its_mask_network_and_resumes_it(online_run):
    """SparsePO needs the reference's full-vocab logits and hidden states (online only). Its mask network rides
    in the policy engine: optimized (its weights change), checkpointed (`prior.*` keys), restored on resume:
    a relaunch from the step-2 checkpoint reproduces steps 3-4 (losses 1e-6) and the final mask weights (1e-6)."""
    recipe, run = _copy_run(online_run, "sparsepo", cache=False, max_steps=4, save_every=2, keep_last=3)
    over = ("train.online_reference=true", "loss.prior=sparsepo", "loss.options.l1_norm_param_u=0.01")
    summary = _train(recipe, *over)
    assert summary["step"] == 4 and summary["bad_steps_total"] == 0
    straight = _losses(run)
    assert np.all(np.isfinite(straight)) and np.ptp(straight) > 1e-5
    p2, p4 = _ckpt_prior(run, "step-0000002"), _ckpt_prior(run, "step-0000004")
    assert {"prior.mask_u.weight", "prior.mask_u.mixer"} <= set(p2)
    assert max(float((p4[k] - p2[k]).abs().max()) for k in p2) > 1e-6, "the mask network is not optimized"

    # resume: the same run folder cut back to its step-2 checkpoint
    d = online_run["root"] / "sparsepo_resume"
    shutil.copytree(run.parent, d)
    run2 = d / "run"
    recipe2 = d / "recipe.yaml"
    recipe2.write_text(recipe.read_text().replace(str(run), str(run2)))
    shutil.rmtree(run2 / "checkpoints" / "step-0000004")
    (run2 / "checkpoints" / "latest").write_text("step-0000002\n")
    _train(recipe2, *over)
    np.testing.assert_allclose(_losses(run2), straight, atol=1e-6, rtol=0)
    r4 = _ckpt_prior(run2, "step-0000004")
    for k in p4:
        assert float((r4[k] - p4[k]).abs().max()) <= 1e-6, k


def test_online_reference_serves_what_no_cache_can(online_run):
    from midpo.core.priors import check_needs
    from midpo.runtime.cache import PairSplit
    from midpo.train.trainer import available_inputs

    split = PairSplit("train", data=None, cache=None)
    check_needs("sparsepo", available_inputs(split, online_reference=True))
    check_needs("tdpo", available_inputs(split, online_reference=True))
    with pytest.raises(ValueError, match="hidden states"):
        check_needs("sparsepo", available_inputs(split))
