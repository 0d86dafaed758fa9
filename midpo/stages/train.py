"""Stage 3 (`midpo train`): DeepSpeed ZeRO-3 preference training from the reference cache.

Launch (all read the same recipe; `key.sub=value` tokens override it):

    midpo train --config RECIPE [--nproc N] [key.sub=value ...]        # one machine; N>1 spawns torchrun
    torchrun --nproc_per_node N -m midpo.stages.train --config RECIPE [overrides]
    deepspeed --num_gpus N --module midpo.stages.train --config RECIPE [overrides]
    srun --ntasks N python -m midpo.stages.train --config RECIPE [overrides]      # dist.init_distributed reads Slurm

On a CPU-only machine the same code runs with DeepSpeed's `cpu` accelerator and gloo.

Inputs: `<run_dir>/data/{train,eval}` (stage 1), `<run_dir>/ref/{train,eval}` (stage 2; refused when
its data/tokenizer/reference fingerprints differ), the policy (`model.policy`, else the tiny default).
With `train.online_reference=true` no cache is read: the frozen reference runs on its own ZeRO-3
inference engine (midpo.runtime.engine.OnlineReference) beside the policy on every micro-batch, and also
serves what no cache stores (full-vocab logits: TDPO exactly, SparsePO; per-layer hidden states:
SparsePO). A prior with parameters (SparsePO's mask network) is optimized and checkpointed inside the
policy engine (midpo.runtime.engine.PolicyLogps, keys `prior.*`).
Outputs: `<run_dir>/checkpoints/step-NNNNNNN/` + `latest`, `<run_dir>/tensorboard/`,
`<run_dir>/logs/{train_metrics,consumed_rows}.jsonl`, `<run_dir>/export/` (HF folder) at the end.
A run resumes automatically from `checkpoints/latest`, after midpo.runtime.checkpoint.check_resume accepted the
changes between the checkpoint's config and this one (config.RESUME_MUTABLE), on any number of processes
(midpo.runtime.checkpoint.load_engine); `--force` starts the run over instead. SIGTERM/SIGUSR1 (Slurm preemption)
make the run checkpoint at the next step boundary and exit 0.

Step anatomy (every rank, same order, same number of collectives):
  sampler -> micro-batches (pairs stay whole on one rank) -> per micro-step: collate (packed by
  default), [online reference forward, no grad], policy forward via the engine, hook.before_loss,
  prior -> generalized loss (fp32), all-ranks finiteness vote, backward -> optimizer step at the
  accumulation boundary (or a skipped step when any micro-step was non-finite) -> hook.after_step ->
  one all-reduce of metric sums/counts.

Test hooks: MIDPO_TEST_PAUSE_AFTER_STEP=n (rank 0 sleeps after step n, for SIGKILL tests);
MIDPO_TEST_NAN_STEPS=3,4 (rank 1, or 0 in one process, makes those steps' first loss NaN).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from midpo.config import Config, load_config, update_saved_config
from midpo.core.batching import DENSE_MASK_ROW_TOKENS, collate_pairs
from midpo.errors import MidpoError
from midpo.runtime import dist as pdist
from midpo.runtime.fingerprint import atomic_write_text

log = logging.getLogger("midpo.stages.train")

PAUSE_ENV = "MIDPO_TEST_PAUSE_AFTER_STEP"
NAN_ENV = "MIDPO_TEST_NAN_STEPS"
TRAIN_TAGS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected", "lr", "grad_norm", "tokens_per_s", "pairs_per_s", "padding_fraction", "mfu")


class TrainError(MidpoError, RuntimeError):
    """A start-up check or a run condition that stops training; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# paths and inputs


def resolve_paths(cfg: Config) -> dict[str, Path]:
    from midpo.runtime.export import policy_path, tokenizer_path

    policy = policy_path(cfg)
    return {
        "policy": policy,
        "reference": Path(cfg.model.reference) if cfg.model.reference else policy,
        "tokenizer": tokenizer_path(cfg),
        "ckpt": cfg.run_path / "checkpoints",
        "logs": cfg.run_path / "logs",
        "tb": cfg.run_path / "tensorboard",
    }


ONLINE_REFERENCE_INPUTS = frozenset({"ref_seq_logps", "ref_token_logps", "ref_full_vocab", "ref_hidden_states",
                                     "policy_full_vocab"})


def available_inputs(split, online_reference: bool = False) -> set[str]:
    """Availability keys (midpo.core.priors.AVAILABLE_KEYS) the cache of `split` (or the online reference) serves."""
    if online_reference:  # the reference runs beside the policy: log-probs, full-vocab logits, hidden states
        return set(ONLINE_REFERENCE_INPUTS) | ({"token_weights"} if split.weights is not None else set())
    a = {"ref_seq_logps", "ref_token_logps"}
    cols = set(split.cache_columns)
    if split.weights is not None:
        a.add("token_weights")
    if {"chosen_ref_topk_logps", "rejected_ref_topk_logps"} <= cols:
        a |= {"ref_topk", "policy_full_vocab"}  # the trainer asks the policy forward for logits then
    return a


