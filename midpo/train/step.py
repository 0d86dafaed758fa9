"""One optimizer step, one eval pass, the start-of-run probe: the only code that runs a micro-step.

    obj = Objective(prior, cfg.loss, reference=..., prior_net=...)
    result = train_step(policy, obj, micro_batches, step)       # the Trainer, the benches, gpu_check, tests
    metrics = evaluate(policy, obj, eval_split, micro, collate)

Step anatomy (every rank, same order, same number of collectives), per micro-batch:
  [online reference forward, no grad] -> policy forward through its engine (ZeRO-3 gathers) ->
  [prior network forward: log zeta, and its objective on update steps] -> prior -> generalized loss (fp32) ->
  ONE all-ranks vote on the finiteness of both losses -> [prior backward] -> policy backward;
then at the boundary the policy's optimizer step (or a skipped step when any micro-step was not finite on any
rank), then the prior's (or its skip). Pairs stay whole on one rank (on one SP group under sequence parallelism:
runtime.seqpar); chosen and rejected share one forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from midpo.core.logprobs import ResponseLogps
from midpo.core.losses import link_terms, loss_from_ratios, loss_metric_names
from midpo.core.priors import Prior, PriorInputs, SidePair, prior_log_ratios
from midpo.runtime import dist as pdist
from midpo.runtime.engine import policy_logps


@dataclass
class MicroBatch:
    batch: object  # PairBatch on the device
    ref: ResponseLogps | None  # the cached reference (None: online reference, filled per forward)
    token_weights: SidePair | None
    ref_topk: SidePair | None
    ids: list[str]
    real: bool = True  # False: a dummy batch that keeps ranks in lockstep (eval tail); its metrics are dropped


def make_micro_batch(split, indices, collate, device: torch.device, real: bool = True) -> MicroBatch:
    """Rows `indices` of `split` (runtime.cache.PairSplit, verified against its caches) as one micro-batch on
    `device`: `collate` (rows -> PairBatch with the run's layout, pad id and packed-row budget), the cached values
    as tensors straight from Arrow."""
    rows, cached = split.fetch(indices)
    c = cached.to(device)
    return MicroBatch(collate(rows).to(device), c.ref, c.weights, c.topk, [r["id"] for r in rows], real)


class RewardMean:
    """bco_pair's reward shift delta (BCO, Jung et al. 2024; TRL's BCOTrainer `RunningMoments`): the mean of every
    reward a * r (both sides, the values the link compares with delta) of every training micro-batch so far, all
    ranks together. Each training micro-step folds its batch in BEFORE its loss (`observe`, collective: one
    all-reduce of [sum, count]); evaluation reads it unchanged (`value`). 0 before the first batch. A batch whose
    sum is not finite on some rank is left out (every rank sees the same all-reduced sum). Saved in
    trainer_state.json as float64 sum and count, so a resume continues it exactly."""

    def __init__(self) -> None:
        self.total = 0.0  # sum of the rewards folded in
        self.count = 0.0  # how many

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0

    def observe(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
        """Fold this rank's (B,) rewards of both sides in, with every rank's (COLLECTIVE); -> the new delta."""
        local = torch.cat([chosen_rewards.detach(), rejected_rewards.detach()]).double()
        total, count = pdist.all_reduce_sum([float(local.sum()), float(local.numel())])
        if math.isfinite(total):
            self.total += total
            self.count += count
        return self.value

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = float(state["total"]), float(state["count"])


@dataclass
class Objective:
    """What a step optimizes: the prior (core.priors), the loss settings and their links (core.losses.link_terms,
    checked here), the models beside the policy, and the links' state (bco_pair's running reward mean)."""

    prior: Prior
    loss: object  # the `loss` config section (core.priors.LossSettings)
    reference: object | None = None  # runtime.engine.OnlineReference, or None: the cache in MicroBatch.ref
    prior_net: object | None = None  # train.prior_engine.PriorNetwork (loss.prior=learned)
    router_aux_coef: float = 0.0  # weight of a MoE policy's load-balancing loss (train.router_aux_loss_coef)
    seq_groups: object | None = None  # runtime.seqpar.SeqGroups: sequence parallelism (its group, the DP view)
    terms: tuple = field(init=False)  # core.losses.Term per link
    reward_mean: RewardMean | None = field(init=False)  # bco_pair without its own delta

    def __post_init__(self) -> None:
        self.terms = link_terms(self.loss)
        self.reward_mean = RewardMean() if any(t.running_delta for t in self.terms) else None

    @property
    def need_logits(self) -> bool:
        """The prior reads the policy's logits with grad (TDPO, SparsePO)."""
        return self.prior.needs.policy_full_vocab

    @property
    def metric_names(self) -> list[str]:
        """The loss's metrics (TRL's names, then loss/<link> of a combination, loss/sft, bco/delta)."""
        return loss_metric_names(self.terms, sft_weight=self.loss.sft_weight)

    @property
    def sp_size(self) -> int:
        return 1 if self.seq_groups is None else self.seq_groups.size

    def data_parallel(self) -> tuple[int, int]:
        """(size, rank) of the data-parallel view: SP groups, or every rank."""
        from midpo.runtime.seqpar import data_parallel

        return data_parallel(self.seq_groups, pdist.world_size(), pdist.rank())

    def state_dict(self) -> dict:
        """The links' state for trainer_state.json ({} without any)."""
        return {} if self.reward_mean is None else {"bco_reward_mean": self.reward_mean.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.reward_mean is not None:
            if "bco_reward_mean" not in state:
                raise ValueError("the checkpoint holds no bco_pair reward mean (trainer_state.json 'links'), yet "
                                 "this run's loss needs one")
            self.reward_mean.load_state_dict(state["bco_reward_mean"])


ROUTER_METRIC = "router/aux_loss"


def policy_loss(obj: Objective, pol: ResponseLogps, out) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """The scalar the policy's backward takes and its metrics: the mean generalized loss, plus
    `obj.router_aux_coef` x the routers' load-balancing loss of a MoE policy's forward (its value logged as
    router/aux_loss, before the coefficient)."""
    loss, metrics = out.losses.mean(), out.metrics()
    if obj.router_aux_coef and pol.router_aux is not None:
        loss = loss + obj.router_aux_coef * pol.router_aux
        metrics[ROUTER_METRIC] = [float(pol.router_aux.detach()), 1.0]
    return loss, metrics


def forward_loss(policy, obj: Objective, mb: MicroBatch, *, update_prior: bool = False, flat_logits: bool = False,
                 train: bool = False):
    """(policy log-probs, LossOutput, the prior network's loss or None) of one micro-batch. `flat_logits`: the
    policy forward also returns its flat detached logits (the prior network's marginal objective reads them).
    `train`: a training micro-step, which folds its rewards into bco_pair's running mean before its loss
    (COLLECTIVE then); evaluation only reads it."""
    ref = mb.ref if obj.reference is None else obj.reference(mb.batch)  # same PairBatch, no grad
    pol = policy_logps(policy, mb.batch, return_logits=obj.need_logits, return_flat_logits=flat_logits)  # (B, L)
    prior_logps = prior_loss = None
    if obj.prior_net is not None:
        prior_logps, prior_loss = obj.prior_net.forward(mb.batch, pol, update=update_prior)
    inputs = PriorInputs(policy=pol, ref=ref, token_weights=mb.token_weights, ref_topk=mb.ref_topk,
                         prior_logps=prior_logps)
    ratios = prior_log_ratios(obj.prior, inputs)
    beta, delta = obj.prior.beta, None
    if obj.reward_mean is not None:
        r_w, r_l = ratios.link_inputs()
        delta = obj.reward_mean.observe(beta * r_w, beta * r_l) if train else obj.reward_mean.value
    out = loss_from_ratios(ratios, beta=beta, terms=obj.terms, sft_weight=obj.loss.sft_weight, delta=delta)
    return pol, out, prior_loss


BATCH_COUNTS = ("tokens", "pad", "slots", "pairs", "attn", "logit_tokens")


@dataclass
class StepResult:
    skipped: bool = False  # the policy's optimizer step was skipped (a non-finite loss on some rank)
    sums: dict[str, list[float]] = field(default_factory=dict)  # metric -> [sum, count], this rank
    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(BATCH_COUNTS, 0.0))  # MFU, throughput
    ids: list[list[str]] = field(default_factory=list)  # row ids per micro-batch, this rank

    def add(self, name: str, total: float, count: float) -> None:
        s = self.sums.setdefault(name, [0.0, 0.0])
        s[0] += float(total)
        s[1] += float(count)

    def count(self, b) -> None:
        """A micro-batch that went into backward: its tokens for throughput and MFU."""
        for k, v in (("tokens", b.num_tokens), ("pad", b.num_pad_tokens), ("slots", b.input_ids.numel()),
                     ("pairs", b.num_pairs), ("attn", b.attention_context), ("logit_tokens", b.target_index.numel())):
            self.counts[k] += float(v)


