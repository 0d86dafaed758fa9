"""The training run: `Trainer(cfg).setup()`, `.fit()`, `.close()` on every rank (midpo.stages.train runs it).

setup(): the run's paths (runtime.layout), data + verified reference cache (refused when its fingerprints
differ), the prior and what it needs, the sampler, the resume point (checked against the checkpoint's config,
or `--force`: start over), the policy engine (DeepSpeed, ZeRO stage from the ds_config), the online reference and
the MI-DPO prior network when the prior needs them, then the checkpoint's state or the start-of-run probe.
fit(): the loop below: train_step -> row records -> metrics (every train.log_every steps) -> eval / checkpoint
as scheduled -> stop on SIGTERM/SIGUSR1 (Slurm preemption: checkpoint at the step boundary, exit 0); at the end a
final eval, checkpoint and export (a relaunch of a finished run does none of them again).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from midpo.config import Config
from midpo.core.batching import DENSE_MASK_ROW_TOKENS, collate_pairs
from midpo.core.losses import METRIC_NAMES
from midpo.errors import MidpoError
from midpo.runtime import dist as pdist
from midpo.runtime.files import OUTPUT_MARKER, atomic_write_text
from midpo.train.step import (
    BATCH_COUNTS,
    ROUTER_METRIC,
    Objective,
    evaluate,
    make_micro_batch,
    probe_reference,
    train_step,
)

log = logging.getLogger(__name__)


class TrainError(MidpoError, RuntimeError):
    """A start-up check or a run condition that stops training; the message says what to do."""


@dataclass
class RunState:
    step: int = 0
    consumed_samples: int = 0
    bad_steps_total: int = 0
    bad_steps_in_a_row: int = 0
    dropped_tail_rows: int = 0  # rows skipped at epoch ends so far (the sampler drops incomplete global batches)
    eval_history: list = field(default_factory=list)


COUNTERS = ("step", "consumed_samples", "bad_steps_total", "bad_steps_in_a_row", "dropped_tail_rows")
# what every log line holds (TensorBoard `train/<tag>`, logs/train_metrics.jsonl): TRL's loss metrics, the optimizer's,
# the throughput's; with MI-DPO also train.prior_engine.PriorNetwork.METRIC_NAMES; with a combination of links,
# an NLL term or bco_pair's running mean also loss/<link>, loss/sft, bco/delta (train.step.Objective.metric_names)
THROUGHPUT_TAGS = ("tokens_per_s", "pairs_per_s", "padding_fraction", "mfu")
TRAIN_TAGS = (*METRIC_NAMES, "lr", "grad_norm", *THROUGHPUT_TAGS)



def router_aux_coef(configured: float | None, hf_config) -> float:
    """The weight of the routers' load-balancing loss: train.router_aux_loss_coef, or (None) the model config's
    own (Mixtral 0.02, Qwen2-MoE 0.001); 0 for a dense model, where a configured weight is refused."""
    moe = getattr(hf_config, "num_experts_per_tok", None) is not None
    if not moe:
        if configured:
            raise TrainError(f"train.router_aux_loss_coef={configured}, but {type(hf_config).__name__} has no "
                             "mixture-of-experts router: remove the key")
        return 0.0
    coef = float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0) if configured is None else float(configured)
    log.info("MoE policy: router load-balancing loss x %g added to the policy's loss", coef)
    return coef


class Trainer:
    def __init__(self, cfg: Config, *, force: bool = False, callbacks=()):
        self.cfg, self.force, self.callbacks = cfg, force, tuple(callbacks)
        self.state = RunState()
        self.resumed_step = -1  # the step a resume started from (-1: a fresh start)
        self.auto_picks: dict = {}  # train.layout / train.ds_config chosen by `auto` (_resolve_auto)

    # -----------------------------------------------------------------------------------------
    # setup

    def setup(self) -> Trainer:
        from transformers import AutoConfig

        from midpo.core.losses import link_terms
        from midpo.core.priors import build_prior, check_needs
        from midpo.runtime.cache import open_split, read_cache_manifest
        from midpo.runtime.layout import claim_run_on_all_ranks, record_settings
        from midpo.runtime.models import model_fingerprint, tokenizer_fingerprint
        from midpo.runtime.prepared import read_manifest
        from midpo.train.sampler import PairSampler

        cfg, tc = self.cfg, self.cfg.train
        rank, world = pdist.rank(), pdist.world_size()
        self.layout = layout = claim_run_on_all_ranks(cfg, needs=("policy", "reference", "tokenizer"))
        self.seq_groups = sequence_groups(tc.sequence_parallel, world)  # COLLECTIVE; None without SP
        random.seed(tc.seed + rank)
        np.random.seed(tc.seed + rank)
        torch.manual_seed(tc.seed)  # same on every rank: identical dropout masks do not matter, identical init does

        # data + cache (refused when fingerprints differ); an online reference reads no cache
        online = bool(tc.online_reference)
        self.ref_fp = model_fingerprint(layout.reference)
        tok_fp = tokenizer_fingerprint(layout.tokenizer)
        splits = {s: open_split(layout.data, layout.cache, layout.weights, s, reference_fp=self.ref_fp,
                                tokenizer_fp=tok_fp, with_cache=not online) for s in ("train", "eval")}
        self.train_split, self.eval_split = splits["train"], splits["eval"]
        if self.train_split is None:
            raise TrainError(f"{layout.data}/train not found: run `midpo prep` then `midpo ref` first")
        self.cache_manifest = {} if online else read_cache_manifest(layout.cache)
        self.hf_config = AutoConfig.from_pretrained(str(layout.policy), trust_remote_code=cfg.model.trust_remote_code)
        check_data(self.train_split, self.eval_split, self.hf_config, layout.policy)
        prior = build_prior(cfg.loss, model_config=self.hf_config)
        link_terms(cfg.loss)  # the links and their hyperparameters, refused here rather than after the engines
        check_needs(prior, available_inputs(self.train_split, online)
                    | ({"prior_network"} if prior.needs.prior_network else set()))
        if self.seq_groups is not None:
            check_sequence_parallel(cfg, prior, online)

        self.cfg = cfg = self._resolve_auto(cfg)  # before the resume check: it compares the resolved values
        tc = cfg.train
        budget = {}
        if tc.micro_batch_tokens:
            if prior.needs.prior_network:
                raise TrainError("train.micro_batch_tokens with loss.prior=learned: the prior network's engine "
                                 "accumulates a fixed count of micro-batches; set train.micro_batch_tokens=0")
            from midpo.runtime.planning import split_lengths

            budget = {"token_budget": tc.micro_batch_tokens, "lengths": split_lengths(self.train_split.data),
                      "layout": tc.layout}
        from midpo.runtime.seqpar import data_parallel

        # data parallel over SP groups: every rank of a group reads the group's rows (sampler rank = group index)
        dp_world, dp_rank = data_parallel(self.seq_groups, world, rank)
        self.sampler = PairSampler(len(self.train_split), micro_batch_size=tc.micro_batch_size,
                                   grad_accum=tc.grad_accum, world_size=dp_world, rank=dp_rank, seed=tc.seed, **budget)
        self.total_steps = tc.max_steps if tc.max_steps > 0 else tc.epochs * self.sampler.steps_per_epoch
        if self.total_steps <= 0:
            raise TrainError("no optimizer steps to run: set train.max_steps or train.epochs")
        self.inputs = {"data": read_manifest(layout.data).get("fingerprint"), "reference": self.ref_fp}
        ckpt = self._resume_point()

        from midpo.runtime.metrics import resident_bytes

        self.memory_baseline = resident_bytes()  # CPU: the measured peak counts from here (engines and training)
        self._build_engines(prior)
        self._predict_memory()
        attn = self.attn
        data_layout = tc.layout
        if data_layout == "shared" and "flash" in attn:
            raise TrainError(f"train.layout=shared needs a dense attention mask; attention resolves to {attn}, which "
                             "cannot take one: set model.attn_implementation=sdpa, or train.layout=packed or auto "
                             "(flash-attn's packed layout is padding-free already)")
        self.data_layout = data_layout
        self.collate = functools.partial(collate_pairs, layout=data_layout, pad_id=self.pad_id,
                                         max_row_tokens=None if "flash" in attn else DENSE_MASK_ROW_TOKENS,
                                         pad_to_multiple=tc.sequence_parallel)  # rows split evenly over an SP group

        self.logs = layout.logs
        self.metrics_file, self.rows_file = self.logs / "train_metrics.jsonl", self.logs / "consumed_rows.jsonl"
        # every step-keyed log a killed attempt may have written past its checkpoint (metrics.jsonl: report_to jsonl)
        self.step_logs = (self.metrics_file, self.rows_file, self.logs / "metrics.jsonl")
        if ckpt is not None:
            self._load(ckpt)
        else:
            if pdist.is_main():  # a fresh start: lines a killed attempt logged before its first checkpoint go
                for f in self.step_logs:
                    _rewrite_jsonl_upto(f, 0)
            self._probe()
        if pdist.is_main():
            self.logs.mkdir(parents=True, exist_ok=True)
            # this config continues the run (untouched when the values are the same), auto's picks beside it
            record_settings(cfg, layout, {"auto": self.auto_picks} if self.auto_picks else None)
        pdist.barrier()
        return self

    def _resume_point(self) -> Path | None:
        """Collective. `--force`: rank 0 first removes this run's training outputs (train.resume.start_over).
        Then the checkpoint to resume from, checked against this run's config and inputs, or None."""
        from midpo.runtime.checkpoint import CheckpointError, latest_checkpoint
        from midpo.train.resume import check_resume, start_over

        if self.force:
            err = ""
            if pdist.is_main():
                try:
                    removed = start_over(self.layout.run_dir)
                    log.warning("--force: starting %s over from step 0; removed %d training outputs%s",
                                self.layout.run_dir, len(removed),
                                f" ({', '.join(p.name for p in removed[:8])}...)" if removed else "")
                except OSError as e:  # OutputDirError: an export/ midpo did not write; nothing was removed
                    err = str(e)
            if not pdist.all_ranks_true(not err):
                raise TrainError(f"--force: {err or 'rank 0 could not remove the run outputs (see its log)'}")
        ckpt = latest_checkpoint(self.layout.checkpoints)
        if ckpt is not None:
            try:
                accepted = check_resume(ckpt, self.cfg, pdist.world_size(), self.inputs, self.total_steps,
                                        auto=self.auto_picks)
            except CheckpointError as e:
                raise TrainError(str(e)) from None
            if pdist.is_main():
                for line in accepted:
                    log.warning("resuming %s with a change: %s", ckpt.name, line)
        return ckpt

    def _resolve_auto(self, cfg: Config) -> Config:
        """COLLECTIVE. train.layout / train.ds_config `auto` chosen from the plan (runtime.planning.resolve_auto) for
        this model, data, process count and the smallest free memory over ranks; logged with the reason. Rank 0's
        choice is broadcast, so every rank builds the same engine."""
        from midpo.core.plan import GIB, ModelShape
        from midpo.runtime.models import model_class, resolve_attn, resolve_dtype
        from midpo.runtime.planning import (
            data_lengths,
            device_memory_gib,
            host_available_bytes,
            ranks_per_node,
            resolve_auto,
        )

        if cfg.train.layout != "auto" and cfg.train.ds_config != "auto":
            return cfg
        cuda = pdist.device().type == "cuda"
        gib, source = device_memory_gib(cuda)
        # GPUs: the host's memory too (loading, an offloaded optimizer); each node's own, the smallest node's
        gib, host = (min(x) for x in zip(*pdist.all_gather_objects((gib, host_available_bytes() / GIB))))
        choice: tuple | Exception
        if pdist.is_main():
            try:
                dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolve_dtype(cfg.model.dtype), "fp32")
                try:
                    shape = ModelShape.from_hf(self.hf_config.to_dict())
                except KeyError:
                    shape = None
                lengths, _ = data_lengths(self.layout.data, cfg, seed=cfg.train.seed)
                choice = resolve_auto(cfg, shape, lengths, world=pdist.world_size(),
                                      attn=resolve_attn(cfg.model.attn_implementation, self.hf_config), dtype=dtype,
                                      cuda=cuda, device_gib=gib, memory_source=source + ", min over ranks",
                                      dense_mask=model_class(self.hf_config) is not None,
                                      host_gib=host if cuda else None, ranks_per_node=ranks_per_node(),
                                      host_source="host memory available per node (MemAvailable, min over nodes)")
            except MidpoError as e:
                choice = e
            except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, not leave them waiting
                choice = TrainError(f"choosing train.layout / train.ds_config (auto): {type(e).__name__}: {e}")
        else:
            choice = None
        choice = pdist.broadcast_object(choice)
        if isinstance(choice, Exception):
            raise choice
        resolved, self.auto_picks = choice
        if pdist.is_main():
            for key, p in self.auto_picks.items():
                log.info("auto: %s=%s (%s)", key, p["value"], p["reason"])
        return resolved

    def _build_engines(self, prior) -> None:
        """COLLECTIVE: the policy engine (a prior with parameters, SparsePO's mask network, is optimized, clipped,
        scheduled and checkpointed inside it), the frozen online reference, the prior network."""
        from midpo.core.flops import flop_params, frozen_flop_params
        from midpo.core.schedule import make_scheduler
        from midpo.runtime.ds_config import resolve_ds_config
        from midpo.runtime.engine import Engine, PolicyLogps, build_reference_engine
        from midpo.runtime.models import (
            compile_decoder,
            load_model,
            model_fingerprint,
            pad_id_of,
            resolve_attn,
            resolve_dtype,
        )

        cfg, tc, layout = self.cfg, self.cfg.train, self.layout
        self.dtype, self.attn = resolve_dtype(cfg.model.dtype), resolve_attn(cfg.model.attn_implementation, self.hf_config)
        self.ds_config = ds_config = resolve_ds_config(cfg, pdist.world_size(), self.hf_config.hidden_size)
        keep_alive = _zero3_loading(ds_config)  # noqa: F841  (must stay alive while from_pretrained runs)
        model = load_model(layout.policy, cfg.model, device=pdist.device(), train=True)
        peft_model = None
        if cfg.model.lora.enabled:  # adapters in place; only they (requires_grad) reach the optimizer
            from midpo.runtime.lora import apply_lora

            peft_model = apply_lora(model, cfg.model.lora)
        if tc.compile:  # resolve_ds_config refused ZeRO-3 already
            compile_decoder(model)
        install_sp(model, self.seq_groups)
        self.flop_params = flop_params(model)  # MFU's numerator: the head runs on response positions only
        self.frozen_flop_params = frozen_flop_params(model)  # LoRA's base: no weight-gradient matmuls
        has_params = any(p.requires_grad for p in prior.parameters())
        router_coef = router_aux_coef(tc.router_aux_loss_coef, self.hf_config)
        if router_coef and self.seq_groups is not None:
            raise TrainError(f"train.sequence_parallel={tc.sequence_parallel} with a MoE policy's router loss (a loss "
                             "over every token of the row): set train.router_aux_loss_coef=0 or sequence_parallel=1")
        self.policy = Engine.build(
            PolicyLogps(model, prior if has_params else None, head_chunk_tokens=tc.head_chunk_tokens,
                        peft_model=peft_model, router_aux=router_coef > 0, seq_groups=self.seq_groups), ds_config,
            lr_scheduler=lambda opt: make_scheduler(opt, self.total_steps, tc.warmup_ratio, tc.schedule))
        self.pad_id = pad_id_of(model)
        reference = prior_net = None
        base_is_reference = peft_model is not None and model_fingerprint(layout.policy) == self.ref_fp
        if tc.online_reference and not prior.needs.needs_reference:
            log.info("train.online_reference=true but prior %r uses no reference: none is loaded", prior.name)
        elif tc.online_reference and base_is_reference:  # LoRA: the frozen base IS the reference, no second model
            from midpo.runtime.engine import AdapterReference

            reference = AdapterReference(self.policy.ds, return_logits=prior.needs.ref_full_vocab,
                                         return_hidden=prior.needs.ref_hidden_states)
            log.info("online reference: the policy's base with its LoRA adapters disabled (logits %s, hidden states "
                     "%s)", reference.return_logits, reference.return_hidden)
        elif tc.online_reference:  # the frozen reference on its own ZeRO-3 inference engine (policy config - optimizer)
            ref_model = load_model(layout.reference, cfg.model, device=pdist.device())
            install_sp(ref_model, self.seq_groups)
            reference = build_reference_engine(ref_model, ds_config, return_logits=prior.needs.ref_full_vocab,
                                               return_hidden=prior.needs.ref_hidden_states,
                                               head_chunk_tokens=tc.head_chunk_tokens, seq_groups=self.seq_groups)
            log.info("online reference: %s on a ZeRO-3 inference engine (logits %s, hidden states %s)",
                     layout.reference, reference.return_logits, reference.return_hidden)
        if prior.needs.prior_network:  # MI-DPO proper: the prior network on its own engine
            from midpo.train.prior_engine import build_prior_network

            init = layout.reference if cfg.prior_net.init == "reference" else Path(cfg.prior_net.init)
            prior_net = build_prior_network(cfg, init_path=init, policy_config=self.hf_config,
                                            world_size=pdist.world_size(), pad_id=self.pad_id, beta=prior.beta)
        self.obj = Objective(prior, cfg.loss, reference=reference, prior_net=prior_net, router_aux_coef=router_coef,
                             seq_groups=self.seq_groups)

    def _predict_memory(self) -> None:
        """midpo plan's peak memory per device for this run, logged beside the measured one at the first steps."""
        from midpo.runtime.planning import predicted_peak

        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")
        try:
            self.predicted_peak, terms = predicted_peak(
                self.cfg, self.ds_config, self.hf_config.to_dict(), self.layout.data, world=pdist.world_size(),
                attn=self.attn, dtype=dtype, cuda=pdist.device().type == "cuda")
        except KeyError as e:  # a config without Llama's field names: the plan models Llama-shaped decoders only
            self.predicted_peak = 0.0
            if pdist.is_main():
                log.info("plan: no memory prediction for model type %r (no %s in its config)",
                         getattr(self.hf_config, "model_type", "?"), e)
            return
        if pdist.is_main():
            log.info("plan: predicted peak %.1f MiB per device (%s)", self.predicted_peak / 2 ** 20,
                     ", ".join(f"{k} {v / 2 ** 20:.0f}" for k, v in terms.items() if v))

    def _log_memory(self, step: int) -> None:
        """COLLECTIVE: the largest measured peak over ranks beside the plan's prediction (steps 1-3)."""
        from midpo.runtime.metrics import peak_memory_bytes

        measured = pdist.all_max(peak_memory_bytes(pdist.device(), self.memory_baseline))
        if pdist.is_main() and self.predicted_peak:
            what = "max_memory_allocated" if pdist.device().type == "cuda" else "resident high-water mark - baseline"
            log.info("step %d: peak memory %.1f MiB measured (%s, max over ranks), %.1f MiB predicted by midpo plan "
                     "(%+.0f%%)", step, measured / 2 ** 20, what, self.predicted_peak / 2 ** 20,
                     100 * (self.predicted_peak / measured - 1) if measured else 0.0)

    def engines(self) -> dict:
        """What a checkpoint holds (runtime.checkpoint.save_checkpoint's names)."""
        out = {"policy": self.policy}
        if self.obj.prior_net is not None:
            out["prior"] = self.obj.prior_net.engine
        return out

    def _load(self, ckpt: Path) -> None:
        from midpo.runtime.checkpoint import load_checkpoint

        saved = load_checkpoint(ckpt, self.engines())
        self.sampler.load_state_dict(saved["sampler"])
        for k in COUNTERS:
            setattr(self.state, k, int(saved[k]))
        self.state.eval_history = saved.get("eval_history", [])
        if self.obj.prior_net is not None:
            self.obj.prior_net.load_state_dict(saved["prior"])
        try:
            self.obj.load_state_dict(saved.get("links", {}))  # bco_pair's running reward mean
        except ValueError as e:
            raise TrainError(f"{ckpt}: {e}") from None
        self.resumed_step = self.state.step
        if pdist.is_main():
            for f in self.step_logs:
                _rewrite_jsonl_upto(f, self.state.step)
        log.info("resumed from %s at step %d (%d samples consumed)", ckpt, self.state.step,
                 self.state.consumed_samples)

    def _probe(self) -> None:
        """Re-score `train.probe_rows` cached rows with the policy when it starts as the reference; stop with a
        diagnosis when they differ from the cache."""
        from midpo.runtime.models import model_fingerprint

        tc = self.cfg.train
        if tc.online_reference:
            log.info("start-of-run probe skipped (online reference: no cache to check)")
            return
        lora = self.cfg.model.lora
        if lora.enabled and lora.init_weights not in (True, "gaussian"):
            log.info("start-of-run probe skipped (model.lora.init_weights=%s: the adapters change the start)",
                     lora.init_weights)
            return
        if tc.probe_rows <= 0 or model_fingerprint(self.layout.policy) != self.ref_fp:
            log.info("start-of-run probe skipped (%s)", "train.probe_rows=0" if tc.probe_rows <= 0
                     else "the policy does not start from the reference weights")
            return
        stats = probe_reference(self.policy, self.train_split, tc.probe_rows, self.collate)
        tol = tc.probe_tolerance or (1e-4 if self.dtype == torch.float32 else 2e-2)
        stats["tolerance"] = tol
        if not stats["mean_abs_diff"] <= tol:
            ours = {"dtype": str(self.dtype).removeprefix("torch."), "attn_implementation": self.attn}
            differ = [f"{k}: cache {self.cache_manifest.get(k)} vs training {v}" for k, v in ours.items()
                      if self.cache_manifest.get(k) != v]
            raise TrainError(
                f"start-of-run probe failed: the policy starts from the reference weights, yet its log-probs on "
                f"{stats['rows']} cached rows differ from the cache (mean |diff| {stats['mean_abs_diff']:.3g} per "
                f"token, max {stats['max_abs_diff']:.3g}, tolerance {tol:.3g}). Likely causes: a different tokenizer "
                "or chat template than the data was built with; another dtype or attention implementation than the "
                "cache (" + ("; ".join(differ) if differ else "these match") + "); a cache built from other weights; "
                "packed-sequence masking not isolating sequences. Rebuild the cache with the training settings "
                "(`midpo ref`), or raise train.probe_tolerance if the difference is expected.")
        log.info("start-of-run probe passed: %s", stats)

    # -----------------------------------------------------------------------------------------
    # the loop

    def fit(self) -> dict:
        from midpo.config import flat_items
        from midpo.runtime.metrics import MetricSums, measure_peak_flops
        from midpo.runtime.profiling import StepProfiler
        from midpo.runtime.trackers import Trackers

        tc, st, sampler = self.cfg.train, self.state, self.sampler
        world = pdist.world_size()
        peak = tc.peak_flops or measure_peak_flops(self.dtype, pdist.device(), seconds=0.5)
        # train.report_to: TensorBoard, jsonl, W&B, MLflow; rank 0 only, the same names in each
        self.tb = Trackers.open(tc.report_to, run_dir=self.layout.run_dir, logs=self.logs,
                                tensorboard=self.layout.tensorboard, params=flat_items(self.cfg)) \
            if pdist.is_main() else Trackers([])
        if pdist.is_main():
            log.info("train: %d rows, %d steps (%d per epoch, global batch %d = micro %d x accum %d x world %d), "
                     "%d tail rows dropped per epoch; eval: %d rows; layout %s, attn %s, %s; peak %.3g FLOP/s per "
                     "rank", len(self.train_split), self.total_steps, sampler.steps_per_epoch, sampler.global_batch,
                     tc.micro_batch_size, tc.grad_accum, world, sampler.dropped_per_epoch,
                     len(self.eval_split) if self.eval_split else 0, self.data_layout, self.attn, self.dtype, peak)
        stop = _StopFlag()
        stop.install()
        bar = None
        if pdist.is_main():
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=st.step, unit="step", dynamic_ncols=True, desc="train")
        names = [*self.obj.metric_names, "grad_norm", "lr"]
        if self.obj.router_aux_coef:
            names.append(ROUTER_METRIC)  # training steps only (evaluation scores without it)
        if self.obj.prior_net is not None:
            names += list(self.obj.prior_net.METRIC_NAMES)
        sums, window = MetricSums(), dict.fromkeys((*BATCH_COUNTS, "time"), 0.0)
        stopped_early = False
        profiler = StepProfiler(self.logs, pdist.rank(), tc.profile_steps)
        while st.step < self.total_steps:
            t0 = time.perf_counter()
            profiler.begin(st.step + 1)
            epoch_before = sampler.state.epoch
            micro_rows = sampler.next_step()
            if sampler.state.epoch != epoch_before:
                st.dropped_tail_rows += sampler.dropped_per_epoch
                if pdist.is_main() and sampler.dropped_per_epoch:
                    log.info("epoch %d done: %d tail rows dropped (incomplete global batch)", epoch_before,
                             sampler.dropped_per_epoch)
            micro_batches = (make_micro_batch(self.train_split, idx, self.collate, pdist.device())
                             for idx in micro_rows)
            res = train_step(self.policy, self.obj, micro_batches, st.step + 1, callbacks=self.callbacks,
                             global_pairs=sampler.global_batch if tc.micro_batch_tokens else 0)
            if res.skipped:
                st.bad_steps_total += 1
                st.bad_steps_in_a_row += 1
                log.warning("step %d: non-finite loss on some rank; optimizer step skipped (%d in a row, %d total)",
                            st.step + 1, st.bad_steps_in_a_row, st.bad_steps_total)
                if st.bad_steps_in_a_row >= tc.max_bad_steps:
                    raise TrainError(f"{st.bad_steps_in_a_row} consecutive non-finite steps (train.max_bad_steps="
                                     f"{tc.max_bad_steps}); lower train.lr, check the data, or use fp32")
            else:
                st.bad_steps_in_a_row = 0
            for name, (total, count) in res.sums.items():
                sums.add(name, total, count)
            for k, v in res.counts.items():
                window[k] += v
            st.step += 1
            st.consumed_samples += sampler.global_batch
            if st.step - max(self.resumed_step, 0) <= 3:
                self._log_memory(st.step)
            t1 = time.perf_counter()
            window["time"] += t1 - t0

            if tc.record_rows:
                self._record_rows(res.ids, res.skipped)
            if st.step % tc.log_every == 0 or st.step == self.total_steps:
                # a window of only skipped steps has no samples: leave those metrics out rather than log NaN
                vals = {k: v for k, v in sums.reduce(names).items() if not math.isnan(v)}
                *tot, stop_votes = pdist.all_reduce_sum([window[k] for k in BATCH_COUNTS] + [float(stop.requested)])
                vals.update(self._throughput(dict(zip(BATCH_COUNTS, tot)), window["time"], peak))
                self._log(vals, bar)
                sums.reset()
                window = dict.fromkeys(window, 0.0)
                stopped_early = stop_votes > 0
            if bar is not None:
                bar.update(1)
            # row records, metric reduction and logging are per-step costs too (counted in the next window);
            # eval and checkpoints are not
            window["time"] += time.perf_counter() - t1
            profiler.end(st.step)

            if tc.eval_every and st.step % tc.eval_every == 0 and st.step < self.total_steps:
                self._eval()
            if stopped_early or (tc.save_every and st.step % tc.save_every == 0 and st.step < self.total_steps):
                self._checkpoint()
            for cb in self.callbacks:
                cb.on_step_end(st.step)
            if stopped_early:
                log.warning("stop requested (signal): checkpointed at step %d, exiting", st.step)
                break
        if bar is not None:
            bar.close()
        last_eval = None if stopped_early else self._finish()
        summary = {"step": st.step, "bad_steps_total": st.bad_steps_total, "eval": last_eval,
                   "dropped_tail_rows": st.dropped_tail_rows, "stopped_early": stopped_early}
        if pdist.is_main():
            if tc.compile:
                from midpo.runtime.models import compile_stats

                log.info("torch.compile: %s", compile_stats())
            log.info("done: %s", summary)
        return summary

    def _finish(self) -> dict | None:
        """The end of a run: final eval, checkpoint, export. A relaunch of a finished run does none of them again
        (no second final eval, no rewrite of the checkpoint it loaded or of an export that holds this step)."""
        st, tc = self.state, self.cfg.train
        if st.eval_history and st.eval_history[-1]["step"] == st.step:
            last_eval = {k: v for k, v in st.eval_history[-1].items() if k != "step"}
        else:
            last_eval = self._eval()
        if st.step > self.resumed_step:
            self._checkpoint()
        if tc.export_at_end and not (st.step == self.resumed_step and self._export_done()):
            self._export()
        elif tc.export_at_end and pdist.is_main():
            log.info("%s already holds step %d: not rewritten", self.layout.export, st.step)
        return last_eval

    def close(self) -> None:
        tb = getattr(self, "tb", None)
        if tb is not None:
            tb.close()

    # -----------------------------------------------------------------------------------------
    # pieces of the loop

    def _throughput(self, counts: dict, seconds: float, peak: float) -> dict[str, float]:
        """tokens/s, pairs/s, padding and MFU of a window (counts summed over ranks; ranks run in lockstep, so
        rank 0's wall time is the window's)."""
        from midpo.core.flops import train_flops

        flops = train_flops(*self.flop_params, self.hf_config.num_hidden_layers, self.hf_config.hidden_size,
                            counts["tokens"], counts["logit_tokens"], counts["attn"], *self.frozen_flop_params)
        dt, world = seconds, pdist.world_size()
        return {"tokens_per_s": counts["tokens"] / dt if dt else 0.0, "pairs_per_s": counts["pairs"] / dt if dt else 0.0,
                "padding_fraction": counts["pad"] / counts["slots"] if counts["slots"] else 0.0,
                "mfu": flops / dt / (peak * world) if dt else 0.0}

    def _log(self, vals: dict, bar) -> None:
        self.tb.scalars(vals, self.state.step, prefix="train/")
        if pdist.is_main():
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.state.step, "bad_steps_total": self.state.bad_steps_total, **vals})
                        + "\n")
            bar.set_postfix(loss=f"{vals.get('loss', float('nan')):.4f}",
                            acc=f"{vals.get('rewards/accuracies', float('nan')):.2f}",
                            pairs_s=f"{vals['pairs_per_s']:.1f}", mfu=f"{vals['mfu']:.0%}")

    def _record_rows(self, ids: list[list[str]], skipped: bool) -> None:
        """Append this step's row ids in global-batch order ((micro-step k, rank r) slices, as the sampler cuts
        them) to logs/consumed_rows.jsonl. Collective."""
        per_rank = pdist.gather_objects(ids)
        if pdist.is_main():
            per_rank = per_rank[:: self.cfg.train.sequence_parallel]  # one rank per SP group (consecutive ranks)
            ordered = [i for k in range(len(per_rank[0])) for r in per_rank for i in r[k]]
            with open(self.rows_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.state.step, "skipped": skipped, "ids": ordered}) + "\n")

    def _eval(self) -> dict | None:
        if self.eval_split is None or len(self.eval_split) == 0:
            return None
        res = evaluate(self.policy, self.obj, self.eval_split, self.cfg.train.micro_batch_size, self.collate)
        self.tb.scalars(res, self.state.step, prefix="eval/")
        self.state.eval_history.append({"step": self.state.step, **res})
        if pdist.is_main():
            log.info("eval @ step %d: %s", self.state.step, " ".join(f"{k}={v:.4f}" for k, v in res.items()))
        return res

    def _trainer_state(self) -> dict:
        st = self.state
        out = {k: getattr(st, k) for k in COUNTERS}
        out.update(sampler=self.sampler.state_dict(), world_size=pdist.world_size(), eval_history=st.eval_history,
                   total_steps=self.total_steps, inputs=self.inputs)
        if self.obj.prior_net is not None:
            out["prior"] = self.obj.prior_net.state_dict()
        if self.obj.state_dict():
            out["links"] = self.obj.state_dict()
        return out

    def _checkpoint(self) -> None:
        from midpo.runtime.checkpoint import save_checkpoint

        if not pdist.all_ranks_true(all(e.params_finite() for e in self.engines().values())):
            raise TrainError(f"step {self.state.step}: parameters are not finite; refusing to checkpoint this state")
        save_checkpoint(self.layout.checkpoints, self.state.step, self.engines(), self._trainer_state(), self.cfg,
                        keep_last=self.cfg.train.keep_last)

    def _export(self) -> None:
        """COLLECTIVE: <run_dir>/export (the policy), then <run_dir>/export/prior (the prior network)."""
        from midpo.config import parse_size
        from midpo.runtime.export import export_engine

        kw = {"dtype": self.dtype, "tokenizer_dir": self.layout.tokenizer, "step": self.state.step,
              "max_shard_bytes": parse_size(self.cfg.export.max_shard_size, "export.max_shard_size")}
        if self.cfg.model.lora.enabled:  # the adapters (PEFT's folder) and, with export.merge_lora, export/merged
            from midpo.runtime.export import gather_engine_state_dict
            from midpo.runtime.lora import write_lora_export

            sd = gather_engine_state_dict(self.policy, trainable_only=True)
            if pdist.is_main():
                write_lora_export(sd, self.cfg, base_dir=self.layout.policy, out=self.layout.export,
                                  tokenizer_dir=self.layout.tokenizer, step=self.state.step)
            pdist.barrier()
        else:
            export_engine(self.policy, self.layout.export, source_dir=self.layout.policy, **kw)
        if self.obj.prior_net is not None:  # after the policy: its folder is replaced as a whole
            export_engine(self.obj.prior_net.engine, self.layout.export / "prior", source_dir=None, **kw)

    def _export_done(self) -> bool:
        """<run_dir>/export already holds this step's weights (its output marker says so), with the prior's folder
        when there is a prior network."""
        out = self.layout.export
        try:
            marker = json.loads((out / OUTPUT_MARKER).read_text())
        except (OSError, ValueError):
            return False
        merged = self.cfg.model.lora.enabled and self.cfg.export.merge_lora
        return marker.get("step") == self.state.step and (
            self.obj.prior_net is None or (out / "prior" / OUTPUT_MARKER).is_file()) and (
            not merged or (out / "merged" / OUTPUT_MARKER).is_file())