@dataclass
class MicroBatch:
    batch: object  # PairBatch on the device
    ref: object  # ResponseLogps of the cached reference
    token_weights: object | None
    ref_topk: object | None
    ids: list[str]
    real: bool = True  # False: a dummy batch that keeps ranks in lockstep (eval tail); its metrics are dropped


def make_micro_batch(rows: list[dict], collate, device: torch.device, real: bool = True) -> MicroBatch:
    """`collate`: rows -> PairBatch with the run's layout, pad id and packed-row budget (built once in _train)."""
    from midpo.core.logprobs import ResponseLogps
    from midpo.core.priors import SidePair, TopK

    batch = collate(rows).to(device)
    ref = None  # online reference: filled per forward by forward_loss
    if "chosen_ref_logps" in rows[0]:
        ref = ResponseLogps.from_lists([r["chosen_ref_logps"] for r in rows], [r["rejected_ref_logps"] for r in rows],
                                       device=device)
    weights = None
    if "chosen_weights" in rows[0]:
        w = ResponseLogps.from_lists([r["chosen_weights"] for r in rows], [r["rejected_weights"] for r in rows],
                                     device=device)
        weights = SidePair(w.chosen, w.rejected)
    topk = None
    if "chosen_ref_topk_logps" in rows[0]:
        sides = []
        for side in ("chosen", "rejected"):
            vals = _pad3([r[f"{side}_ref_topk_logps"] for r in rows], torch.float32)  # (B, L, k)
            idx = _pad3([r[f"{side}_ref_topk_ids"] for r in rows], torch.long)  # (B, L, k)
            tail = ResponseLogps.from_lists([r[f"{side}_ref_tail_logmass"] for r in rows],
                                            [r[f"{side}_ref_tail_logmass"] for r in rows]).chosen  # (B, L)
            sides.append(TopK(vals.to(device), idx.to(device), tail.to(device)))
        topk = SidePair(*sides)
    return MicroBatch(batch, ref, weights, topk, [r["id"] for r in rows], real)


def _pad3(lists, dtype) -> torch.Tensor:
    B, L, k = len(lists), max(len(x) for x in lists), len(lists[0][0])
    out = torch.zeros(B, L, k, dtype=dtype)
    for i, x in enumerate(lists):
        out[i, : len(x)] = torch.tensor(np.asarray(x), dtype=dtype)
    return out


# ---------------------------------------------------------------------------------------------
# one forward + loss (shared by train, eval and the probe: one code path)


def forward_loss(engine, prior, mb: MicroBatch, cfg: Config, hook, *, need_logits: bool, reference=None,
                 flat_logits: bool = False):
    """`reference`: the online reference (midpo.runtime.engine.OnlineReference), else the cache in `mb.ref`.
    `need_logits`: the loss's prior reads the policy logits (with grad); `flat_logits`: the hook does (detached)."""
    from midpo.core.priors import PriorInputs, compute_loss
    from midpo.runtime.engine import policy_logps

    ref = mb.ref if reference is None else reference(mb.batch)  # same PairBatch, no grad
    # ResponseLogps (B, L) fp32, with grad in training
    policy = policy_logps(engine, mb.batch, return_logits=need_logits, return_flat_logits=flat_logits)
    extra = hook.before_loss(mb.batch, policy) or {}
    inputs = PriorInputs(policy=policy, ref=ref, token_weights=mb.token_weights, ref_topk=mb.ref_topk, **extra)
    return policy, compute_loss(prior, inputs, cfg.loss)


# ---------------------------------------------------------------------------------------------
# start-of-run probe: policy == reference must reproduce the cache


