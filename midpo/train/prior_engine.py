"""MI-DPO proper: the learnable prior network on its own engine, stepped by the training loop in plain sight.

The loop (midpo.train.step.train_step) does, per micro-step of an optimizer step at which the prior updates:

    zeta, prior_loss = prior_net.forward(batch, policy_out, update=True)   # log zeta (detached) + objective
    ... the policy's loss takes zeta as its prior; one finiteness vote covers both losses ...
    prior_net.engine.backward(prior_loss)

and at the boundary `prior_net.engine.step()` (or `.skip()` when the prior's loss was not finite on some rank),
then `prior_net.end_step(...)`. The prior's gradient comes from the same forward that gave log zeta: no second
prior forward, and no policy logits kept past the micro-step.

Objectives (midpo.core.prior_net, pure): `marginal`: KL(sg pi || zeta) from the policy logits of the SAME policy
forward (flat, detached: the loop asks the policy forward for them only on update steps, `logits_due`);
`joint`: the MI-DPO loss w.r.t. zeta + an anchor (`kl_init` against a frozen copy of the init, or `nll`).

Collectives: every rank calls forward / backward / step the same number of times and every decision (update
due, skip) depends only on the step and on all-reduced votes, so all ranks run the same ZeRO-3 gathers in the
same order. Eval forwards (grad disabled) only compute log zeta.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

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
    warmup_lambda,
)
from midpo.core.priors import SidePair
from midpo.runtime import dist as pdist
from midpo.runtime.engine import Engine

log = logging.getLogger(__name__)


class PriorNetwork:
    """The prior network of `loss.prior=learned`: its engine (runtime.engine.Engine, or a stand-in with the same
    protocol), its update schedule, its metrics. `init_engine`: a frozen PriorLM of the initialization (only for
    joint + kl_init)."""

    METRIC_NAMES = ("prior/kl_policy", "prior/nll", "prior/entropy", "mi/estimate", "prior/lr", "prior/loss",
                    "prior/skipped")

    def __init__(self, engine, cfg: PriorNetConfig, *, beta: float, pad_id: int, bos_id: int | None,
                 init_engine=None, init_path: str | Path | None = None):
        if cfg.objective == "joint" and cfg.anchor == "kl_init" and cfg.anchor_weight and init_engine is None:
            raise ValueError("prior_net.anchor=kl_init needs the frozen initial prior (init_engine)")
        self.engine, self.init_engine, self.cfg = engine, init_engine, cfg
        self.beta, self.pad_id, self.bos_id = float(beta), pad_id, bos_id
        self.init_path = init_path
        self.step = 0  # last finished policy step
        self.updates = 0  # prior optimizer steps taken
        self._sums: dict[str, list[float]] = {}

    @property
    def module(self) -> PriorLM:
        return self.engine.module

    def update_due(self, step: int) -> bool:
        """Prior update at policy step ``step`` (1-based): after start_step, every update_every-th step."""
        k = step - self.cfg.start_step
        return k >= 1 and (k - 1) % self.cfg.update_every == 0

    def logits_due(self, step: int) -> bool:
        """The policy forward of step ``step`` must return its flat detached logits (`return_flat_logits`): the
        marginal objective at an update step. A function of the step alone, so every rank makes the same choice
        (it changes the number of head calls, each a ZeRO-3 gather); `prior/kl_policy` is logged on those steps."""
        return self.cfg.objective == "marginal" and self.update_due(step)

    def batch(self, batch):
        """The prior's own batch of the policy's pairs (same response-token order)."""
        return prior_batch(batch, condition_on_prompt=self.cfg.condition_on_prompt, bos_id=self.bos_id,
                           pad_id=self.pad_id, max_row_tokens=row_tokens_for(self.module))

    def _add(self, name: str, total: float, count: float) -> None:
        s = self._sums.setdefault(name, [0.0, 0.0])
        s[0] += float(total)
        s[1] += float(count)

    def forward(self, batch, policy_out: ResponseLogps, *, update: bool) -> tuple[SidePair, torch.Tensor | None]:
        """log zeta of both responses, detached (the policy's loss takes it as its prior), and with `update` the
        prior objective's loss (with grad) for `engine.backward`, else None."""
        training = torch.is_grad_enabled() and policy_out.chosen.requires_grad
        update = update and training
        pb = self.batch(batch)
        flat = policy_out.logits  # (N, V) detached, in the policy batch's token order == the prior batch's
        has_logits = flat is not None or (policy_out.chosen_logits is not None
                                          and policy_out.rejected_logits is not None)
        if update and self.cfg.objective == "marginal" and not has_logits:
            raise ValueError("prior_net.objective=marginal needs the policy logits: run the policy forward with "
                             "return_flat_logits=True (PriorNetwork.logits_due)")
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
        loss = None
        if update:
            if self.cfg.objective == "marginal":
                loss = marginal_objective(kls[0], pb)
            else:
                anchor = kls[-1] if use_init else -logp  # per token: KL(init || zeta) or NLL
                loss = joint_objective(policy_out, logp, pb, beta=self.beta, anchor=anchor,
                                       anchor_weight=self.cfg.anchor_weight)
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
        return SidePair(zeta.chosen, zeta.rejected), loss

    def add_loss(self, loss: torch.Tensor, pairs: int) -> None:
        """Record a micro-step's prior loss that went into backward (its metric)."""
        self._add("prior/loss", float(loss.detach()) * pairs, pairs)

    def end_step(self, step: int, *, updated: bool | None, lr: float = 0.0) -> dict[str, torch.Tensor]:
        """After policy step `step`. `updated`: the prior stepped its optimizer (True), skipped a non-finite step
        (False), or had no update due (None); `lr`: the prior's lr of that update. Returns this step's metrics as
        name -> float64 [sum, count]."""
        if updated is not None:
            self._add("prior/lr", lr, 1)
            self._add("prior/skipped", 0 if updated else 1, 1)
            self.updates += int(updated)
            if not updated:
                log.warning("step %d: non-finite prior loss on some rank; prior update skipped", step)
        self.step = step
        out = {k: torch.tensor(v, dtype=torch.float64) for k, v in self._sums.items()}
        self._sums = {}
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.updates = int(state["step"]), int(state["updates"])


# ---------------------------------------------------------------------------------------------
# construction


def bos_of(cfg: PriorNetConfig, model) -> int | None:
    """The unconditioned prior's context token: prior_net.bos_token_id, else the init model's BOS."""
    return cfg.bos_token_id if cfg.bos_token_id is not None else getattr(model.config, "bos_token_id", None)


def prior_ds_config(cfg: Config, world_size: int, hidden_size: int) -> dict:
    """The prior engine's DeepSpeed config: the trainer's own resolution (runtime.ds_config.resolve_ds_config) with
    the prior's lr, no weight decay, and ZeRO stage prior_net.zero_stage. Same micro-batch and accumulation as the
    policy: the prior steps once per policy step. train.compile is the policy's (the prior is not compiled), so it
    does not constrain the prior's stage."""
    from midpo.runtime.ds_config import resolve_ds_config

    pcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.prior_net.lr, weight_decay=0.0,
                                                              compile=False))
    return resolve_ds_config(pcfg, world_size, hidden_size, stage=cfg.prior_net.zero_stage)


