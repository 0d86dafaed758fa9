"""The generalized MI-DPO loss (docs/algorithms.md), a pure function of tensors.

    r_w = logp_theta(y_w) - log zeta(y_w),  r_l = logp_theta(y_l) - log zeta(y_l)      (the prior applied)
    loss = sum_i weight_i * link_i(r_w, r_l; a, hyperparameters)                      (the links)
           + sft_weight * NLL(y_w) / |y_w|  + prior extra terms (e.g. SparsePO's L1)

The default is one term, the sigmoid link: -(1 - eps) logsigmoid(m) - eps logsigmoid(-m), m = a (r_w - r_l),
a = beta (cDPO; eps = 0: DPO). midpo.core.links has every link (IPO, hinge, robust, ...); `link_terms` reads them
from the `loss` settings (loss.link, loss.link_options, loss.terms, loss.label_smoothing).

k_w, k_l: a prior's per-side CONSTANT part of log zeta (SimPO's gamma/beta on the winner). It enters the loss
(each link sees r - k) but not the rewards, so `rewards/*` mean what TRL logs (SimPO: beta * mean log-prob,
without gamma): rewards = a * (logp_theta - log zeta less k) for every link.
Two entry points, one loss: `mi_dpo_loss` takes log zeta; `implicit_reward_loss` takes logp_theta - log zeta
itself, for priors whose log zeta contains the policy's own log-prob (SimPO, cEntropy): subtracting two
sums of ~-500 to get ~-8 loses fp32 precision that computing the difference directly keeps. Both are the two
halves `log_ratios` (the prior applied, per pair) and `loss_from_ratios` (the links); a caller that keeps
state between them (bco_pair's running reward mean, midpo.train.step) calls the halves itself.

Sides: chosen = winner (y_w), rejected = loser (y_l). Per-token tensors are left-aligned
(midpo.core.logprobs.ResponseLogps). Math runs in fp32 (float64 inputs stay float64).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from midpo.core.links import LINK_NAMES, LINKS, combine, get_link
from midpo.core.logprobs import ResponseLogps
from midpo.errors import ConfigError

METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class LossOutput:
    losses: torch.Tensor  # (B,) per-pair loss, with grad; the trainer averages (or sums) it
    margins: torch.Tensor  # (B,) detached, chosen_rewards - rejected_rewards = a (r_w - r_l) + a (k_w - k_l)
    chosen_rewards: torch.Tensor  # (B,) detached, a * (logp_theta(y_w) - log zeta(y_w)), log zeta less k_w
    rejected_rewards: torch.Tensor  # (B,) detached
    policy_chosen_logps: torch.Tensor  # (B,) detached sum of policy log-probs of y_w
    policy_rejected_logps: torch.Tensor  # (B,) detached
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # (B,) detached per-pair extra terms (in losses)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # link -> (B,) weighted term, of a combination
    delta: float | None = None  # bco_pair's running reward mean used here (None: no running mean)

    def mean(self) -> torch.Tensor:
        return self.losses.mean()

    def metrics(self) -> dict[str, torch.Tensor]:
        """TRL-named metrics as SUMS over this micro-batch with their COUNTS: name -> float64 (2,)
        tensor [sum, count]. Add these across micro-steps (and all-reduce across ranks as one
        stacked tensor), then divide sum by count: that is the exact mean over all pairs, even
        when micro-batches have different sizes. Counts are pairs. Use :func:`reduce_metrics`."""
        n = float(self.losses.shape[0])
        vals = {
            "loss": self.losses.detach(),
            "rewards/chosen": self.chosen_rewards,
            "rewards/rejected": self.rejected_rewards,
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).to(self.margins.dtype),
            "rewards/margins": self.margins,
            "logps/chosen": self.policy_chosen_logps,
            "logps/rejected": self.policy_rejected_logps,
        }
        vals.update({f"loss/{k}": v for k, v in self.terms.items()})
        vals.update({f"loss/{k}": v for k, v in self.extra.items()})
        if self.delta is not None:
            vals["bco/delta"] = self.losses.new_full(self.losses.shape, self.delta).detach()
        return {
            k: torch.stack([v.detach().double().sum(), v.new_tensor(n, dtype=torch.float64)]) for k, v in vals.items()
        }


def reduce_metrics(parts: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Sum [sum, count] pairs from several ``LossOutput.metrics()`` and return the means."""
    total: dict[str, torch.Tensor] = {}
    for p in parts:
        for k, v in p.items():
            total[k] = total[k] + v if k in total else v.clone()
    return {k: float(v[0] / v[1]) for k, v in total.items()}


