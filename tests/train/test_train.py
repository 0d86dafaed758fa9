"""Stage 3 (`midpo train`) end to end on a tiny Llama (tied embeddings), in real subprocesses.

Acceptance, with tolerances stated:
- ZeRO-3 on 2 processes == 1 process (same global batch 4: micro 2 x accum 2 x 1 vs micro 2 x accum 1 x 2)
  over 6 steps: losses within 1e-5 absolute, exported weights within 1e-5, the same row ids per step.
- packed == padded: losses within 1e-5.
- resume: 6 steps straight vs (checkpoint at 3, step 4 run, SIGKILL, resume): losses within 1e-6, final weights
  within 1e-6, and the recorded row ids equal step by step (no row skipped or repeated).
- export reloads with AutoModelForCausalLM and equals DeepSpeed's own merge of the final ZeRO-3 checkpoint;
  `midpo export` from a checkpoint gives the same weights; TensorBoard holds the listed tags.
- a checkpoint of the 2-process run resumed by 1 process (universal checkpoint): losses and weights within 1e-5 of
  the uninterrupted 1-process run, the same rows; a crafted checkpoint file is refused by export and resume; a
  finished run relaunched does nothing, with a changed config is refused, and with --force starts over.
- sequence parallelism (train.sequence_parallel=2): on 2 processes the per-token log-probs, gradients and the
  `midpo ref` cache equal one process's (tests/support/sp_check.py), and 6 training steps equal the 1-process run
  (losses and exported weights within 1e-5, grad norms within 1e-5 relative, the same rows); on 4 processes
  (k=2 x DP 2) they equal the 2-process ZeRO-3 run.
The runs share one module-scoped fixture (the 6-step straight runs) to keep the file under a few minutes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import (
    clean_env,
    export_weights,
    fresh_copy,
    losses,
    make_run,
    read_jsonl,
    recipe_text,
    resume_copy,
    run_midpo,
    run_then_kill_after_step,
    run_train,
    train_cmd,
    write_code_running_pickle,
)

pytestmark = pytest.mark.distributed

LOSS_ATOL_DIST = 1e-5  # 1 vs 2 processes: only the gradient reduction order differs
LOSS_ATOL_RESUME = 1e-6  # same world size, same reduction order: resumed == uninterrupted


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """One run folder (model, data, cache) and the 6-step straight runs: 1 process (accum 2) and 2 processes."""
    root = tmp_path_factory.mktemp("train")
    recipe1 = make_run(root / "one")  # accum 2, 1 process
    run1 = root / "one" / "run"
    # The 2-process run reads the same data/cache through its own run folder.
    root2 = root / "two"
    (root2 / "run").mkdir(parents=True)
    for sub in ("data", "ref"):
        shutil.copytree(run1 / sub, root2 / "run" / sub)
    recipe2 = root2 / "recipe.yaml"
    recipe2.write_text(recipe_text(root2 / "run", root / "one" / "model", grad_accum=1))
    log1 = run_train(recipe1, 1).stderr
    # Small output-head chunks: ranks get different token counts per micro-batch, so this run only
    # finishes if every rank still makes the same number of head calls (ZeRO-3 collectives).
    log2 = run_train(recipe2, 2, "train.head_chunk_tokens=24").stderr
    return {"root": root, "recipe1": recipe1, "run1": run1, "recipe2": recipe2, "run2": root2 / "run",
            "model": root / "one" / "model", "logs": (log1, log2)}


def _fresh_run(base: dict, name: str, **train) -> tuple[Path, Path]:
    return fresh_copy(base["run1"], base["root"] / name, lambda run: recipe_text(run, base["model"], **train))


def _assert_cli_export_equals(recipe: Path, out: Path, expected: Path) -> None:
    """`midpo export` (offline, one process, from the run's latest checkpoint) into `out` writes exactly the
    weights of the HF folder `expected`."""
    proc = run_midpo("export", "--config", str(recipe), "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = export_weights(out), export_weights(expected)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_two_processes_match_one(base):
    l1, l2 = losses(base["run1"]), losses(base["run2"])
    assert len(l1) == len(l2) == 6
    assert l1[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert np.ptp(l1) > 1e-3, "the losses must move, or the comparison proves nothing"
    np.testing.assert_allclose(l2, l1, atol=LOSS_ATOL_DIST, rtol=0)
    w1, w2 = export_weights(base["run1"] / "export"), export_weights(base["run2"] / "export")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0)
    r1 = read_jsonl(base["run1"] / "logs" / "consumed_rows.jsonl")
    r2 = read_jsonl(base["run2"] / "logs" / "consumed_rows.jsonl")
    assert [r["ids"] for r in r1] == [r["ids"] for r in r2]
    ids = [i for r in r1 for i in r["ids"]]
    assert len(ids) == len(set(ids)) == 24  # one epoch of 24 rows, global batch 4: every row once


def test_packed_equals_padded(base):
    recipe, run = _fresh_run(base, "padded", packing="false", save_every=0, eval_every=0)
    run_train(recipe, 1, "train.export_at_end=false")
    np.testing.assert_allclose(losses(run), losses(base["run1"]), atol=1e-5, rtol=0)
    pad = [r["padding_fraction"] for r in read_jsonl(run / "logs" / "train_metrics.jsonl")]
    packed = [r["padding_fraction"] for r in read_jsonl(base["run1"] / "logs" / "train_metrics.jsonl")]
    assert min(pad) > 0 and max(packed) == 0  # the two layouts really differ


def test_shared_prompt_equals_packed(base):
    """train.share_prompt (one row per pair, the prompt once): the same losses as the packed run, with the
    start-of-run probe against the cache (computed packed) passing, and fewer tokens through the forward."""
    recipe, run = _fresh_run(base, "shared", share_prompt="true", save_every=0, eval_every=0)
    proc = run_train(recipe, 1, "train.export_at_end=false")
    assert "layout shared" in proc.stderr and "probe passed" in proc.stderr
    np.testing.assert_allclose(losses(run), losses(base["run1"]), atol=1e-5, rtol=0)
    def tokens_per_pair(r):
        return np.mean([x["tokens_per_s"] / x["pairs_per_s"] for x in read_jsonl(r / "logs" / "train_metrics.jsonl")])

    assert tokens_per_pair(run) < 0.9 * tokens_per_pair(base["run1"])  # prompts are 3-12 of ~20 tokens per side


def test_auto_defaults_are_chosen_recorded_and_resume_the_same(base):
    """train.ds_config / train.layout left at auto: on CPU, sdpa, a 1-process run of a tiny model, the plan picks
    stage 0 (it fits) and the shared layout; the log and <run_dir>/config.yaml say so with the reason, the losses
    equal the ZeRO-3 packed run's (same math), and a relaunch on 2 processes resolves the same and is accepted by the
    resume check (a finished run: nothing to do; a different resolution is refused: tests/runtime/test_checkpoint.py)."""
    import yaml

    recipe, run = _fresh_run(base, "auto", ds_config=None, packing=None, eval_every=0)
    log = run_train(recipe, 1, "train.export_at_end=false").stderr
    assert re.search(r"auto: train.ds_config=zero0_cpu_fp32 \(stage 0: predicted [\d.]+ GiB per device fits", log)
    assert "auto: train.layout=shared (attention sdpa" in log
    np.testing.assert_allclose(losses(run), losses(base["run1"]), atol=1e-5, rtol=0)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["train"]["ds_config"], saved["train"]["layout"]) == ("zero0_cpu_fp32", "shared")
    assert saved["auto"]["train.ds_config"]["value"] == "zero0_cpu_fp32" and "fits" in saved["auto"]["train.ds_config"]["reason"]
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["train"]["ds_config"] == "zero0_cpu_fp32"
    # relaunched on 2 processes (same global batch): auto resolves on every rank (free memory gathered, rank 0's
    # choice broadcast) to the same values, which the resume check accepts; the finished run has nothing to do
    again = run_train(recipe, 2, "train.grad_accum=1", "train.export_at_end=false").stderr
    assert "auto: train.ds_config=zero0_cpu_fp32" in again and "processes: 1 -> 2" in again
    assert len(losses(run)) == 6


def test_compiled_equals_eager(base):
    """train.compile (torch.compile of the decoder, Inductor) with ZeRO-2 and the shared-prompt layout: the same
    losses and exported weights as the eager ZeRO-3 packed run (Inductor fuses and reorders fp32 ops: 1e-5),
    and the log proves Dynamo compiled graphs (a silently eager run would pass the comparison too). The run also
    records a train.profile_steps window (it must not change the numbers)."""
    recipe, run = _fresh_run(base, "compiled", share_prompt="true", ds_config="zero2_cpu_fp32", compile="true",
                             save_every=0, eval_every=0)
    proc = run_train(recipe, 1, "train.profile_steps=[2,3]", timeout=600)
    prof = (run / "logs" / "profile_rank0.txt").read_text()  # the opt-in profiler window (midpo.runtime.profiling)
    assert prof.startswith("steps 2-3 (2 steps)") and "aten::mm" in prof and (run / "logs" / "profile_rank0.json").exists()
    m = re.search(r"torch.compile: (\d+) graphs, (\d+) graph breaks", proc.stderr)
    assert m and int(m.group(1)) >= 1, proc.stderr[-3000:]
    np.testing.assert_allclose(losses(run), losses(base["run1"]), atol=1e-5, rtol=0)
    a, b = export_weights(run / "export"), export_weights(base["run1"] / "export")
    assert a.keys() == b.keys()  # nn.Module.compile keeps the state-dict keys (no `_orig_mod.`)
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_resume_after_sigkill_matches_uninterrupted(base):
    recipe, run = _fresh_run(base, "resume", grad_accum=1)
    rows_file = run / "logs" / "consumed_rows.jsonl"
    run_then_kill_after_step(train_cmd(recipe, 2, faults=("--pause-after-step", "4")), clean_env(), run, 4)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert not (run / "export").exists()
    assert len(read_jsonl(rows_file)) == 4  # step 4 ran but was never checkpointed

    run_train(recipe, 2)
    np.testing.assert_allclose(losses(run), losses(base["run2"]), atol=LOSS_ATOL_RESUME, rtol=0)
    a, b = export_weights(run / "export"), export_weights(base["run2"] / "export")
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert [r["ids"] for r in read_jsonl(rows_file)] == \
        [r["ids"] for r in read_jsonl(base["run2"] / "logs" / "consumed_rows.jsonl")]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-0000003", "step-0000006"]  # keep_last 2


@pytest.mark.parametrize("ds_config", ["zero2_cpu_fp32", "zero0_cpu_fp32"])
def test_zero2_and_zero0_match_zero3_through_a_sigkill_resume(base, ds_config):
    """ds_config zero2_cpu_fp32 / zero0_cpu_fp32 (the one-device picks: ZeRO-3 partitions nothing there and pays
    its gathers; stage 0 also skips ZeRO-2's flat gradient buffer copies) on 2 processes, killed after step 4 and
    resumed from step 3: same losses, weights and rows as ZeRO-3 straight. Both keep whole parameters on every
    rank; only the gradient reduction (reduce-scatter / all-reduce) and the optimizer state layout differ."""
    recipe, run = _fresh_run(base, ds_config, grad_accum=1, ds_config=ds_config)
    run_then_kill_after_step(train_cmd(recipe, 2, faults=("--pause-after-step", "4")), clean_env(), run, 4)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    proc = run_train(recipe, 2)
    assert "ZeRO stage" not in proc.stderr  # no "untested stage" warning
    # one whole-model file (ZeRO-3: model states per rank); ZeRO-2 adds optimizer state per rank, stage 0 keeps
    # it in the model file
    ckpt = run / "checkpoints" / "step-0000006"
    assert (ckpt / "mp_rank_00_model_states.pt").exists() and not list(ckpt.glob("zero_pp_rank_*_model_states.pt"))
    assert bool(list(ckpt.glob("*optim_states.pt"))) == (ds_config == "zero2_cpu_fp32")
    # `midpo export` from this checkpoint layout (offline, one process) writes the run's own export
    _assert_cli_export_equals(recipe, run / "export_cli", run / "export")
    np.testing.assert_allclose(losses(run), losses(base["run2"]), atol=LOSS_ATOL_DIST, rtol=0)
    # the logged gradient norm (stage 0: computed by midpo, DeepSpeed's fp32 path does not keep it); above
    # train.max_grad_norm=1 in these runs, so clipping was active in both and the equal losses cover it too
    norms = [[r["grad_norm"] for r in read_jsonl(x / "logs" / "train_metrics.jsonl")] for x in (run, base["run2"])]
    assert min(norms[1]) > 1.0
    np.testing.assert_allclose(norms[0], norms[1], rtol=1e-4)
    a, b = export_weights(run / "export"), export_weights(base["run2"] / "export")
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert [r["ids"] for r in read_jsonl(run / "logs" / "consumed_rows.jsonl")] == \
        [r["ids"] for r in read_jsonl(base["run2"] / "logs" / "consumed_rows.jsonl")]


def _folder_state(path: Path) -> dict:
    """The folder's identity (inode, mtime) and every file's bytes and mtime."""
    st = path.stat()
    return {".": (st.st_ino, st.st_mtime_ns), **{str(f.relative_to(path)): (f.read_bytes(), f.stat().st_mtime_ns)
                                                  for f in sorted(path.rglob("*")) if f.is_file()}}


def test_export_of_a_copied_run_writes_into_the_copy(base, tmp_path):
    """A finished run folder copied elsewhere and exported with a recipe whose run_dir is the copy: the export is
    written into the copy, and the original's export folder is untouched (same inode, files, bytes, mtimes),
    although the checkpoint's saved config still names the original run_dir (it only names the model)."""
    a = base["run1"]
    copy = tmp_path / "run"
    shutil.copytree(a, copy)
    shutil.rmtree(copy / "export")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(copy, base["model"]))
    before = _folder_state(a / "export")
    proc = run_midpo("export", "--config", str(recipe), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _folder_state(a / "export") == before
    assert f"-> {copy / 'export'}" in proc.stdout
    got, want = export_weights(copy / "export"), export_weights(a / "export")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)


def test_export_reloads_and_equals_zero3_weights(base):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = base["run1"]
    model = AutoModelForCausalLM.from_pretrained(str(run / "export"), use_safetensors=True)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    merged = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step-0000006")
    merged = {k.removeprefix("model."): v for k, v in merged.items()}  # engine.PolicyLogps wraps the HF model
    got = model.state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(got[k], v, atol=0, rtol=0)
    assert AutoTokenizer.from_pretrained(str(run / "export")).eos_token_id == 2
    assert (run / "export" / "generation_config.json").exists()

    # `midpo export` from the checkpoint (offline, one process) writes the same weights.
    _assert_cli_export_equals(base["recipe1"], base["root"] / "export_cli", run / "export")


def test_tensorboard_has_the_tags(base):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from midpo.train.trainer import TRAIN_TAGS

    acc = EventAccumulator(str(base["run1"] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for t in TRAIN_TAGS:
        assert f"train/{t}" in tags
        assert len(acc.Scalars(f"train/{t}")) == 6
    for t in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert [e.step for e in acc.Scalars(f"eval/{t}")] == [3, 6]
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert max(lr) == pytest.approx(1e-3) and lr[-1] < lr[2]  # warmup then cosine decay
    acc_vals = [e.value for e in acc.Scalars("train/rewards/accuracies")]
    assert all(0.0 <= v <= 1.0 for v in acc_vals)


def test_plan_prediction_logged_beside_measured_peak(base):
    """`midpo plan`'s predicted peak is logged beside the measured one at steps 1-3 only, once (rank 0)."""
    for text in base["logs"]:
        lines = re.findall(r"step (\d+): peak memory ([\d.]+) MiB measured .* ([\d.]+) MiB predicted by midpo plan", text)
        assert [int(s) for s, _, _ in lines] == [1, 2, 3]
        assert all(float(m) > 0 and float(p) > 0 for _, m, p in lines)
        assert len(re.findall(r"plan: predicted peak [\d.]+ MiB per device \(policy_weights", text)) == 1


def test_token_budget_two_processes_in_lockstep_match_fixed_count(base):
    """train.micro_batch_tokens on 2 processes, ZeRO-3, with a budget at which the ranks cut their pairs into
    different numbers of micro-batches at some step: the run finishes (collectives in lockstep) and its losses equal
    the fixed-count 2-process run's over the same global batches."""
    from midpo.runtime.planning import split_lengths
    from midpo.runtime.prepared import load_split
    from midpo.train.sampler import PairSampler

    lengths = split_lengths(load_split(base["run1"] / "data", "train", verify=False))

    def uneven(budget: int) -> bool:
        ss = [PairSampler(len(lengths), micro_batch_size=2, grad_accum=1, world_size=2, rank=r, token_budget=budget,
                          lengths=lengths) for r in range(2)]
        for _ in range(6):
            rows = ss[0].global_step_rows()
            if len({len(s._cut(s.rank_rows(rows, s.rank))) for s in ss}) > 1:
                return True
            for s in ss:
                s.next_step()
        return False

    budget = next(b for b in range(8, 400, 4) if uneven(b))
    recipe, run = _fresh_run(base, "budget", grad_accum=1, micro_batch_tokens=budget)
    run_train(recipe, 2)
    np.testing.assert_allclose(losses(run), losses(base["run2"]), atol=LOSS_ATOL_DIST, rtol=0)


def test_resume_on_another_process_count(base):
    """A ZeRO-3 checkpoint of the 2-process run (step 3) resumed by 1 process: DeepSpeed's own loader refuses the
    changed data-parallel world size; midpo converts the checkpoint to DeepSpeed's universal form once (in the step
    folder) and loads that. The global batch stays 4 pairs (micro 2 x accum 1 x 2 -> micro 2 x accum 2 x 1), so the
    rows of every step are the same as in the uninterrupted runs; losses and final weights equal the uninterrupted
    1-process run within 1e-5, the bound to which the 2- and 1-process runs agree (their state at step 3 differs by
    the gradient reduction order). The per-rank RNG streams are not restored (no dropout here: nothing reads them)."""
    from midpo.runtime.files import written_by_midpo

    recipe, run = resume_copy(base["run2"], 3, base["root"] / "reshard", base["model"])  # accum 2, as run1
    proc = run_train(recipe, 1)
    assert "processes: 2 -> 1" in proc.stderr and "RNG streams not restored" in proc.stderr
    assert written_by_midpo(run / "checkpoints" / "step-0000003" / "universal")
    np.testing.assert_allclose(losses(run), losses(base["run1"]), atol=LOSS_ATOL_DIST, rtol=0)
    a, b = export_weights(run / "export"), export_weights(base["run1"] / "export")
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert [r["ids"] for r in read_jsonl(run / "logs" / "consumed_rows.jsonl")] == \
        [r["ids"] for r in read_jsonl(base["run1"] / "logs" / "consumed_rows.jsonl")]


def test_crafted_checkpoint_file_is_refused_by_export_and_resume(base):
    """A file whose pickle runs code on load (here it creates MARKER), put in place of the model_states or the
    optim_states file of a real ZeRO-3 checkpoint, is refused by `midpo export --checkpoint` and by the automatic
    resume of `midpo train`, naming the file; the code never runs (DeepSpeed's loaders unpickle with
    weights_only=False)."""
    d = base["root"] / "crafted"
    recipe, run = resume_copy(base["run1"], 6, d, base["model"])
    ckpt, marker = run / "checkpoints" / "step-0000006", d / "MARKER"
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        real = (ckpt / name).read_bytes()
        write_code_running_pickle(ckpt / name, marker)
        proc = run_midpo("export", "--config", str(recipe), "--checkpoint", str(ckpt), "--out", str(d / "out"))
        assert not marker.exists(), "the crafted pickle ran"
        assert proc.returncode == 1 and f"{name}: refused to load" in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and not (d / "out").exists()
        (ckpt / name).write_bytes(real)
    write_code_running_pickle(ckpt / name, marker)
    proc = run_train(recipe, 1, check=False)
    assert not marker.exists(), "the crafted pickle ran"
    assert proc.returncode == 1 and f"refusing to load {ckpt}" in proc.stderr and name in proc.stderr, \
        proc.stderr[-3000:]
    assert not (run / "export").exists()


def test_finished_run_relaunch_changed_config_and_force(base):
    """A finished run relaunched with the same config does nothing (export/ and config.yaml untouched); with a
    changed config (`loss.prior=simpo train.lr=1e-4`) it is refused, naming each key old -> new, and nothing is
    written; `midpo train --force` removes this run's training outputs and trains from step 0 with the new config."""
    from midpo.config import load_config
    from midpo.runtime.files import OUTPUT_MARKER
    from midpo.runtime.layout import claim_run

    d = base["root"] / "relaunch"
    run = d / "run"
    shutil.copytree(base["run1"], run)
    recipe = d / "recipe.yaml"
    recipe.write_text(recipe_text(run, base["model"]))
    (run / "config.yaml").unlink()
    claim_run(load_config(recipe))  # what this recipe's run would have written (settings and paths)
    watched = [run / "export" / OUTPUT_MARKER, run / "export" / "model.safetensors", run / "config.yaml"]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in watched]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())

    proc = run_train(recipe, 1)
    assert "already holds step 6: not rewritten" in proc.stderr
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in watched] == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ckpts and len(losses(run)) == 6

    proc = run_train(recipe, 1, "loss.prior=simpo", "train.lr=1e-4", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "loss.prior: 'dpo' -> 'simpo'" in proc.stderr and "train.lr: 0.001 -> 0.0001" in proc.stderr
    assert "--force" in proc.stderr
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in watched] == before

    proc = run_midpo("train", "--config", str(recipe), "--force", "loss.prior=simpo", "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000002"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    assert load_config(run / "config.yaml").loss.prior == "simpo"
    assert [r["step"] for r in read_jsonl(run / "logs" / "train_metrics.jsonl")] == [1, 2]
    assert json.loads((run / "export" / OUTPUT_MARKER).read_text())["step"] == 2
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1


# ---------------------------------------------------------------------------------------------
# sequence parallelism (issue 19): k=2 on 2 processes == 1 process; k=2 x DP 2 on 4 processes == DP 2 (ZeRO-3)

SP_FORWARD_ATOL = 1e-6  # per-token log-probs: the same fp32 ops on the same positions (measured 0.0 on CPU)
SP_GRAD_RTOL = 1e-6  # gradients: the group's sum vs one process, relative to the largest gradient entry


@pytest.fixture(scope="module")
def sequence_parallel(base) -> dict:
    """ONE 2-process launch (tests/support/sp_check.py: forward and `midpo ref` checks, then the 6 training steps
    of the 1-process run at train.sequence_parallel=2, i.e. data-parallel size 1 and the same accumulation, with
    activation checkpointing, whose recompute re-runs attention's all-to-alls inside backward) and ONE
    4-process run at k=2 x DP 2 (the 2-process run's settings). No intermediate eval/checkpoint: losses and the
    exported weights are what is compared."""
    import subprocess
    import sys

    from train_helpers import REPO

    quick = ("train.eval_every=0", "train.save_every=0")
    two, run2 = _fresh_run(base, "sp2")
    out = base["root"] / "sp_check"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "support" / "sp_check.py"), str(out), str(two), "train.sequence_parallel=2", *quick,
           "model.gradient_checkpointing=true"]  # the recompute re-runs the all-to-alls in backward
    proc = subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-6000:]
    four, run4 = _fresh_run(base, "sp4", grad_accum=1)
    run_train(four, 4, "train.sequence_parallel=2", *quick)
    return {"result": json.loads((out / "result.json").read_text()), "run2": run2, "run4": run4}