def build_prior_network(cfg: Config, *, init_path: str | Path, policy_config, world_size: int, pad_id: int,
                        beta: float) -> PriorNetwork:
    """COLLECTIVE (deepspeed.initialize): load the prior (`init_path`: the reference or prior_net.init, its first
    k layers), on its own DeepSpeed engine; for joint + kl_init also a frozen engine of the init."""
    import deepspeed

    from midpo.runtime.ds_config import inference_ds_config
    from midpo.runtime.models import load_model

    pn = cfg.prior_net
    init_path = Path(init_path)

    def load():
        # loaded from disk each time (no deepcopy): under an active zero.Init the params are partitioned
        m = load_model(init_path, cfg.model, device=pdist.device(), train=True)
        if pn.num_layers:
            truncate_layers(m, pn.num_layers)
        return m

    model = load()
    check_vocab(model.config, policy_config)
    ds = prior_ds_config(cfg, world_size, model.config.hidden_size)
    engine = Engine.build(PriorLM(model, pn.chunk_size, all_max=pdist.all_max), ds,
                          lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(pn.warmup_steps)))
    init_engine = None
    if pn.objective == "joint" and pn.anchor == "kl_init" and pn.anchor_weight:
        frozen = load().requires_grad_(False).eval()
        init_engine, _, _, _ = deepspeed.initialize(model=PriorLM(frozen, pn.chunk_size, all_max=pdist.all_max),
                                                    config=inference_ds_config(ds))
        init_engine.eval()
    log.info("prior network: %s, %d layers, objective %s, ZeRO stage %d", init_path, model.config.num_hidden_layers,
             pn.objective, pn.zero_stage)
    return PriorNetwork(engine, pn, beta=beta, pad_id=pad_id, bos_id=bos_of(pn, model), init_engine=init_engine,
                        init_path=init_path)