def probe_reference(engine, split, cfg: Config, collate, cache_manifest: dict) -> dict:
    """Re-score `train.probe_rows` cached rows with the policy (which starts as the reference); stop
    with a diagnosis when they differ. Every rank scores the same rows (same collectives)."""
    from midpo.runtime.engine import policy_logps
    from midpo.runtime.models import resolve_attn, resolve_dtype

    n = min(cfg.train.probe_rows, len(split))
    mb = make_micro_batch(split.rows(range(n)), collate, pdist.device())
    engine.eval()
    with torch.no_grad():
        pol = policy_logps(engine, mb.batch)
    engine.train()
    diffs = []
    for side in ("chosen", "rejected"):
        mask = getattr(pol, f"{side}_mask")
        diffs.append((getattr(pol, side) - getattr(mb.ref, side)).abs()[mask].double())
    d = torch.cat(diffs)
    mean, mx = float(d.mean()), float(d.max())
    dtype = resolve_dtype(cfg.model.dtype)
    tol = cfg.train.probe_tolerance or (1e-4 if dtype == torch.float32 else 2e-2)
    stats = {"rows": n, "tokens": int(d.numel()), "mean_abs_diff": mean, "max_abs_diff": mx, "tolerance": tol}
    if not mean <= tol:
        ours = {"dtype": str(dtype).removeprefix("torch."), "attn_implementation": resolve_attn(cfg.model.attn_implementation)}
        theirs = {k: cache_manifest.get(k) for k in ours}
        differ = [f"{k}: cache {theirs[k]} vs training {ours[k]}" for k in ours if theirs[k] != ours[k]]
        raise TrainError(
            f"start-of-run probe failed: the policy starts from the reference weights, yet its log-probs on {n} cached "
            f"rows differ from the cache (mean |diff| {mean:.3g} per token, max {mx:.3g}, tolerance {tol:.3g}). "
            "Likely causes: a different tokenizer or chat template than the data was built with; another dtype or "
            "attention implementation than the cache (" + ("; ".join(differ) if differ else "these match") + "); "
            "a cache built from other weights; packed-sequence masking not isolating sequences. Rebuild the cache "
            "with the training settings (`midpo ref`), or raise train.probe_tolerance if the difference is expected.")
    return stats


# ---------------------------------------------------------------------------------------------
# evaluation over the WHOLE eval split


def eval_plan(n_rows: int, micro: int, world: int, rank: int) -> list[tuple[list[int], bool]]:
    """This rank's eval micro-batches: rows r, r+W, ... in chunks of `micro`; every rank runs the same
    number of forwards (ranks that run out repeat row 0 as a dummy, whose metrics are dropped)."""
    mine = list(range(rank, n_rows, world))
    per_rank = math.ceil(math.ceil(n_rows / world) / micro)
    plan = []
    for k in range(per_rank):
        chunk = mine[k * micro: (k + 1) * micro]
        plan.append((chunk, True) if chunk else ([0], False))
    return plan


def evaluate(engine, prior, split, cfg: Config, hook, collate, need_logits: bool,
             reference=None) -> dict[str, float]:
    from midpo.runtime.metrics import MetricSums

    sums = MetricSums()
    engine.eval()
    with torch.no_grad():
        for idx, real in eval_plan(len(split), cfg.train.micro_batch_size, pdist.world_size(), pdist.rank()):
            mb = make_micro_batch(split.rows(idx), collate, pdist.device(), real)
            _, out = forward_loss(engine, prior, mb, cfg, hook, need_logits=need_logits, reference=reference)
            if real:
                for k, v in out.metrics().items():
                    sums.add(k, v[0], v[1])
    engine.train()
    from midpo.core.losses import METRIC_NAMES

    return sums.reduce(list(METRIC_NAMES))


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class RunState:
    step: int = 0
    consumed_samples: int = 0
    bad_steps_total: int = 0
    bad_steps_in_a_row: int = 0
    dropped_tail_rows: int = 0  # rows skipped at epoch ends so far (the sampler drops incomplete global batches)
    eval_history: list = field(default_factory=list)


class _StopFlag:
    """Set by SIGTERM/SIGUSR1; acted on collectively at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handler)
            except (ValueError, OSError):  # not the main thread
                pass

    def _handler(self, signum, frame) -> None:
        self.requested = True


def _zero3_loading(ds_config: dict):
    """With accelerate installed, transformers' HfDeepSpeedConfig makes from_pretrained load straight into
    ZeRO-3 shards (no full copy per rank). Without it each rank loads the full model and DeepSpeed
    partitions it at initialize: correct, but needs host memory for one full model per rank."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        log.info("accelerate not installed: every rank loads the full policy before ZeRO-3 partitions it")
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def _grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the gradients (whole, all-reduced: ZeRO stage 0)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _nan_steps() -> set[int]:
    raw = os.environ.get(NAN_ENV, "")
    return {int(x) for x in raw.split(",") if x.strip()}


def _local_params_finite(engine) -> bool:
    """This rank's ZeRO-3 partitions (ds_tensor) are finite."""
    for p in engine.module.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        if t.numel() and not bool(torch.isfinite(t).all()):
            return False
    return True


def _skip_optimizer_step(engine, missing_micro_steps: int) -> None:
    """Drop this step's accumulated gradients without an optimizer/scheduler step (as DeepSpeed's fp16
    overflow path does), and move its micro-step counter to the next accumulation boundary."""
    engine.optimizer.zero_grad(set_to_none=True)
    engine.micro_steps += missing_micro_steps


