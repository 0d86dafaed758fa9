"""The MI-DPO engine hook (midpo.runtime.engine.TrainHook): the learnable prior on its own engine.

Per training micro-step, ``before_loss(batch, policy_out)``:
  1. one prior forward (the prior's batch, midpo.core.prior_net.prior_batch) -> per-token log zeta,
     returned DETACHED as ``{"prior_logps": SidePair}`` for PriorInputs (the ``learned`` prior);
  2. when a prior update is due at this step: the prior objective (``marginal``: KL(sg pi || zeta)
     from the policy logits of the SAME policy forward; ``joint``: MI-DPO loss w.r.t. zeta + anchor),
     an all-ranks finiteness vote, ``engine.backward`` and, except on the last micro-step, the
     non-boundary ``engine.step()`` (DeepSpeed's accumulation protocol, as the trainer does it).
  The prior's gradient is taken right there, from the forward that produced log zeta: no second
  prior forward, and no policy logits kept past the micro-step.
``after_step(step, ...)``: the prior's optimizer step at the accumulation boundary (or a skipped
step when a prior loss was non-finite on any rank); returns this step's metrics as name ->
float64 [sum, count] (as LossOutput.metrics()).

Collectives: every rank calls before_loss / after_step the same number of times (the trainer's
contract), every decision (update due, skip) depends only on the step and on all-reduced votes, so
all ranks run the same ZeRO-3 gathers/reductions in the same order. Eval forwards (grad disabled)
only compute log zeta.

Build: ``build_midpo_hook(cfg, ...)`` (DeepSpeed, config from engine.resolve_ds_config) or
``torch_hook(...)`` (plain PyTorch, one process: tests and debugging).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from midpo.config import Config, PriorNetConfig
from midpo.core.batching import row_tokens_for
from midpo.core.logprobs import ResponseLogps
from midpo.core.prior_net import (
    PriorLM,
    check_vocab,
    flat_getter,
    joint_objective,
    marginal_objective,
    prior_batch,
    side_getter,
    truncate_layers,
    validate,
    warmup_lambda,
)
from midpo.runtime import dist as pdist

log = logging.getLogger(__name__)

CKPT_TAG = "prior"
METRIC_NAMES = ("prior/kl_policy", "prior/nll", "prior/entropy", "mi/estimate", "prior/lr", "prior/loss",
                "prior/skipped")


class TorchEngine:
    """Plain-PyTorch stand-in for a DeepSpeed engine (one process): the same call protocol
    (engine(...), backward(loss) scaled by 1/accumulation, step() every micro-step with the optimizer
    step at the boundary, get_lr, micro_steps, save/load_checkpoint(dir, tag))."""

    def __init__(self, module: torch.nn.Module, *, lr: float, warmup_steps: int = 0, grad_accum: int = 1,
                 max_grad_norm: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8):
        self.module = module
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, betas=betas,
                                           eps=eps, weight_decay=0.0)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(warmup_steps))
        self.gradient_accumulation_steps = grad_accum
        self.max_grad_norm = max_grad_norm
        self.micro_steps = 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gradient_accumulation_steps).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.gradient_accumulation_steps == 0:
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.lr_scheduler.state_dict(), "micro_steps": self.micro_steps},
                   d / "torch_engine.pt")

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any):
        f = Path(load_dir) / tag / "torch_engine.pt"
        if not f.exists():
            return None, None
        s = torch.load(f, weights_only=True)
        self.module.load_state_dict(s["module"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.lr_scheduler.load_state_dict(s["lr_scheduler"])
        self.micro_steps = int(s["micro_steps"])
        return str(f), {}


class MIDPOHook:
    """TrainHook for ``loss.prior=learned``. ``engine``: DeepSpeed engine (or TorchEngine) around a
    PriorLM; ``init_engine``: frozen PriorLM of the initialization (only for joint + kl_init)."""

    def __init__(self, engine, cfg: PriorNetConfig, *, beta: float, grad_accum: int, pad_id: int,
                 bos_id: int | None, init_engine=None, init_path: str | Path | None = None):
        validate(cfg)
        if cfg.objective == "joint" and cfg.anchor == "kl_init" and cfg.anchor_weight and init_engine is None:
            raise ValueError("prior_net.anchor=kl_init needs the frozen initial prior (init_engine)")
        self.engine, self.init_engine, self.cfg = engine, init_engine, cfg
        self.beta, self.grad_accum, self.pad_id, self.bos_id = float(beta), int(grad_accum), pad_id, bos_id
        self.init_path = init_path
        self.step = 0  # last finished policy step
        self.updates = 0  # prior optimizer steps taken
        self._reset_step()
        self._sums: dict[str, list[float]] = {}

    @property
    def needs_policy_logits(self) -> bool:
        """The prior's objective reads the policy's logits (on update steps, see policy_logits_due)."""
        return self.cfg.objective == "marginal"

    def policy_logits_due(self, step: int) -> bool:
        """The trainer runs the policy forward of policy step ``step`` (1-based) with return_flat_logits when
        true: the marginal objective at an update step. Other steps (and eval) need no policy logits; the
        ``prior/kl_policy`` metric is then logged on update steps only. Depends on the step alone, so every
        rank makes the same choice (it changes the number of head calls, each a ZeRO-3 gather)."""
        return self.needs_policy_logits and self.update_due(step)

    @property
    def module(self) -> PriorLM:
        return self.engine.module

    def update_due(self, step: int) -> bool:
        """Prior update at policy step ``step`` (1-based): after start_step, every update_every-th step."""
        k = step - self.cfg.start_step
        return k >= 1 and (k - 1) % self.cfg.update_every == 0

    def _reset_step(self) -> None:
        self._micro = self._engine_steps = 0
        self._bad = self._updating = False

    def _add(self, name: str, total: float, count: float) -> None:
        s = self._sums.setdefault(name, [0.0, 0.0])
        s[0] += float(total)
        s[1] += float(count)

    def prior_batch(self, batch):
        return prior_batch(batch, condition_on_prompt=self.cfg.condition_on_prompt, bos_id=self.bos_id,
                           pad_id=self.pad_id, max_row_tokens=row_tokens_for(self.module))

    # -- TrainHook -----------------------------------------------------------------------------

    def before_loss(self, batch, policy_out: ResponseLogps) -> dict[str, Any]:
        from midpo.core.priors import SidePair

        training = torch.is_grad_enabled() and policy_out.chosen.requires_grad
        update = training and self.update_due(self.step + 1)
        pb = self.prior_batch(batch)
        flat = policy_out.logits  # (N, V) detached, in the policy batch's token order == the prior batch's
        has_logits = flat is not None or (policy_out.chosen_logits is not None
                                          and policy_out.rejected_logits is not None)
        if update and self.cfg.objective == "marginal" and not has_logits:
            raise ValueError("prior_net.objective=marginal needs the policy logits: run the policy forward with "
                             "return_flat_logits=True (MIDPOHook.policy_logits_due)")
        has_logits = has_logits and training  # eval: log zeta only, no KL to compute
        getters = []
        if has_logits:
            getters.append(flat_getter(flat) if flat is not None
                           else side_getter(policy_out.chosen_logits, policy_out.rejected_logits, pb))
        use_init = update and self.cfg.objective == "joint" and self.cfg.anchor == "kl_init" and self.cfg.anchor_weight
        if use_init:
            with torch.no_grad():
                (init_logits,) = self.init_engine(pb, return_logits=True)
            getters.append(flat_getter(init_logits))
        with torch.set_grad_enabled(update):
            logp, ent, *kls = self.engine(pb, tuple(getters), fused=self.cfg.objective == "marginal")

        if update:
            if self.cfg.objective == "marginal":
                loss = marginal_objective(kls[0], pb)
            else:
                anchor = kls[-1] if use_init else -logp  # per token: KL(init || zeta) or NLL
                loss = joint_objective(policy_out, logp, pb, beta=self.beta, anchor=anchor,
                                       anchor_weight=self.cfg.anchor_weight)
            self._micro += 1
            self._updating = True
            if pdist.all_ranks_true(bool(torch.isfinite(loss)) and not self._bad):
                self.engine.backward(loss)
                if self._micro < self.grad_accum:
                    self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
                    self._engine_steps += 1
                self._add("prior/loss", float(loss.detach()) * pb.num_pairs, pb.num_pairs)
            else:
                self._bad = True  # every rank agrees: no more prior backward this step

        zeta = ResponseLogps.from_flat(logp.detach(), pb)
        if training:
            n = float(logp.numel())
            self._add("prior/nll", -float(logp.detach().double().sum()), n)
            self._add("prior/entropy", float(ent.detach().double().sum()), n)
            if has_logits:
                self._add("prior/kl_policy", float(kls[0].detach().double().sum()), n)
            pol = torch.cat([policy_out.chosen_sum, policy_out.rejected_sum]).detach().double()
            zs = torch.cat([zeta.chosen_sum, zeta.rejected_sum]).double()
            self._add("mi/estimate", float((pol - zs).sum()), float(pol.numel()))
        return {"prior_logps": SidePair(zeta.chosen, zeta.rejected)}

    def after_step(self, step: int, batch=None, policy_out=None) -> dict[str, torch.Tensor]:
        if self._updating:
            if self._micro != self.grad_accum:
                raise RuntimeError(f"MIDPOHook: {self._micro} training before_loss calls in step {step}, expected "
                                   f"train.grad_accum={self.grad_accum} (the prior engine's accumulation would desync)")
            self._add("prior/lr", self.engine.get_lr()[0], 1)
            if self._bad:
                # as the trainer's skipped step: drop the partial gradients, move to the next boundary
                self.engine.optimizer.zero_grad(set_to_none=True)
                self.engine.micro_steps += self.grad_accum - self._engine_steps
                self._add("prior/skipped", 1, 1)
                log.warning("step %d: non-finite prior loss on some rank; prior update skipped", step)
            else:
                self.engine.step()  # boundary: clip, optimizer, lr schedule
                self.updates += 1
                self._add("prior/skipped", 0, 1)
        self.step = step
        self._reset_step()
        out = {k: torch.tensor(v, dtype=torch.float64) for k, v in self._sums.items()}
        self._sums = {}
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.step, self.updates = int(state["step"]), int(state["updates"])

    def save_checkpoint(self, ckpt_dir: Path) -> None:
        """Collective: the prior engine (weights, optimizer, lr schedule) under <ckpt_dir>/prior, plus the
        prior's HF config and hook state (rank 0), so offline export and resume need nothing else."""
        ckpt_dir = Path(ckpt_dir)
        self.engine.save_checkpoint(str(ckpt_dir), tag=CKPT_TAG, save_latest=False)
        if pdist.is_main():
            self.module.config.save_pretrained(str(ckpt_dir / "prior_hf_config"))
            (ckpt_dir / "prior_state.json").write_text(json.dumps(self.state_dict()))

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        """Collective. Through midpo.runtime.checkpoint.load_engine: safe loading, another process count supported."""
        from midpo.runtime.checkpoint import load_engine

        ckpt_dir = Path(ckpt_dir)
        load_path = load_engine(self.engine, ckpt_dir, CKPT_TAG)
        if load_path is None:
            raise RuntimeError(f"no prior checkpoint in {ckpt_dir}/{CKPT_TAG} (was the run trained with "
                               "loss.prior=learned?)")
        self.load_state_dict(json.loads((ckpt_dir / "prior_state.json").read_text()))
        self._reset_step()

    # -- export ------------------------------------------------------------------------------------

    def export(self, cfg: Config, out_dir: str | Path | None = None) -> Path:
        """COLLECTIVE: the live prior as a HF folder (default <run_dir>/export/prior), written by rank 0."""
        from midpo.runtime.export import gather_engine_state_dict, write_hf_folder
        from midpo.runtime.models import resolve_dtype

        out = Path(out_dir) if out_dir else cfg.run_path / "export" / "prior"
        if isinstance(self.engine, TorchEngine):
            sd = {k: v.detach().cpu().clone() for k, v in self.module.model.state_dict().items()}
        else:
            sd = gather_engine_state_dict(self.engine)
        if pdist.is_main():
            write_hf_folder(sd, copy.deepcopy(self.module.config), out, dtype=resolve_dtype(cfg.model.dtype),
                            tokenizer_dir=_tokenizer_dir(cfg), source_dir=self.init_path)
        pdist.barrier()
        return out