# ---------------------------------------------------------------------------------------------
# start-up checks and small helpers


ONLINE_REFERENCE_INPUTS = frozenset({"ref_seq_logps", "ref_token_logps", "ref_full_vocab", "ref_hidden_states",
                                     "policy_full_vocab"})


def available_inputs(split, online_reference: bool = False) -> set[str]:
    """Availability keys (midpo.core.priors.AVAILABLE_KEYS) the cache of `split` (or the online reference) serves."""
    if online_reference:  # the reference runs beside the policy: log-probs, full-vocab logits, hidden states
        return set(ONLINE_REFERENCE_INPUTS) | ({"token_weights"} if split.weights is not None else set())
    a = {"ref_seq_logps", "ref_token_logps"}
    if split.weights is not None:
        a.add("token_weights")
    if {"chosen_ref_topk_logps", "rejected_ref_topk_logps"} <= set(split.cache_columns):
        a |= {"ref_topk", "policy_full_vocab"}  # the trainer asks the policy forward for logits then
    return a


def sequence_groups(size: int, world: int):
    """COLLECTIVE: the SP groups of train.sequence_parallel (runtime.seqpar), or None when it is 1."""
    from midpo.runtime.seqpar import setup_groups

    if world % size:
        raise TrainError(f"train.sequence_parallel={size} must divide the number of processes ({world})")
    return setup_groups(size)


