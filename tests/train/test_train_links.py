"""The prior x link grid through the real trainer, in-process (one gloo process), from a top-k reference cache.

The policy starts from a perturbed copy of the reference (every weight + 5% noise), so step 1's log-ratios are
O(1) and every link's value is informative (with policy == reference most margins are 0); tdpo's from the
reference at temperature 10 (its final norm scaled by 0.1): the tiny reference is nearly one-hot per token, so a
nearby policy has a KL of ~1e-5, and a flatter one makes the KL term count (beta 0.01 keeps the margins O(1)).
Each case's first
logged loss (the mean over step 1's global batch: micro 2 x accum 2) must equal its formula, computed here from
the cached reference log-probs (and the cached top-k slice for tdpo) and the policy's own log-probs from a
plain single-sequence HF forward (no packing, no midpo code):

  lndpo x ipo (TRL's IPO)  (lr_w/|w| - lr_l/|l| - 1/(2b))^2
  simpo x hinge            max(0, delta - b (S_w/|w| - g/b - S_l/|l|))
  rdpo x robust            [(1-e) l(m) - e l(-m)] / (1 - 2e),  m = b (lr_w - lr_l) + r (|w| - |l|), e from
                           loss.label_smoothing (mapped to robust's eps)
  tdpo (top-k) x sigmoid   -log sig(b (lr_w + a KL_w - lr_l - a KL_l)),  KL = the top-k + tail KL(ref || policy)
                           (TDPO2's value; the stop-gradient on KL_w changes only the gradient)
  dpo x terms              1.0 sigmoid + 0.5 apo_zero + 0.25 nca_pair + 0.1 NLL; each loss/<link> logged
  dpo x bco_pair           -log sig(b lr_w - delta) - log sig(-(b lr_l - delta)), delta the running mean of the
                           rewards of the micro-batches so far (updated before each micro-batch's loss); resumed
                           from a checkpoint, it continues exactly
Tolerance: 2e-5 relative + 2e-5 absolute (fp32 sums of ~-300 per response against the float64 forward here).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import build_cache, make_model, make_rows, process_group, read_jsonl, recipe_text, write_data  # noqa: F401

from midpo.config import load_config

pytestmark = pytest.mark.usefixtures("process_group")

TOPK = 2
TRAIN = {"max_steps": 2, "save_every": 0, "eval_every": 0, "keep_last": 1, "warmup_ratio": 0.0}
TOL = {"rel": 2e-5, "abs": 2e-5}


def _recipe(run: Path, model: Path, **train) -> str:
    return recipe_text(run, model, **{**TRAIN, **train}).replace("ref:\n", f"ref:\n  topk: {TOPK}\n")


def _changed(base: Path, dst: Path, *, noise: float = 0.0, temperature: float = 1.0, seed: int = 1) -> Path:
    """The base model (same tokenizer files) with every weight + N(0, (noise * mean|w|)^2), its logits divided by
    `temperature` (the final norm's weight scaled)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(base, dst)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.abs().mean())
        model.model.norm.weight.div_(temperature)
    model.save_pretrained(str(dst), safe_serialization=True)
    return dst


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("links")
    from midpo.runtime.models import tokenizer_fingerprint

    base = make_model(root / "model")
    run = root / "base" / "run"
    write_data(run / "data", {"train": make_rows(16, 1), "eval": make_rows(4, 2)}, tokenizer_fingerprint(base))
    recipe = root / "base" / "recipe.yaml"
    recipe.write_text(_recipe(run, base))
    build_cache(recipe)  # the real reference stage: per-token log-probs + the top-k slice of the base model
    policy = _changed(base, root / "policy", noise=0.05)
    other = _changed(base, root / "other", temperature=10.0)
    return {"root": root, "run": run, "base": base, "policy": policy, "other": other,
            "moved": [f"model.policy={policy}", f"model.reference={base}"]}


def _copy_run(grid: dict, name: str, **train) -> tuple[Path, Path]:
    d = grid["root"] / name
    for sub in ("data", "ref"):
        shutil.copytree(grid["run"] / sub, d / "run" / sub)
    recipe = d / "recipe.yaml"
    recipe.write_text(_recipe(d / "run", grid["base"], **train))
    return recipe, d / "run"


def _train(grid: dict, recipe: Path, *overrides: str) -> dict:
    from midpo.stages.train import main

    return main(load_config(recipe, ["train.export_at_end=false", *grid["moved"], *overrides]))


def _logged(run: Path) -> list[dict]:
    return read_jsonl(run / "logs" / "train_metrics.jsonl")


_STEP1: dict = {}


def _step1(grid: dict, policy_key: str = "policy") -> list[dict]:
    """Step 1's global batch (the sampler is deterministic), each row with what the formulas read, float64:
    S/R = policy/reference sums, n = |y| (EOS included), kl = sum_t top-k KL(ref || policy), per side w/l."""
    if policy_key in _STEP1:
        return _STEP1[policy_key]
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from midpo.train.sampler import PairSampler

    run = grid["run"]
    data, cache = load_from_disk(str(run / "data" / "train")), load_from_disk(str(run / "ref" / "train"))
    s = PairSampler(len(data), micro_batch_size=2, grad_accum=2, world_size=1, rank=0, seed=0)
    policy = AutoModelForCausalLM.from_pretrained(str(grid[policy_key]), dtype=torch.float32).eval()
    rows = []
    for i in (int(i) for i in s.global_step_rows()):
        d, c, row = data[i], cache[i], {}
        for side, k in (("chosen", "w"), ("rejected", "l")):
            y, p = d[f"{side}_ids"], len(d["prompt_ids"])
            with torch.no_grad():
                logits = policy(input_ids=torch.tensor([d["prompt_ids"] + y]), use_cache=False).logits[0].double()
            lq = torch.log_softmax(logits[p - 1:-1], -1).numpy()  # (L, V) policy log-probs at y's positions
            row[f"S{k}"] = float(lq[np.arange(len(y)), y].sum())
            row[f"R{k}"] = float(np.sum(np.asarray(c[f"{side}_ref_logps"], np.float64)))
            row[f"n{k}"] = float(len(y))
            lp = np.asarray(c[f"{side}_ref_topk_logps"], np.float64)  # (L, k)
            ids = np.asarray(c[f"{side}_ref_topk_ids"])  # (L, k)
            tail = np.asarray(c[f"{side}_ref_tail_logmass"], np.float64)  # (L,)
            lq_top = np.take_along_axis(lq, ids, -1)
            q_tail = np.log1p(-np.exp(lq_top).sum(-1))
            row[f"kl{k}"] = float(((np.exp(lp) * (lp - lq_top)).sum(-1) + np.exp(tail) * (tail - q_tail)).sum())
        rows.append(row)
    _STEP1[policy_key] = rows
    return rows


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _cols(rows, *keys):
    return [np.array([r[k] for r in rows]) for k in keys]


CASES = {
    # case: (overrides, per-pair formula of step 1's rows)
    "lndpo_ipo": (["loss.prior=lndpo", "loss.link=ipo", "loss.beta=0.5"],
                  lambda r: ((r["Sw"] - r["Rw"]) / r["nw"] - (r["Sl"] - r["Rl"]) / r["nl"] - 1 / (2 * 0.5)) ** 2),
    "simpo_hinge": (["loss.prior=simpo", "loss.beta=2.0", "loss.link=hinge", "loss.link_options.delta=0.5"],
                    lambda r: max(0.0, 0.5 - 2.0 * (r["Sw"] / r["nw"] - 0.5 - r["Sl"] / r["nl"]))),
    "rdpo_robust": (["loss.prior=rdpo", "loss.options.r=0.05", "loss.link=robust", "loss.label_smoothing=0.1"],
                    lambda r: _robust(0.1 * (r["Sw"] - r["Rw"] - r["Sl"] + r["Rl"]) + 0.05 * (r["nw"] - r["nl"]),
                                      0.1)),
    "tdpo_topk_sigmoid": (["loss.prior=tdpo", "loss.beta=0.01"],
                          lambda r: -_logsig(0.01 * ((r["Sw"] - r["Rw"] + 0.5 * r["klw"])
                                                     - (r["Sl"] - r["Rl"] + 0.5 * r["kll"])))),
}


def _robust(m, eps):
    return ((1 - eps) * -_logsig(m) - eps * -_logsig(-m)) / (1 - 2 * eps)


@pytest.mark.parametrize("case", list(CASES))
def test_prior_x_link_starts_at_its_formula(grid, case):
    overrides, formula = CASES[case]
    key = "other" if case.startswith("tdpo") else "policy"
    recipe, run = _copy_run(grid, case)
    summary = _train(grid, recipe, *overrides, f"model.policy={grid[key]}")
    assert summary["step"] == 2 and summary["bad_steps_total"] == 0
    logged = [r["loss"] for r in _logged(run)]
    rows = _step1(grid, key)
    want = float(np.mean([formula(r) for r in rows]))
    print(f"{case}: step-1 loss {logged[0]:.7f}, formula {want:.7f}")
    assert logged[0] == pytest.approx(want, **TOL)
    assert np.all(np.isfinite(logged)) and abs(logged[1] - logged[0]) > 1e-6  # it trains
    if case == "tdpo_topk_sigmoid":  # the KL term matters at this tolerance: the top-k cache was read
        no_kl = float(np.mean([-_logsig(0.01 * (r["Sw"] - r["Rw"] - r["Sl"] + r["Rl"])) for r in rows]))
        assert abs(no_kl - want) > 100 * (TOL["abs"] + TOL["rel"] * abs(want)), (no_kl, want)


def test_weighted_terms_are_the_sum_and_each_is_logged(grid):
    recipe, run = _copy_run(grid, "terms")
    terms = "[{link: sigmoid, weight: 1.0}, {link: apo_zero, weight: 0.5}, {link: nca_pair, weight: 0.25}]"
    _train(grid, recipe, f"loss.terms={terms}", "loss.sft_weight=0.1")
    first = _logged(run)[0]
    b = 0.1
    Sw, Rw, Sl, Rl, nw = _cols(_step1(grid), "Sw", "Rw", "Sl", "Rl", "nw")
    rw, rl = b * (Sw - Rw), b * (Sl - Rl)  # TRL's rewards
    want = {"loss/sigmoid": -_logsig(rw - rl),
            "loss/apo_zero": 0.5 * ((1 - 1 / (1 + np.exp(-rw))) + 1 / (1 + np.exp(-rl))),
            "loss/nca_pair": 0.25 * (-_logsig(rw) - 0.5 * _logsig(-rw) - 0.5 * _logsig(-rl)),
            "loss/sft": 0.1 * -Sw / nw}
    for k, v in want.items():
        assert first[k] == pytest.approx(float(v.mean()), **TOL), k
    assert first["loss"] == pytest.approx(float(sum(v.mean() for v in want.values())), **TOL)
    assert first["loss"] == pytest.approx(sum(first[k] for k in want), rel=1e-9, abs=1e-9)  # the terms add up
    assert first["rewards/chosen"] == pytest.approx(float(rw.mean()), **TOL)  # TRL's metrics unchanged


def _bco_step1(rows: list[dict], beta: float = 0.1) -> tuple[float, float]:
    """(mean loss, mean delta) of step 1: micro-batch k (rows 2k, 2k+1) first folds its rewards into the running
    mean, then takes its loss with it."""
    total = count = 0.0
    losses, deltas = [], []
    for k in range(2):
        mb = rows[2 * k: 2 * k + 2]
        rw = np.array([beta * (r["Sw"] - r["Rw"]) for r in mb])
        rl = np.array([beta * (r["Sl"] - r["Rl"]) for r in mb])
        total, count = total + rw.sum() + rl.sum(), count + 2 * len(mb)
        delta = total / count
        losses += list(-_logsig(rw - delta) - _logsig(-(rl - delta)))
        deltas += [delta] * len(mb)
    return float(np.mean(losses)), float(np.mean(deltas))


def test_bco_pair_running_delta_starts_at_its_formula_and_resumes_exactly(grid):
    recipe, run = _copy_run(grid, "bco", max_steps=4, save_every=2, keep_last=3)
    _train(grid, recipe, "loss.link=bco_pair", "loss.beta=1.0")
    straight = _logged(run)
    loss1, delta1 = _bco_step1(_step1(grid), beta=1.0)
    assert abs(delta1) > 0.1  # the running mean is not trivially 0 here
    assert straight[0]["bco/delta"] == pytest.approx(delta1, **TOL)
    assert straight[0]["loss"] == pytest.approx(loss1, **TOL)
    with_zero = float(np.mean([-_logsig(r["Sw"] - r["Rw"]) - _logsig(-(r["Sl"] - r["Rl"])) for r in _step1(grid)]))
    assert abs(with_zero - loss1) > 100 * TOL["abs"]  # delta = 0 (TRL >= 0.29's bco_pair) would be told apart

    def links_state(r: Path, step: int) -> dict:
        return json.loads((r / "checkpoints" / f"step-{step:07d}" / "trainer_state.json").read_text())["links"]

    s2, s4 = links_state(run, 2), links_state(run, 4)
    assert s2["bco_reward_mean"]["count"] == 2 * 8 and s4["bco_reward_mean"]["count"] == 4 * 8  # eval folds none in

    # resume: the same run folder cut back to its step-2 checkpoint
    d = grid["root"] / "bco_resume"
    shutil.copytree(run.parent, d)
    run2 = d / "run"
    (d / "recipe.yaml").write_text(recipe.read_text().replace(str(run), str(run2)))
    shutil.rmtree(run2 / "checkpoints" / "step-0000004")
    (run2 / "checkpoints" / "latest").write_text("step-0000002\n")
    _train(grid, d / "recipe.yaml", "loss.link=bco_pair", "loss.beta=1.0")
    resumed = _logged(run2)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed[2:], straight[2:]):
        assert a["bco/delta"] == pytest.approx(b["bco/delta"], rel=1e-6, abs=1e-7)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
    r4 = links_state(run2, 4)["bco_reward_mean"]
    assert r4["count"] == s4["bco_reward_mean"]["count"]
    assert r4["total"] == pytest.approx(s4["bco_reward_mean"]["total"], rel=1e-6, abs=1e-6)


