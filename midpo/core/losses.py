"""The generalized MI-DPO loss (docs/algorithms.md), a pure function of tensors.

    reward(y) = a * (logp_theta(y) - log zeta(y)),  a = beta
    margin = reward(y_w) - reward(y_l)
    loss   = -(1 - eps) * logsigmoid(m) - eps * logsigmoid(-m),  m = margin - a * (k_w - k_l)   (cDPO; eps = 0: DPO)
             + sft_weight * NLL(y_w) / |y_w|  + prior extra terms (e.g. SparsePO's L1)

k_w, k_l: a prior's per-side CONSTANT part of log zeta (SimPO's gamma/beta on the winner). It enters the loss
but not the rewards, so `rewards/*` mean what TRL logs (SimPO: beta * mean log-prob, without gamma).
Two entry points, one loss: `mi_dpo_loss` takes log zeta; `implicit_reward_loss` takes logp_theta - log zeta
itself, for priors whose log zeta contains the policy's own log-prob (SimPO, cEntropy): subtracting two
sums of ~-500 to get ~-8 loses fp32 precision that computing the difference directly keeps.

Sides: chosen = winner (y_w), rejected = loser (y_l). Per-token tensors are left-aligned
(midpo.core.logprobs.ResponseLogps). Math runs in fp32 (float64 inputs stay float64).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from midpo.core.logprobs import ResponseLogps

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
    margins: torch.Tensor  # (B,) detached, chosen_rewards - rejected_rewards = sigmoid's argument + a * (k_w - k_l)
    chosen_rewards: torch.Tensor  # (B,) detached, a * (logp_theta(y_w) - log zeta(y_w)), log zeta less k_w
    rejected_rewards: torch.Tensor  # (B,) detached
    policy_chosen_logps: torch.Tensor  # (B,) detached sum of policy log-probs of y_w
    policy_rejected_logps: torch.Tensor  # (B,) detached
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # (B,) detached per-pair extra terms (in losses)

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
        vals.update({f"loss/{k}": v for k, v in self.extra.items()})
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
) -> LossOutput:
    """Generalized MI-DPO loss per pair.

    policy: per-token policy log-probs (B, Lc) / (B, Lr) with masks (with grad).
    log_prior_chosen / log_prior_rejected: log zeta per token (same shape as that side's policy
    tensor, summed over its mask) or per sequence (B,). Gradient flows through them where the prior
    depends on the policy. beta: a = beta_X of the recovered algorithm.
    extra_losses: per-pair (B,) terms added to the loss (e.g. SparsePO's L1), reported as loss/<name>.
    log_prior_const: (k_w, k_l), a constant part of log zeta per side kept out of the rewards (module docstring).
    """
    dt = _fdtype(policy.chosen, policy.rejected, log_prior_chosen, log_prior_rejected)
    pc = _seq_sum(policy.chosen, policy.chosen_mask, "policy.chosen", dt)  # (B,)
    pr = _seq_sum(policy.rejected, policy.rejected_mask, "policy.rejected", dt)  # (B,)
    zc = _seq_sum(log_prior_chosen, policy.chosen_mask, "log_prior_chosen", dt)  # (B,)
    zr = _seq_sum(log_prior_rejected, policy.rejected_mask, "log_prior_rejected", dt)  # (B,)
    return _loss(policy, pc, pr, pc - zc, pr - zr, dt, beta=beta, label_smoothing=label_smoothing,
                 sft_weight=sft_weight, extra_losses=extra_losses, log_prior_const=log_prior_const)


def implicit_reward_loss(
    policy: ResponseLogps,
    log_ratio_chosen: torch.Tensor,
    log_ratio_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    extra_losses: Mapping[str, torch.Tensor] | None = None,
    log_prior_const: tuple[float, float] = (0.0, 0.0),
) -> LossOutput:
    """The same loss from logp_theta(y) - log zeta(y) given directly (per token or per sequence, as log zeta
    in `mi_dpo_loss`), without the constant part: a prior computes it where log zeta holds the policy's own
    log-prob, so the loss never subtracts two large, nearly equal sums."""
    dt = _fdtype(policy.chosen, policy.rejected, log_ratio_chosen, log_ratio_rejected)
    pc = _seq_sum(policy.chosen, policy.chosen_mask, "policy.chosen", dt)  # (B,)
    pr = _seq_sum(policy.rejected, policy.rejected_mask, "policy.rejected", dt)  # (B,)
    hc = _seq_sum(log_ratio_chosen, policy.chosen_mask, "log_ratio_chosen", dt)  # (B,)
    hr = _seq_sum(log_ratio_rejected, policy.rejected_mask, "log_ratio_rejected", dt)  # (B,)
    return _loss(policy, pc, pr, hc, hr, dt, beta=beta, label_smoothing=label_smoothing, sft_weight=sft_weight,
                 extra_losses=extra_losses, log_prior_const=log_prior_const)


def _loss(policy: ResponseLogps, pc: torch.Tensor, pr: torch.Tensor, hc: torch.Tensor, hr: torch.Tensor,
          dt: torch.dtype, *, beta: float, label_smoothing: float, sft_weight: float,
          extra_losses: Mapping[str, torch.Tensor] | None, log_prior_const: tuple[float, float]) -> LossOutput:
    """pc, pr: (B,) policy sums; hc, hr: (B,) logp_theta - log zeta per side, without the constant part."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_r = beta * hc  # (B,)
    rejected_r = beta * hr  # (B,)
    margin = chosen_r - rejected_r  # (B,)
    k_w, k_l = (float(k) for k in log_prior_const)
    arg = margin - beta * (k_w - k_l) if (k_w or k_l) else margin  # (B,) the sigmoid's argument
    losses = -F.logsigmoid(arg)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-arg)

    extra = {}
    if sft_weight:
        # Token-mean NLL of the winner (RPO-style), per pair.
        nll = -pc / policy.chosen_mask.sum(-1).clamp(min=1).to(dt)  # (B,)
        losses = losses + sft_weight * nll
        extra["sft"] = (sft_weight * nll).detach()
    for k, v in (extra_losses or {}).items():
        if v.shape != losses.shape:
            raise ValueError(f"extra loss {k!r} must be per pair {tuple(losses.shape)}, got {tuple(v.shape)}")
        losses = losses + v.to(dt)
        extra[k] = v.detach().to(dt)

    return LossOutput(
        losses=losses,
        margins=margin.detach(),
        chosen_rewards=chosen_r.detach(),
        rejected_rewards=rejected_r.detach(),
        policy_chosen_logps=pc.detach(),
        policy_rejected_logps=pr.detach(),
        extra=extra,
    )