def _rewrite_jsonl_upto(path: Path, step: int) -> None:
    """Keep lines with step <= `step`: a killed run may have logged steps past its last checkpoint."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _gather_ids(ids: list[str]) -> list[str]:
    """Row ids of this step in global-batch order: (micro-step k, rank r) slices, as the sampler cuts them."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ids
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, ids)
    return [i for per_rank in out for i in per_rank]


def _order_ids(per_rank_micro: list[list[list[str]]]) -> list[str]:
    accum = len(per_rank_micro[0])
    return [i for k in range(accum) for r in range(len(per_rank_micro)) for i in per_rank_micro[r][k]]


def main(cfg: Config, force: bool = False) -> dict:
    """Set up, train, evaluate, checkpoint, export, clean up. Returns a summary (rank 0's view).
    `force`: start the run over (checkpoint.start_over) instead of resuming from checkpoints/latest."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    owned = not dist.is_initialized()  # a caller's process group is the caller's to destroy
    rank, world, _ = pdist.init_distributed()
    try:
        return _train(cfg, rank, world, force)
    finally:
        if owned:
            pdist.cleanup()


def _resume_point(cfg: Config, paths: dict, world: int, total_steps: int, inputs: dict, force: bool) -> Path | None:
    """Collective. `force`: rank 0 first removes this run's training outputs (checkpoint.start_over). Then the
    checkpoint to resume from, checked against this run's config and inputs (checkpoint.check_resume), or None."""
    from midpo.runtime.checkpoint import CheckpointError, check_resume, latest_checkpoint, start_over

    if force:
        err = ""
        if pdist.is_main():
            try:
                removed = start_over(cfg.run_path)
                log.warning("--force: starting %s over from step 0; removed %d training outputs%s", cfg.run_path,
                            len(removed), f" ({', '.join(p.name for p in removed[:8])}...)" if removed else "")
            except OSError as e:  # OutputDirError: an export/ midpo did not write; nothing was removed
                err = str(e)
        if not pdist.all_ranks_true(not err):
            raise TrainError(f"--force: {err or 'rank 0 could not remove the run outputs (see its log)'}")
    ckpt = latest_checkpoint(paths["ckpt"])
    if ckpt is not None:
        try:
            accepted = check_resume(ckpt, cfg, world, inputs, total_steps)
        except CheckpointError as e:
            raise TrainError(str(e)) from None
        if pdist.is_main():
            for line in accepted:
                log.warning("resuming %s with a change: %s", ckpt.name, line)
    return ckpt