def check_sequence_parallel(cfg: Config, prior, online: bool) -> None:
    """What sequence parallelism does not serve, refused before any engine: its forward returns per-token log-probs
    only (the head runs on each rank's own positions), so no full-vocab logits or hidden states (TDPO, SparsePO,
    the top-k cache's KL), no MI-DPO prior network (its own forward on whole rows), no MoE router loss, no compile."""
    tc, k = cfg.train, cfg.train.sequence_parallel
    needs = prior.needs
    why = None
    if needs.prior_network:
        why = "loss.prior=learned (MI-DPO's prior network runs its own forward on whole rows)"
    elif needs.policy_full_vocab or (online and (needs.ref_full_vocab or needs.ref_hidden_states)):
        why = f"loss.prior={prior.name} (it reads full-vocab logits or hidden states; SP returns per-token log-probs)"
    elif tc.router_aux_loss_coef:
        why = "train.router_aux_loss_coef (a MoE router loss over every token of the row)"
    elif tc.compile:
        why = "train.compile (the all-to-all around attention is not traced)"
    if why:
        raise TrainError(f"train.sequence_parallel={k} does not support {why}: set train.sequence_parallel=1")


def install_sp(model, seq_groups) -> None:
    """The all-to-all attention of runtime.seqpar on `model` (nothing without SP); a refusal as a TrainError."""
    if seq_groups is None:
        return
    from midpo.runtime.seqpar import install

    try:
        install(model, seq_groups)
    except ValueError as e:
        raise TrainError(str(e)) from None


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


def _rewrite_jsonl_upto(path: Path, step: int) -> None:
    """Keep lines with step <= `step`: a killed run may have logged steps past its last checkpoint."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))