def _fdtype(*xs: torch.Tensor) -> torch.dtype:
    dt = torch.float32
    for x in xs:
        dt = torch.promote_types(dt, x.dtype)
    return dt


def _seq_sum(values: torch.Tensor, mask: torch.Tensor, name: str, dt: torch.dtype) -> torch.Tensor:
    """Per-sequence total: (B, L) per-token values summed over the mask, or (B,) as is."""
    if values.dim() == 1:
        return values.to(dt)
    if values.shape != mask.shape:
        raise ValueError(f"{name}: per-token shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}")
    return (values.to(dt) * mask).sum(-1)  # (B,)


def mi_dpo_loss(
    policy: ResponseLogps,
    log_prior_chosen: torch.Tensor,
    log_prior_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    extra_losses: Mapping[str, torch.Tensor] | None = None,
    log_prior_const: tuple[float, float] = (0.0, 0.0),
    terms: Sequence[Term] | None = None,
    delta: float | None = None,
    log_ratio: bool = False,
) -> LossOutput:
    """Generalized MI-DPO loss per pair.

    policy: per-token policy log-probs (B, Lc) / (B, Lr) with masks (with grad).
    log_prior_chosen / log_prior_rejected: log zeta per token (same shape as that side's policy
    tensor, summed over its mask) or per sequence (B,). Gradient flows through them where the prior
    depends on the policy. beta: a = beta_X of the recovered algorithm.
    extra_losses: per-pair (B,) terms added to the loss (e.g. SparsePO's L1), reported as loss/<name>.
    log_prior_const: (k_w, k_l), a constant part of log zeta per side kept out of the rewards (module docstring).
    terms, delta: the links (`loss_from_ratios`); None = the sigmoid link with eps = label_smoothing.
    log_ratio: the two tensors hold logp_theta - log zeta already (`implicit_reward_loss`).
    """
    ratios = log_ratios(policy, log_prior_chosen, log_prior_rejected, log_ratio=log_ratio, constant=log_prior_const,
                        extra_losses=extra_losses)
    return loss_from_ratios(ratios, beta=beta, terms=terms, label_smoothing=label_smoothing, sft_weight=sft_weight,
                            delta=delta)


def implicit_reward_loss(
    policy: ResponseLogps, log_ratio_chosen: torch.Tensor, log_ratio_rejected: torch.Tensor, **options
) -> LossOutput:
    """The same loss from logp_theta(y) - log zeta(y) given directly (per token or per sequence, as log zeta
    in `mi_dpo_loss`), without the constant part: a prior computes it where log zeta holds the policy's own
    log-prob, so the loss never subtracts two large, nearly equal sums. options: `mi_dpo_loss`'s keywords."""
    return mi_dpo_loss(policy, log_ratio_chosen, log_ratio_rejected, log_ratio=True, **options)


# ---------------------------------------------------------------------------------------------
# the two halves: the prior applied (LogRatios), then the links