def test_bad_link_settings_are_refused_before_training(grid):
    from midpo.errors import ConfigError

    recipe, _ = _copy_run(grid, "refused")
    for overrides, match in (
        (["loss.link=kto"], r"loss.link: unknown link 'kto'; valid links: sigmoid, ipo, hinge"),
        (["loss.link=robust"], r"loss.link_options: link 'robust' needs eps"),
        (["loss.link=ipo", "loss.label_smoothing=0.1"], r"label_smoothing=0.1 is the label-noise rate"),
        (["loss.link=ipo", "loss.link_options.tau=0.1"], r"unknown parameters \['tau'\]; valid parameters: none"),
    ):
        with pytest.raises(ConfigError, match=match):
            _train(grid, recipe, *overrides)
        assert not (recipe.parent / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# the running mean itself (train.step.RewardMean): the mean of all rewards, all ranks, state exact through JSON


def test_reward_mean_is_the_mean_of_every_reward_and_round_trips_exactly():
    from midpo.train.step import RewardMean

    g = torch.Generator().manual_seed(0)
    m, seen = RewardMean(), []
    assert m.value == 0.0
    for n in (3, 5, 2):
        cw, rl = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
        got = m.observe(cw, rl)
        seen += cw.tolist() + rl.tolist()
        assert got == pytest.approx(float(np.mean(seen)), rel=1e-14)
    before = m.value
    m.observe(torch.tensor([float("nan")]), torch.tensor([1.0]))  # a non-finite batch is left out
    assert m.value == before and m.count == len(seen)
    again = RewardMean()
    again.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert again.value == m.value and again.state_dict() == m.state_dict()


def _two_ranks(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from midpo.train.step import RewardMean

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    m = RewardMean()
    vals = [m.observe(torch.full((2,), float(rank + 1)), torch.full((2,), 10.0 * (rank + 1)))]  # 2 pairs per rank
    vals.append(m.observe(torch.tensor([100.0 * (rank + 1)]), torch.tensor([0.0])))  # 1 pair per rank
    Path(out, f"rank{rank}.json").write_text(json.dumps(vals))
    dist.destroy_process_group()


def test_reward_mean_is_all_reduced_over_ranks(tmp_path):
    """Two gloo processes observe different rewards: both get the mean over both ranks' rewards."""
    import torch.multiprocessing as mp

    from midpo.runtime.dist import free_port

    mp.spawn(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    first = (2 * 1 + 2 * 10 + 2 * 2 + 2 * 20) / 8  # rank 0: chosen 1, rejected 10; rank 1: 2 and 20
    second = (first * 8 + 100 + 0 + 200 + 0) / 12
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == pytest.approx([first, second], rel=1e-15)
    assert math.isfinite(second)