def _export_done(cfg: Config, hook, step: int) -> bool:
    """<run_dir>/export already holds the weights of `step` (its output marker says so), with the prior's folder
    when the hook exports one: a relaunch of a finished run must not write it again."""
    from midpo.runtime.files import OUTPUT_MARKER

    out = cfg.run_path / "export"
    try:
        marker = json.loads((out / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("step") == step and (not hasattr(hook, "export") or (out / "prior" / OUTPUT_MARKER).is_file())


def _train(cfg: Config, rank: int, world: int, force: bool = False) -> dict:  # noqa: C901 - the loop reads best here
    import random

    from transformers import AutoConfig

    from midpo.core.losses import METRIC_NAMES
    from midpo.core.priors import build_prior, check_needs
    from midpo.runtime.cache import read_cache_manifest
    from midpo.runtime.checkpoint import load_checkpoint, save_checkpoint
    from midpo.runtime.engine import NoOpHook, PolicyLogps, build_policy_engine, resolve_ds_config
    from midpo.runtime.export import export_from_engine
    from midpo.runtime.metrics import MetricSums, TBLogger, all_reduce_sum, flop_params, measure_peak_flops, train_flops
    from midpo.runtime.models import (
        compile_decoder,
        compile_stats,
        load_model,
        model_fingerprint,
        resolve_attn,
        resolve_dtype,
    )
    from midpo.runtime.pairs import open_split
    from midpo.runtime.prepared import read_manifest
    from midpo.runtime.profiling import StepProfiler
    from midpo.stages.ref import pad_id_of
    from midpo.train.sampler import PairSampler

    tc = cfg.train
    paths = resolve_paths(cfg)
    online = bool(tc.online_reference)
    random.seed(tc.seed + rank)
    np.random.seed(tc.seed + rank)
    torch.manual_seed(tc.seed)  # same on every rank: identical dropout masks do not matter, identical init does

    # --- data + cache (refused when fingerprints differ) ---
    ref_fp = model_fingerprint(paths["reference"])
    tok_dir = paths["tokenizer"]
    tok_fp = tokenizer_fp(tok_dir) if tok_dir is not None else None
    if tok_fp is None:
        log.warning("no tokenizer found (data.tokenizer, the policy folder, stage 1's manifest): the data's tokenizer "
                    "cannot be checked and the export will have no tokenizer files")
    # online reference: no cache is read (the reference scores every batch itself)
    train_split = open_split(cfg.run_path, "train", reference_fp=ref_fp, tokenizer_fp=tok_fp, with_cache=not online)
    if train_split is None:
        raise TrainError(f"{cfg.run_path}/data/train not found: run `midpo prep` then `midpo ref` first")
    eval_split = open_split(cfg.run_path, "eval", reference_fp=ref_fp, tokenizer_fp=tok_fp, with_cache=not online)
    cache_manifest = {} if online else read_cache_manifest(cfg.run_path / "ref")

    hf_config = AutoConfig.from_pretrained(str(paths["policy"]), trust_remote_code=cfg.model.trust_remote_code)
    check_data(train_split, eval_split, hf_config, paths["policy"])
    prior = build_prior(cfg.loss, model_config=hf_config)
    prior_has_params = any(p.requires_grad for p in prior.parameters())  # SparsePO's mask network
    check_needs(prior, available_inputs(train_split, online)
                | ({"prior_network"} if prior.needs.prior_network else set()))
    need_logits = prior.needs.policy_full_vocab

    # --- sampler ---
    sampler = PairSampler(len(train_split), micro_batch_size=tc.micro_batch_size, grad_accum=tc.grad_accum,
                          world_size=world, rank=rank, seed=tc.seed)
    total_steps = tc.max_steps if tc.max_steps > 0 else tc.epochs * sampler.steps_per_epoch
    if total_steps <= 0:
        raise TrainError("no optimizer steps to run: set train.max_steps or train.epochs")
    inputs = {"data": read_manifest(cfg.run_path / "data").get("fingerprint"), "reference": ref_fp}
    ckpt = _resume_point(cfg, paths, world, total_steps, inputs, force)

    # --- engine ---
    ds_config = resolve_ds_config(cfg, world, hf_config.hidden_size)
    keep_alive = _zero3_loading(ds_config)  # noqa: F841  (must stay alive while from_pretrained runs)
    model = load_model(paths["policy"], cfg.model, device=pdist.device(), train=True)
    if tc.compile:  # resolve_ds_config refused ZeRO-3 already
        compile_decoder(model)
    body_params, head_params = flop_params(model)  # MFU's numerator: the head runs on response positions only
    # A prior with parameters is optimized, clipped, scheduled and checkpointed with the policy (one engine).
    engine = build_policy_engine(PolicyLogps(model, prior if prior_has_params else None), ds_config,
                                 total_steps=total_steps, warmup_ratio=tc.warmup_ratio, schedule=tc.schedule)
    pad_id = pad_id_of(model)
    norm_from_grads = engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())
    reference = None
    if online and not prior.needs.needs_reference:
        log.info("train.online_reference=true but prior %r uses no reference: none is loaded", prior.name)
    elif online:  # collective: the frozen reference on its own ZeRO-3 inference engine (policy config - optimizer)
        from midpo.runtime.engine import build_reference_engine

        reference = build_reference_engine(load_model(paths["reference"], cfg.model, device=pdist.device()),
                                           ds_config, return_logits=prior.needs.ref_full_vocab,
                                           return_hidden=prior.needs.ref_hidden_states)
        log.info("online reference: %s on a ZeRO-3 inference engine (logits %s, hidden states %s)",
                 paths["reference"], reference.return_logits, reference.return_hidden)
    hook = NoOpHook()
    if prior.needs.prior_network:  # MI-DPO proper: the prior network on its own engine (collective)
        from midpo.train.prior_engine import build_midpo_hook

        hook = build_midpo_hook(cfg, reference_path=paths["reference"], policy_config=hf_config, world_size=world,
                                pad_id=pad_id, beta=prior.beta)
    layout = "shared" if tc.share_prompt else "packed" if tc.packing else "padded"
    dtype = resolve_dtype(cfg.model.dtype)
    attn = resolve_attn(cfg.model.attn_implementation)
    if layout == "shared" and "flash" in attn:
        raise TrainError(f"train.share_prompt needs a dense attention mask; attention resolves to {attn}, which "
                          "cannot take one: set model.attn_implementation=sdpa, or train.share_prompt=false "
                          "(flash-attn's packed layout is padding-free already)")
    collate = functools.partial(collate_pairs, layout=layout, pad_id=pad_id,
                                max_row_tokens=None if "flash" in attn else DENSE_MASK_ROW_TOKENS)

    # --- resume or probe ---
    state = RunState()
    logs_dir = paths["logs"]
    metrics_file, rows_file = logs_dir / "train_metrics.jsonl", logs_dir / "consumed_rows.jsonl"
    resumed_step = -1
    if ckpt is not None:
        saved = load_checkpoint(ckpt, engine, hook)
        sampler.load_state_dict(saved["sampler"])
        for k in ("step", "consumed_samples", "bad_steps_total", "bad_steps_in_a_row", "dropped_tail_rows"):
            setattr(state, k, int(saved[k]))
        state.eval_history = saved.get("eval_history", [])
        resumed_step = state.step
        hook.load_state_dict(saved.get("hook", {}))
        if pdist.is_main():
            for f in (metrics_file, rows_file):
                _rewrite_jsonl_upto(f, state.step)
        log.info("resumed from %s at step %d (%d samples consumed)", ckpt, state.step, state.consumed_samples)
    else:
        if pdist.is_main():  # a fresh start: lines a killed attempt logged before its first checkpoint go
            for f in (metrics_file, rows_file):
                _rewrite_jsonl_upto(f, 0)
        if online:
            log.info("start-of-run probe skipped (online reference: no cache to check)")
        elif tc.probe_rows > 0 and model_fingerprint(paths["policy"]) == ref_fp:
            stats = probe_reference(engine, train_split, cfg, collate, cache_manifest)
            log.info("start-of-run probe passed: %s", stats)
        else:
            log.info("start-of-run probe skipped (%s)", "train.probe_rows=0" if tc.probe_rows <= 0
                     else "the policy does not start from the reference weights")
    if pdist.is_main():
        logs_dir.mkdir(parents=True, exist_ok=True)
        update_saved_config(cfg, cfg.run_path / "config.yaml")  # untouched when the values are the same
    pdist.barrier()

    # --- accounting ---
    peak = tc.peak_flops or measure_peak_flops(dtype, pdist.device(), seconds=0.5)
    tb = TBLogger(paths["tb"] if pdist.is_main() else None)
    if pdist.is_main():
        log.info("train: %d rows, %d steps (%d per epoch, global batch %d = micro %d x accum %d x world %d), "
                 "%d tail rows dropped per epoch; eval: %d rows; layout %s, attn %s, %s; peak %.3g FLOP/s per rank",
                 len(train_split), total_steps, sampler.steps_per_epoch, sampler.global_batch, tc.micro_batch_size,
                 tc.grad_accum, world, sampler.dropped_per_epoch, len(eval_split) if eval_split else 0, layout, attn,
                 dtype, peak)
    stop = _StopFlag()
    stop.install()
    nan_steps = _nan_steps()
    nan_rank = min(1, world - 1)
    pause_after = int(os.environ.get(PAUSE_ENV, "0") or 0)

    def trainer_state() -> dict:
        return {"step": state.step, "consumed_samples": state.consumed_samples, "sampler": sampler.state_dict(),
                "world_size": world, "bad_steps_total": state.bad_steps_total,
                "bad_steps_in_a_row": state.bad_steps_in_a_row, "dropped_tail_rows": state.dropped_tail_rows,
                "eval_history": state.eval_history, "hook": hook.state_dict(), "total_steps": total_steps,
                "inputs": inputs}

    def checkpoint_now() -> None:
        if not pdist.all_ranks_true(_local_params_finite(engine)):
            raise TrainError(f"step {state.step}: parameters are not finite; refusing to checkpoint this state")
        save_checkpoint(paths["ckpt"], state.step, engine, trainer_state(), cfg, hook, keep_last=tc.keep_last)

    def run_eval() -> dict | None:
        if eval_split is None or len(eval_split) == 0:
            return None
        res = evaluate(engine, prior, eval_split, cfg, hook, collate, need_logits, reference)
        tb.scalars(res, state.step, prefix="eval/")
        state.eval_history.append({"step": state.step, **res})
        if pdist.is_main():
            log.info("eval @ step %d: %s", state.step, " ".join(f"{k}={v:.4f}" for k, v in res.items()))
        return res

    bar = None
    if pdist.is_main():
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=state.step, unit="step", dynamic_ncols=True, desc="train")

    hook_names = list(getattr(importlib.import_module(type(hook).__module__), "METRIC_NAMES", ()))
    sums = MetricSums()
    window = {"tokens": 0.0, "pad": 0.0, "slots": 0.0, "pairs": 0.0, "time": 0.0, "attn": 0.0, "logit_tokens": 0.0}
    last_eval = None
    stopped_early = False
    profiler = StepProfiler(logs_dir, rank)
    while state.step < total_steps:
        t0 = time.perf_counter()
        profiler.begin(state.step + 1)
        epoch_before = sampler.state.epoch
        micro_rows = sampler.next_step()
        if sampler.state.epoch != epoch_before:
            state.dropped_tail_rows += sampler.dropped_per_epoch
            if pdist.is_main() and sampler.dropped_per_epoch:
                log.info("epoch %d done: %d tail rows dropped (incomplete global batch)", epoch_before,
                         sampler.dropped_per_epoch)
        step_bad = False
        step_ids: list[list[str]] = []
        step_metrics: list[dict] = []
        lr = engine.get_lr()[0]
        engine_steps = 0  # DeepSpeed micro-step counter advances only through engine.step()
        policy = mb = None
        # the hook reads the policy logits only on its update steps (same answer on every rank: same head calls)
        flat_logits = hook.policy_logits_due(state.step + 1)
        for k, idx in enumerate(micro_rows):
            mb = make_micro_batch(train_split.rows(idx), collate, pdist.device())
            step_ids.append(mb.ids)
            policy, out = forward_loss(engine, prior, mb, cfg, hook, need_logits=need_logits, reference=reference,
                                       flat_logits=flat_logits)
            loss = out.losses.mean()
            if state.step + 1 in nan_steps and rank == nan_rank and k == 0:
                loss = loss * float("nan")
            ok = pdist.all_ranks_true(bool(torch.isfinite(loss)) and not step_bad)
            if not ok:
                step_bad = True  # every rank agrees: no backward for the rest of this step
                continue
            engine.backward(loss)
            if k < len(micro_rows) - 1:
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step
                engine_steps += 1
            step_metrics.append(out.metrics())
            b = mb.batch
            window["tokens"] += b.num_tokens
            window["pad"] += b.num_pad_tokens
            window["slots"] += b.input_ids.numel()
            window["pairs"] += b.num_pairs
            window["attn"] += b.attention_context
            window["logit_tokens"] += b.target_index.numel()
        if step_bad:
            _skip_optimizer_step(engine, len(micro_rows) - engine_steps)
            state.bad_steps_total += 1
            state.bad_steps_in_a_row += 1
            log.warning("step %d: non-finite loss on some rank; optimizer step skipped (%d in a row, %d total)",
                        state.step + 1, state.bad_steps_in_a_row, state.bad_steps_total)
            if state.bad_steps_in_a_row >= tc.max_bad_steps:
                raise TrainError(f"{state.bad_steps_in_a_row} consecutive non-finite steps (train.max_bad_steps="
                                 f"{tc.max_bad_steps}); lower train.lr, check the data, or use fp32")
        else:
            # DeepSpeed's stage-0 fp32 path clips without keeping the norm: take it from the (already all-reduced)
            # gradients before the step frees them
            own_norm = _grad_norm(engine.module) if norm_from_grads else None
            engine.step()  # boundary: clip, optimizer, lr schedule
            state.bad_steps_in_a_row = 0
            for m in step_metrics:
                for name, v in m.items():
                    sums.add(name, v[0], v[1])
            norm = own_norm if norm_from_grads else float(engine.get_global_grad_norm() or 0.0)
            sums.add("grad_norm", norm * world, world)  # same on all ranks
            sums.add("lr", lr * world, world)
        for name, v in (hook.after_step(state.step + 1, mb.batch if mb is not None else None, policy) or {}).items():
            sums.add(name, v[0], v[1])  # [sum, count], reduced with the policy's metrics
        state.step += 1
        state.consumed_samples += sampler.global_batch
        t1 = time.perf_counter()
        window["time"] += t1 - t0

        if tc.record_rows:
            ids = _gather_ids([i for ids in step_ids for i in ids]) if world > 1 else [i for x in step_ids for i in x]
            if pdist.is_main():
                per_rank = [ids[r * len(ids) // world:(r + 1) * len(ids) // world] for r in range(world)]
                per_rank_micro = [[x[k * tc.micro_batch_size:(k + 1) * tc.micro_batch_size]
                                   for k in range(tc.grad_accum)] for x in per_rank]
                with open(rows_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.step, "skipped": step_bad, "ids": _order_ids(per_rank_micro)})
                            + "\n")

        if state.step % tc.log_every == 0 or state.step == total_steps:
            names = [*METRIC_NAMES, "grad_norm", "lr", *hook_names]
            # a window of only skipped steps has no samples: leave those metrics out rather than log NaN
            vals = {k: v for k, v in sums.reduce(names).items() if not math.isnan(v)}
            tot = all_reduce_sum([window["tokens"], window["pad"], window["slots"], window["pairs"], window["attn"],
                                  window["logit_tokens"], float(stop.requested)])
            dt = window["time"]  # ranks run in lockstep; rank 0's wall time is what it logs
            tokens, pad, slots, pairs, attn_ctx, logit_tokens, stop_votes = tot
            flops = train_flops(body_params, head_params, hf_config.num_hidden_layers, hf_config.hidden_size,
                                tokens, logit_tokens, attn_ctx)
            vals.update({"tokens_per_s": tokens / dt if dt else 0.0, "pairs_per_s": pairs / dt if dt else 0.0,
                         "padding_fraction": pad / slots if slots else 0.0,
                         "mfu": flops / dt / (peak * world) if dt else 0.0})
            tb.scalars(vals, state.step, prefix="train/")
            if pdist.is_main():
                with open(metrics_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.step, "bad_steps_total": state.bad_steps_total, **vals}) + "\n")
                bar.set_postfix(loss=f"{vals.get('loss', float('nan')):.4f}",
                                acc=f"{vals.get('rewards/accuracies', float('nan')):.2f}",
                                pairs_s=f"{vals['pairs_per_s']:.1f}", mfu=f"{vals['mfu']:.0%}")
            sums.reset()
            window = dict.fromkeys(window, 0.0)
            if stop_votes > 0:
                stopped_early = True
        if bar is not None:
            bar.update(1)
        # row records, metric reduction and logging are per-step costs too (counted in the next window);
        # eval and checkpoints are not
        window["time"] += time.perf_counter() - t1
        profiler.end(state.step)

        if tc.eval_every and state.step % tc.eval_every == 0 and state.step < total_steps:
            last_eval = run_eval()
        if stopped_early or (tc.save_every and state.step % tc.save_every == 0 and state.step < total_steps):
            checkpoint_now()
        if pause_after and state.step == pause_after and pdist.is_main():
            log.warning("%s=%d: pausing for a kill test", PAUSE_ENV, pause_after)
            tb.flush()
            time.sleep(3600)
        if stopped_early:
            log.warning("stop requested (signal): checkpointed at step %d, exiting", state.step)
            break

    if bar is not None:
        bar.close()
    if not stopped_early:
        # a relaunch of a finished run does nothing: no second final eval, no rewrite of the checkpoint it loaded
        # or of an export that already holds this step
        if state.eval_history and state.eval_history[-1]["step"] == state.step:
            last_eval = {k: v for k, v in state.eval_history[-1].items() if k != "step"}
        else:
            last_eval = run_eval()
        if state.step > resumed_step:
            checkpoint_now()
        if tc.export_at_end and not (state.step == resumed_step and _export_done(cfg, hook, state.step)):
            export_from_engine(engine, cfg, step=state.step)
            if hasattr(hook, "export"):
                hook.export(cfg)  # after the policy: its folder is replaced as a whole
        elif tc.export_at_end and pdist.is_main():
            log.info("%s already holds step %d: not rewritten", cfg.run_path / "export", state.step)
    tb.close()
    summary = {"step": state.step, "bad_steps_total": state.bad_steps_total, "eval": last_eval,
               "dropped_tail_rows": state.dropped_tail_rows, "stopped_early": stopped_early}
    if pdist.is_main():
        if tc.compile:
            log.info("torch.compile: %s", compile_stats())
        log.info("done: %s", summary)
    return summary