@dataclass
class LogRatios:
    """A batch with its prior applied, per pair: what every link reads (module docstring)."""

    policy: ResponseLogps  # the per-token policy log-probs and masks (the NLL term reads them)
    policy_chosen: torch.Tensor  # (B,) sum of the policy's log-probs of y_w (grad)
    policy_rejected: torch.Tensor  # (B,)
    chosen: torch.Tensor  # (B,) logp_theta(y_w) - log zeta(y_w), log zeta less its constant part k_w (grad)
    rejected: torch.Tensor  # (B,) the same for y_l
    dtype: torch.dtype  # the loss's math dtype (fp32 at least)
    constant: tuple[float, float] = (0.0, 0.0)  # (k_w, k_l)
    extra_losses: Mapping[str, torch.Tensor] | None = None  # (B,) per-pair terms of the prior (SparsePO's L1)

    def link_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_w, r_l) = logp_theta - log zeta per side, the constant part included: what a link takes."""
        k_w, k_l = (float(k) for k in self.constant)
        return (self.chosen - k_w if k_w else self.chosen), (self.rejected - k_l if k_l else self.rejected)


def log_ratios(
    policy: ResponseLogps,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    log_ratio: bool,
    constant: tuple[float, float] = (0.0, 0.0),
    extra_losses: Mapping[str, torch.Tensor] | None = None,
) -> LogRatios:
    """Per-pair sums of one batch. ``chosen``/``rejected``: log zeta (``log_ratio=False``) or logp_theta - log zeta
    itself (``log_ratio=True``), per token (summed over that side's mask) or per sequence (B,)."""
    dt = _fdtype(policy.chosen, policy.rejected, chosen, rejected)
    pc = _seq_sum(policy.chosen, policy.chosen_mask, "policy.chosen", dt)  # (B,)
    pr = _seq_sum(policy.rejected, policy.rejected_mask, "policy.rejected", dt)  # (B,)
    if log_ratio:
        hc = _seq_sum(chosen, policy.chosen_mask, "log_ratio_chosen", dt)  # (B,)
        hr = _seq_sum(rejected, policy.rejected_mask, "log_ratio_rejected", dt)  # (B,)
    else:
        hc = pc - _seq_sum(chosen, policy.chosen_mask, "log_prior_chosen", dt)  # (B,)
        hr = pr - _seq_sum(rejected, policy.rejected_mask, "log_prior_rejected", dt)  # (B,)
    return LogRatios(policy, pc, pr, hc, hr, dt, (float(constant[0]), float(constant[1])), extra_losses)


@dataclass(frozen=True)
class Term:
    """One link of the loss: its registry name, its weight, the hyperparameters set (defaults live in the
    registry). bco_pair without ``delta`` takes the caller's running mean (``running_delta``)."""

    link: str
    weight: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def running_delta(self) -> bool:
        return self.link == "bco_pair" and "delta" not in self.options


SIGMOID = (Term("sigmoid"),)  # the default loss: DPO's link


def loss_from_ratios(
    ratios: LogRatios,
    *,
    beta: float,
    terms: Sequence[Term] | None = None,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    delta: float | None = None,
) -> LossOutput:
    """The per-pair loss: the weighted sum of the links ``terms`` (midpo.core.links.combine) of (r_w, r_l), plus
    the NLL and the prior's extra terms. ``terms`` None: the sigmoid link with eps = ``label_smoothing`` (cDPO);
    with ``terms`` given, label smoothing is a term's ``eps`` (`link_terms` maps loss.label_smoothing there).
    ``delta``: the running reward mean for bco_pair terms without their own delta (the caller keeps it)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if terms is None:
        terms = (Term("sigmoid", 1.0, {"eps": label_smoothing} if label_smoothing else {}),)
    elif label_smoothing:
        raise ValueError("with terms, label smoothing is each term's eps (link_terms maps loss.label_smoothing)")
    specs = []
    for t in terms:
        opts = dict(t.options)
        if t.running_delta:
            if delta is None:
                raise ValueError("link 'bco_pair' without its own delta takes the running mean of the rewards as "
                                 "delta: the caller keeps it (midpo.train.step.RewardMean) and passes delta=")
            opts["delta"] = delta
        specs.append((t.link, t.weight, opts))
    dt = ratios.dtype
    r_w, r_l = ratios.link_inputs()  # (B,) each
    losses, parts = combine(specs, r_w, r_l, beta=beta)  # (B,) with grad; per term (B,) detached
    chosen_r = beta * ratios.chosen  # (B,) TRL's rewards: the constant part left out
    rejected_r = beta * ratios.rejected  # (B,)

    extra = {}
    if sft_weight:
        # Token-mean NLL of the winner (RPO-style), per pair.
        nll = -ratios.policy_chosen / ratios.policy.chosen_mask.sum(-1).clamp(min=1).to(dt)  # (B,)
        losses = losses + sft_weight * nll
        extra["sft"] = (sft_weight * nll).detach()
    for k, v in (ratios.extra_losses or {}).items():
        if v.shape != losses.shape:
            raise ValueError(f"extra loss {k!r} must be per pair {tuple(losses.shape)}, got {tuple(v.shape)}")
        losses = losses + v.to(dt)
        extra[k] = v.detach().to(dt)

    running = any(t.running_delta for t in terms)
    return LossOutput(
        losses=losses,
        margins=(chosen_r - rejected_r).detach(),
        chosen_rewards=chosen_r.detach(),
        rejected_rewards=rejected_r.detach(),
        policy_chosen_logps=ratios.policy_chosen.detach(),
        policy_rejected_logps=ratios.policy_rejected.detach(),
        extra=extra,
        terms=parts if len(parts) > 1 else {},
        delta=float(delta) if running else None,
    )


# ---------------------------------------------------------------------------------------------
# the `loss` settings -> the terms, checked against the registry


def link_terms(loss_cfg: Any) -> tuple[Term, ...]:
    """The loss's links from the `loss` settings (midpo.config.LossConfig, duck-typed): ``loss.terms`` when set,
    else ``loss.link`` with ``loss.link_options``. ``loss.label_smoothing`` > 0 becomes ``eps`` of each term whose
    link has one (sigmoid: cDPO; robust: the label-flip rate; exo_pair: the label smoothing: the same label-noise
    rate in each paper) and is refused when no term has one. Names and hyperparameters are checked by the
    registry (its messages, prefixed with the key); ConfigError."""
    link = getattr(loss_cfg, "link", "sigmoid")
    link_options = dict(getattr(loss_cfg, "link_options", None) or {})
    raw_terms = list(getattr(loss_cfg, "terms", None) or [])
    eps = float(getattr(loss_cfg, "label_smoothing", 0.0) or 0.0)
    if raw_terms:
        if link != "sigmoid" or link_options:
            raise ConfigError("loss.terms replaces loss.link and loss.link_options: set either loss.terms or "
                              "loss.link (with loss.link_options), not both")
        entries = []
        for i, t in enumerate(raw_terms):
            if not isinstance(t, Mapping) or "link" not in t or set(t) - {"link", "weight", "options"}:
                raise ConfigError(f"loss.terms[{i}] must be a mapping {{link: NAME, weight: W, options: {{...}}}} "
                                  f"(weight default 1, options default {{}}), got {t!r}")
            entries.append((f"loss.terms[{i}]", t["link"], t.get("weight", 1.0), dict(t.get("options") or {})))
    else:
        entries = [("loss.link", link, 1.0, link_options)]

    terms, seen = [], set()
    for where, name, weight, opts in entries:
        try:
            spec = get_link(name)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if name in seen:
            raise ConfigError(f"{where}: link {name!r} appears twice in loss.terms; merge its weights into one term")
        seen.add(name)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: weight must be a number, got {weight!r}") from None
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"{where}: weight must be finite and > 0, got {weight}")
        opt_key = "loss.link_options" if where == "loss.link" else f"{where}.options"
        if eps and "eps" in spec.options:
            if "eps" in opts:
                raise ConfigError(f"loss.label_smoothing and {opt_key}.eps both set eps of link {name!r}: keep one")
            opts["eps"] = eps
        check = dict(opts)
        if spec.name == "bco_pair" and "delta" not in check:
            check["delta"] = 0.0  # the running mean, supplied at each step
        try:
            spec.check(**check)
        except ValueError as e:
            raise ConfigError(f"{opt_key}: {e}") from None
        terms.append(Term(name, weight, opts))
    if eps and not any("eps" in LINKS[t.link].options for t in terms):
        with_eps = ", ".join(n for n in LINK_NAMES if "eps" in LINKS[n].options)
        raise ConfigError(f"loss.label_smoothing={eps} is the label-noise rate eps of the {with_eps} links; "
                          f"{', '.join(t.link for t in terms)} has none: remove loss.label_smoothing")
    return tuple(terms)


def loss_metric_names(terms: Sequence[Term], *, sft_weight: float = 0.0) -> list[str]:
    """Every metric a LossOutput of these settings reports (TRL's names first): loss/<link> per term of a
    combination, loss/sft with the NLL term, bco/delta with a running reward mean."""
    names = list(METRIC_NAMES)
    if len(terms) > 1:
        names += [f"loss/{t.link}" for t in terms]
    if sft_weight:
        names.append("loss/sft")
    if any(t.running_delta for t in terms):
        names.append("bco/delta")
    return names