def train_step(policy, obj: Objective, micro_batches: Iterable[MicroBatch], step: int, *,
               callbacks=(), global_pairs: int = 0) -> StepResult:
    """Optimizer step `step` (1-based) over this rank's micro-batches (as many as the engine accumulates).
    COLLECTIVE: every rank calls it with the same number of micro-batches. `policy`: runtime.engine.Engine;
    `callbacks`: train.callbacks.Callback (their on_micro_loss sees each micro-step's loss).
    `global_pairs` > 0 (token-budget micro-batches of varying pair counts): the step accumulates however many
    micro-batches are given, each contributing sum(pair losses) x world / global_pairs, so that after DeepSpeed's
    average over ranks the gradient is the global batch's mean, as with fixed-count micro-batches."""
    if global_pairs:
        micro_batches = list(micro_batches)
        policy.set_accumulation(len(micro_batches))
    prior_net = obj.prior_net
    update_prior = prior_net is not None and prior_net.update_due(step)
    flat_logits = prior_net is not None and prior_net.logits_due(step)
    world = pdist.world_size()
    lr = policy.lr
    prior_lr = prior_net.engine.lr if update_prior else 0.0
    res = StepResult()
    losses = []
    bad = prior_bad = False  # once a vote fails, that engine takes no more backward this step
    for k, mb in enumerate(micro_batches):
        res.ids.append(mb.ids)
        pol, out, prior_loss = forward_loss(policy, obj, mb, update_prior=update_prior, flat_logits=flat_logits,
                                            train=True)
        loss, metrics = policy_loss(obj, pol, out)
        if global_pairs:  # token budget: this micro-batch's share of the global batch, not a mean over it
            # (world = data-parallel size x SP size: the SP factor below is included)
            loss = loss * (out.losses.numel() * world / global_pairs)
        elif obj.sp_size > 1:  # an SP group's k ranks share one micro-batch and each holds its loss: their gradients
            loss = loss * obj.sp_size  # sum to the batch's, DeepSpeed averages over all k x DP ranks
        for cb in callbacks:
            loss = cb.on_micro_loss(step, k, loss)
        ok, prior_ok = pdist.all_ranks_true_each([
            bool(torch.isfinite(loss)) and not bad,
            prior_loss is None or (bool(torch.isfinite(prior_loss)) and not prior_bad)])
        if prior_loss is not None:
            if prior_ok:
                prior_net.engine.backward(prior_loss)
                prior_net.add_loss(prior_loss, mb.batch.num_pairs)
            else:
                prior_bad = True
        if not ok:
            bad = True
            continue
        policy.backward(loss)
        losses.append(metrics)
        if obj.seq_groups is None or obj.seq_groups.rank == 0:  # a group's micro-batch counts once
            res.count(mb.batch)
    if bad:
        policy.skip()
        res.skipped = True
    else:
        norm = policy.step()  # clip, optimizer, lr schedule
        for m in losses:
            for name, v in m.items():
                res.add(name, v[0], v[1])
        res.add("grad_norm", norm * world, world)  # the same on every rank
        res.add("lr", lr * world, world)
    if prior_net is not None:
        updated = None
        if update_prior:
            updated = not prior_bad
            prior_net.engine.step() if updated else prior_net.engine.skip()
        for name, v in prior_net.end_step(step, updated=updated, lr=prior_lr).items():
            res.add(name, v[0], v[1])  # [sum, count], reduced with the policy's metrics
    return res