def _tokenizer_dir(cfg: Config):
    from midpo.runtime.export import tokenizer_path

    try:
        return tokenizer_path(cfg)
    except FileNotFoundError:
        return None


def export_prior_from_checkpoint(ckpt_dir: str | Path, cfg: Config, out_dir: str | Path | None = None) -> Path:
    """One process, no collectives: merge <ckpt_dir>/prior's ZeRO shards (fp32) and write a HF folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig

    from midpo.runtime.checkpoint import safe_torch_load
    from midpo.runtime.export import write_hf_folder
    from midpo.runtime.models import resolve_dtype

    ckpt = Path(ckpt_dir)
    with safe_torch_load():  # zero_to_fp32 unpickles with weights_only=False: route it through the allow-list
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=CKPT_TAG)
    hf_config = AutoConfig.from_pretrained(str(ckpt / "prior_hf_config"))
    out = Path(out_dir) if out_dir else cfg.run_path / "export" / "prior"
    return write_hf_folder(sd, hf_config, out, dtype=resolve_dtype(cfg.model.dtype), tokenizer_dir=_tokenizer_dir(cfg),
                           source_dir=None)


# ---------------------------------------------------------------------------------------------
# construction


def _bos(cfg: PriorNetConfig, model) -> int | None:
    return cfg.bos_token_id if cfg.bos_token_id is not None else getattr(model.config, "bos_token_id", None)


def torch_hook(prior_model: torch.nn.Module, cfg: PriorNetConfig, *, beta: float, pad_id: int, grad_accum: int = 1,
               init_model: torch.nn.Module | None = None, max_grad_norm: float = 0.0) -> MIDPOHook:
    """One-process hook on plain PyTorch (AdamW + warmup). ``prior_model`` is trained in place;
    ``init_model`` (joint + kl_init): a frozen copy of its initialization."""
    engine = TorchEngine(PriorLM(prior_model, cfg.chunk_size), lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                         grad_accum=grad_accum, max_grad_norm=max_grad_norm)
    init = None
    if init_model is not None:
        init_model.requires_grad_(False)
        init = PriorLM(init_model.eval(), cfg.chunk_size)
    return MIDPOHook(engine, cfg, beta=beta, grad_accum=grad_accum, pad_id=pad_id, bos_id=_bos(cfg, prior_model),
                     init_engine=init)


def prior_ds_config(cfg: Config, world_size: int, hidden_size: int) -> dict:
    """The prior engine's DeepSpeed config: the trainer's own resolution (engine.resolve_ds_config) with
    the prior's lr, no weight decay, and ZeRO stage prior_net.zero_stage. Same micro-batch and
    accumulation as the policy: the prior steps once per policy step. train.compile is the policy's (the
    prior is not compiled), so it does not constrain the prior's stage."""
    from midpo.runtime.engine import resolve_ds_config

    pcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.prior_net.lr, weight_decay=0.0,
                                                              compile=False))
    return resolve_ds_config(pcfg, world_size, hidden_size, stage=cfg.prior_net.zero_stage)


