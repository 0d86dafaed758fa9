"""Stage 3 with the learned prior (`loss.prior=learned`, MI-DPO proper), in real subprocesses.

The prior network is the reference's first layer (prior_net.num_layers=1) on its own ZeRO-3 engine.
Acceptance, tolerances stated:
- 2 processes (micro 2 x accum 1) == 1 process (micro 2 x accum 2) over 5 steps: losses and every prior/*
  and mi/* metric within 1e-5, final policy and prior weights within 1e-5, the same rows per step.
  Small head chunks on both networks (train.head_chunk_tokens, prior_net.chunk_size) give the ranks different
  token counts per chunk: the runs only finish if every rank makes the same number of head calls.
- resume after SIGKILL (checkpoint at 3, step 4 run, kill, relaunch) == uninterrupted: losses and prior
  metrics within 1e-6, final policy AND prior weights within 1e-6.
- `midpo export` from the final checkpoint writes the policy and `<out>/prior`, equal to the run's export.
- the 2-process run's step-3 checkpoint resumed by 1 process (both engines through DeepSpeed's universal checkpoint)
  == the uninterrupted 1-process run: losses, prior metrics and both final weights within 1e-5.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import (
    REPO,
    clean_env,
    export_weights,
    make_run,
    read_jsonl,
    recipe_text,
    resume_copy,
    run_then_kill_after_step,
    run_train,
    train_cmd,
)

pytestmark = pytest.mark.distributed

STEPS = 5
LEARNED = ("loss.prior=learned", "prior_net.num_layers=1", "prior_net.lr=1e-2", "prior_net.chunk_size=8")
TRAIN = {"max_steps": STEPS, "save_every": 3, "eval_every": 0, "keep_last": 2}
PRIOR_METRICS = ("prior/kl_policy", "prior/nll", "prior/entropy", "mi/estimate", "prior/lr", "prior/loss")


def _metrics(run: Path) -> list[dict]:
    return read_jsonl(run / "logs" / "train_metrics.jsonl")


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("learned")
    recipe1 = make_run(root / "one", n_train=20, n_eval=4, **TRAIN)  # accum 2, 1 process
    run1 = root / "one" / "run"
    root2 = root / "two"
    (root2 / "run").mkdir(parents=True)
    for sub in ("data", "ref"):
        shutil.copytree(run1 / sub, root2 / "run" / sub)
    recipe2 = root2 / "recipe.yaml"
    recipe2.write_text(recipe_text(root2 / "run", root / "one" / "model", grad_accum=1, **TRAIN))
    run_train(recipe1, 1, *LEARNED, "train.head_chunk_tokens=8")
    run_train(recipe2, 2, *LEARNED, "train.head_chunk_tokens=8")
    return {"root": root, "recipe1": recipe1, "run1": run1, "recipe2": recipe2, "run2": root2 / "run",
            "model": root / "one" / "model"}


def _close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def test_learned_prior_two_processes_match_one(learned):
    m1, m2 = _metrics(learned["run1"]), _metrics(learned["run2"])
    assert len(m1) == len(m2) == STEPS
    l1 = np.array([r["loss"] for r in m1])
    assert np.ptp(l1) > 1e-3, "the losses must move, or the comparison proves nothing"
    np.testing.assert_allclose([r["loss"] for r in m2], l1, atol=1e-5, rtol=0)
    for name in PRIOR_METRICS:
        a, b = [r[name] for r in m1], [r[name] for r in m2]
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0, err_msg=name)
    kl = [r["prior/kl_policy"] for r in m1]
    assert max(kl) - min(kl) > 1e-4  # the prior's objective moves too
    _close(export_weights(learned["run2"] / "export"), export_weights(learned["run1"] / "export"), 1e-5)
    p1, p2 = export_weights(learned["run1"] / "export" / "prior"), export_weights(learned["run2"] / "export" / "prior")
    assert p1 and any(".layers.0." in k for k in p1) and not any(".layers.1." in k for k in p1)  # 1 layer
    _close(p2, p1, 1e-5)
    r1 = read_jsonl(learned["run1"] / "logs" / "consumed_rows.jsonl")
    r2 = read_jsonl(learned["run2"] / "logs" / "consumed_rows.jsonl")
    assert [r["ids"] for r in r1] == [r["ids"] for r in r2]


def test_learned_prior_resume_after_sigkill_matches_uninterrupted(learned):
    d = learned["root"] / "resume"
    (d / "run").mkdir(parents=True)
    for sub in ("data", "ref"):
        shutil.copytree(learned["run1"] / sub, d / "run" / sub)
    recipe, run = d / "recipe.yaml", d / "run"
    recipe.write_text(recipe_text(run, learned["model"], **TRAIN))  # accum 2, 1 process: as run1
    run_then_kill_after_step(train_cmd(recipe, 1, *LEARNED, "train.head_chunk_tokens=8",
                                       faults=("--pause-after-step", "4")), clean_env(), run, 4)
    ckpt = run / "checkpoints" / "step-0000003"
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert (ckpt / "prior").is_dir() and not (run / "export").exists()

    run_train(recipe, 1, *LEARNED, "train.head_chunk_tokens=8")
    m, base = _metrics(run), _metrics(learned["run1"])
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    for name in ("loss", *PRIOR_METRICS):
        np.testing.assert_allclose([r[name] for r in m], [r[name] for r in base], atol=1e-6, rtol=0, err_msg=name)
    _close(export_weights(run / "export"), export_weights(learned["run1"] / "export"), 1e-6)
    _close(export_weights(run / "export" / "prior"), export_weights(learned["run1"] / "export" / "prior"), 1e-6)


def test_learned_prior_resume_on_another_process_count(learned):
    """The policy's and the prior engine's ZeRO-3 partitions of 2 processes, resumed by 1 (global batch 4 kept:
    accum 1 -> 2): both are converted to universal checkpoints and loaded; the run then equals the uninterrupted
    1-process run within 1e-5 (the bound of 2 vs 1 processes: reduction order), rows included."""
    from midpo.runtime.files import written_by_midpo

    recipe, run = resume_copy(learned["run2"], 3, learned["root"] / "reshard", learned["model"], **TRAIN)
    run_train(recipe, 1, *LEARNED, "train.head_chunk_tokens=8")
    ckpt = run / "checkpoints" / "step-0000003"
    assert written_by_midpo(ckpt / "universal") and written_by_midpo(ckpt / "prior" / "universal")
    m, base = _metrics(run), _metrics(learned["run1"])
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    for name in ("loss", *PRIOR_METRICS):
        np.testing.assert_allclose([r[name] for r in m], [r[name] for r in base], atol=1e-5, rtol=0, err_msg=name)
    _close(export_weights(run / "export"), export_weights(learned["run1"] / "export"), 1e-5)
    _close(export_weights(run / "export" / "prior"), export_weights(learned["run1"] / "export" / "prior"), 1e-5)
    assert [r["ids"] for r in read_jsonl(run / "logs" / "consumed_rows.jsonl")] == \
        [r["ids"] for r in read_jsonl(learned["run1"] / "logs" / "consumed_rows.jsonl")]


def test_midpo_export_writes_policy_and_prior(learned):
    """`midpo export` (offline, from the latest checkpoint) replaces <out> as a whole: it must write the prior
    again from ckpt/prior, after the policy, or the run's prior export is gone."""
    run = learned["run1"]
    proc = subprocess.run([sys.executable, "-m", "midpo.cli", "export", "--config", str(learned["recipe1"])],
                          env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "export" / "prior" / "config.json").exists()
    # the step-5 checkpoint holds the final weights: equal to the end-of-run export that was replaced
    _close(export_weights(run / "export"), export_weights(learned["run2"] / "export"), 1e-5)
    _close(export_weights(run / "export" / "prior"), export_weights(learned["run2"] / "export" / "prior"), 1e-5)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(run / "export" / "prior"))
    assert m.config.num_hidden_layers == 1