def check_data(train_split, eval_split, hf_config, policy: Path) -> None:
    """At start: refuse pairs longer than the policy's positions (a RoPE model would train on positions past
    them, silently); say so when there is no eval split (training then runs without evaluation)."""
    from midpo.runtime.models import longest_pair, max_positions, positions_problem

    for split in (train_split, eval_split):
        if split is not None:
            problem = positions_problem(longest_pair(split.data), max_positions(hf_config), model=policy,
                                        what=f"the longest {split.name} pair (prompt + longer response)")
            if problem:
                raise TrainError(problem)
    if (eval_split is None or len(eval_split) == 0) and pdist.is_main():
        log.warning("the eval split is empty (data.eval_fraction=0, or too few rows): training runs without evaluation")


def tokenizer_fp(path: Path) -> str:
    """The tokenizer fingerprint exactly as stage 1 records it (one file list, midpo.runtime.fingerprint)."""
    from midpo.runtime.models import tokenizer_fingerprint

    return tokenizer_fingerprint(path)


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe (YAML path or name in recipes/)")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (N>1 spawns torchrun)")
    parser.add_argument("--force", action="store_true",
                        help="start the run over: remove its checkpoints, training logs, tensorboard/ and export/ "
                             "(only what midpo wrote) and train from step 0 with this config, instead of resuming")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed


def run(args: argparse.Namespace) -> int:
    from midpo.stages.ref import launch_torchrun

    cfg = load_config(args.config, getattr(args, "overrides", []))
    if args.nproc > 1 and "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        return launch_torchrun("midpo.stages.train", [f"--config={args.config}", *(["--force"] if args.force else []),
                                                  *args.overrides], args.nproc)
    main(cfg, force=args.force)  # a MidpoError becomes one `midpo train: error:` line in midpo.cli.run_stage
    return 0


if __name__ == "__main__":
    from midpo.stages.ref import cli

    sys.exit(cli(add=add_arguments, runner=run, prog="midpo.stages.train"))