# ---------------------------------------------------------------------------------------------
# evaluation over the WHOLE eval split, and the start-of-run probe


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


def evaluate(policy, obj: Objective, split, micro: int, collate) -> dict[str, float]:
    """The loss's metrics (TRL's names) over every row of `split`, reduced over ranks. COLLECTIVE."""
    from midpo.runtime.metrics import MetricSums

    sums = MetricSums()
    policy.eval()
    with torch.no_grad():
        for idx, real in eval_plan(len(split), micro, *obj.data_parallel()):
            mb = make_micro_batch(split, idx, collate, pdist.device(), real)
            _, out, _ = forward_loss(policy, obj, mb)
            if real:
                for k, v in out.metrics().items():
                    sums.add(k, v[0], v[1])
    policy.train()
    return sums.reduce(obj.metric_names)


def probe_reference(policy, split, n_rows: int, collate) -> dict:
    """Re-score the first `n_rows` cached rows of `split` with the policy, which starts as the reference: the
    per-token differences to the cache (mean, max). Every rank scores the same rows (same collectives)."""
    mb = make_micro_batch(split, range(min(n_rows, len(split))), collate, pdist.device())
    policy.eval()
    with torch.no_grad():
        pol = policy_logps(policy, mb.batch)
    policy.train()
    d = torch.cat([(getattr(pol, side) - getattr(mb.ref, side)).abs()[getattr(pol, f"{side}_mask")].double()
                   for side in ("chosen", "rejected")])
    return {"rows": len(mb.ids), "tokens": int(d.numel()), "mean_abs_diff": float(d.mean()),
            "max_abs_diff": float(d.max())}
