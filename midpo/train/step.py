"""One optimizer step, one eval pass, the start-of-run probe: the only code that runs a micro-step.

    obj = Objective(prior, cfg.loss, reference=..., prior_net=...)
    result = train_step(policy, obj, micro_batches, step)       # the Trainer, the benches, gpu_check, tests
    metrics = evaluate(policy, obj, eval_split, micro, collate)

Step anatomy (every rank, same order, same number of collectives), per micro-batch:
  [online reference forward, no grad] -> policy forward through its engine (ZeRO-3 gathers) ->
  [prior network forward: log zeta, and its objective on update steps] -> prior -> generalized loss (fp32) ->
  ONE all-ranks vote on the finiteness of both losses -> [prior backward] -> policy backward;
then at the boundary the policy's optimizer step (or a skipped step when any micro-step was not finite on any
rank), then the prior's (or its skip). Pairs stay whole on one rank; chosen and rejected share one forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from midpo.core.logprobs import ResponseLogps
from midpo.core.priors import Prior, PriorInputs, SidePair, compute_loss
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


@dataclass
class Objective:
    """What a step optimizes: the prior (core.priors) and the loss settings, and the models beside the policy."""

    prior: Prior
    loss: object  # the `loss` config section (core.priors.LossSettings)
    reference: object | None = None  # runtime.engine.OnlineReference, or None: the cache in MicroBatch.ref
    prior_net: object | None = None  # train.prior_engine.PriorNetwork (loss.prior=learned)

    @property
    def need_logits(self) -> bool:
        """The prior reads the policy's logits with grad (TDPO, SparsePO)."""
        return self.prior.needs.policy_full_vocab


def forward_loss(policy, obj: Objective, mb: MicroBatch, *, update_prior: bool = False, flat_logits: bool = False):
    """(policy log-probs, LossOutput, the prior network's loss or None) of one micro-batch. `flat_logits`: the
    policy forward also returns its flat detached logits (the prior network's marginal objective reads them)."""
    ref = mb.ref if obj.reference is None else obj.reference(mb.batch)  # same PairBatch, no grad
    pol = policy_logps(policy, mb.batch, return_logits=obj.need_logits, return_flat_logits=flat_logits)  # (B, L)
    prior_logps = prior_loss = None
    if obj.prior_net is not None:
        prior_logps, prior_loss = obj.prior_net.forward(mb.batch, pol, update=update_prior)
    inputs = PriorInputs(policy=pol, ref=ref, token_weights=mb.token_weights, ref_topk=mb.ref_topk,
                         prior_logps=prior_logps)
    return pol, compute_loss(obj.prior, inputs, obj.loss), prior_loss


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
               callbacks=()) -> StepResult:
    """Optimizer step `step` (1-based) over this rank's micro-batches (as many as the engine accumulates).
    COLLECTIVE: every rank calls it with the same number of micro-batches. `policy`: runtime.engine.Engine;
    `callbacks`: train.callbacks.Callback (their on_micro_loss sees each micro-step's loss)."""
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
        pol, out, prior_loss = forward_loss(policy, obj, mb, update_prior=update_prior, flat_logits=flat_logits)
        loss = out.losses.mean()
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
        losses.append(out.metrics())
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
    from midpo.core.losses import METRIC_NAMES
    from midpo.runtime.metrics import MetricSums

    sums = MetricSums()
    policy.eval()
    with torch.no_grad():
        for idx, real in eval_plan(len(split), micro, pdist.world_size(), pdist.rank()):
            mb = make_micro_batch(split, idx, collate, pdist.device(), real)
            _, out, _ = forward_loss(policy, obj, mb)
            if real:
                for k, v in out.metrics().items():
                    sums.add(k, v[0], v[1])
    policy.train()
    return sums.reduce(list(METRIC_NAMES))


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