def build_midpo_hook(cfg: Config, *, reference_path: str | Path, policy_config, world_size: int, pad_id: int,
                     beta: float) -> MIDPOHook:
    """COLLECTIVE (deepspeed.initialize): load the prior (reference or prior_net.init, first k layers),
    wrap it in its own DeepSpeed engine; for joint + kl_init also a frozen engine of the init."""
    import deepspeed

    from midpo.runtime.engine import inference_ds_config
    from midpo.runtime.models import load_model

    pn = cfg.prior_net
    validate(pn)
    init_path = Path(reference_path) if pn.init == "reference" else Path(pn.init)

    def load():
        # loaded from disk each time (no deepcopy): under an active zero.Init the params are partitioned
        m = load_model(init_path, cfg.model, device=pdist.device(), train=True)
        if pn.num_layers:
            truncate_layers(m, pn.num_layers)
        return m

    model = load()
    check_vocab(model.config, policy_config)
    ds = prior_ds_config(cfg, world_size, model.config.hidden_size)
    engine, _, _, _ = deepspeed.initialize(
        model=PriorLM(model, pn.chunk_size), model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(pn.warmup_steps)))
    init_engine = None
    if pn.objective == "joint" and pn.anchor == "kl_init" and pn.anchor_weight:
        frozen = load().requires_grad_(False).eval()
        init_engine, _, _, _ = deepspeed.initialize(model=PriorLM(frozen, pn.chunk_size),
                                                    config=inference_ds_config(ds))
        init_engine.eval()
    log.info("prior network: %s, %d layers, objective %s, ZeRO stage %d", init_path, model.config.num_hidden_layers,
             pn.objective, pn.zero_stage)
    return MIDPOHook(engine, pn, beta=beta, grad_accum=cfg.train.grad_accum, pad_id=pad_id, bos_id=_bos(pn, model),
                     init_engine=init_engine, init_path=init_path)