def test_sequence_parallel_forward_and_cache_equal_one_process(sequence_parallel):
    res = sequence_parallel["result"]
    for case, r in res["forward"].items():  # sdpa / eager x packed / padded / shared, with a 600-token pair
        assert r["masks_equal"], case
        assert r["chosen"] <= SP_FORWARD_ATOL and r["rejected"] <= SP_FORWARD_ATOL, (case, r)
        assert r["grad"] <= SP_GRAD_RTOL * r["grad_scale"], (case, r)
        assert r["longest_sequence"] > 512 and min(r["tokens_per_rank"]) > 0, (case, r)  # past a packed row
    assert all(res["forward"][f"{a}/packed"]["straddling_sequences"] >= 1 for a in ("sdpa", "eager"))
    assert res["ref"]["world_size"] == 2
    for split in ("train", "eval"):  # `midpo ref` at k=2 == the plain forward, the long pair included
        assert res["ref"][split]["max_abs_diff"] <= 1e-5, res["ref"]
    fam = res["families"]  # Mistral / Gemma 2 sliding windows (16 < the rows), soft-capping, Qwen2-MoE's experts
    assert {k.split("/")[0] for k in fam} == {"mistral", "gemma2", "qwen2-moe"} and len(fam) == 15
    for case, r in fam.items():
        assert r["diff"] <= SP_FORWARD_ATOL, (case, r)
        assert r["window"] is None or r["longest_row"] > r["window"], (case, r)


def _assert_same_run(a: Path, b: Path) -> None:
    """Losses (1e-5), gradient norms (1e-5 relative), the rows of every step, exported weights (1e-5)."""
    ma, mb = (read_jsonl(r / "logs" / "train_metrics.jsonl") for r in (a, b))
    assert len(ma) == len(mb) == 6
    np.testing.assert_allclose([m["loss"] for m in mb], [m["loss"] for m in ma], atol=LOSS_ATOL_DIST, rtol=0)
    np.testing.assert_allclose([m["grad_norm"] for m in mb], [m["grad_norm"] for m in ma], rtol=1e-5)
    assert [r["ids"] for r in read_jsonl(a / "logs" / "consumed_rows.jsonl")] == \
        [r["ids"] for r in read_jsonl(b / "logs" / "consumed_rows.jsonl")]
    wa, wb = export_weights(a / "export"), export_weights(b / "export")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0)


def test_sequence_parallel_two_processes_match_one(base, sequence_parallel):
    _assert_same_run(base["run1"], sequence_parallel["run2"])


def test_sequence_parallel_with_data_parallel_matches_zero3_data_parallel(base, sequence_parallel):
    _assert_same_run(base["run2"], sequence_parallel["run4"])
