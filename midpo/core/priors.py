"""Priors: each turns a batch's tensors into log zeta for the chosen (winner) and rejected (loser)
responses, so that the generalized MI-DPO loss (midpo.core.losses) recovers a published algorithm
(docs/algorithms.md has every formula, its source and its defaults).

One registry, ``PRIORS``; one list of names, ``PRIOR_NAMES``. The trainer does::

    prior = build_prior(cfg.loss, model_config=policy.config)   # once; may hold parameters (SparsePO)
    check_needs(prior, available)                               # at start-up: refuse unservable configs
    out = compute_loss(prior, PriorInputs(policy=..., ref=...), cfg.loss)
    out.losses.mean().backward()

Availability keys (what the data / forward can provide; ``available`` is a set of these):
``ref_seq_logps``, ``ref_token_logps``, ``ref_full_vocab``, ``ref_topk``, ``ref_hidden_states``,
``policy_full_vocab``, ``token_weights``, ``prior_network``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from midpo.core.logprobs import ResponseLogps, per_token_kl, per_token_kl_topk
from midpo.core.losses import LogRatios, LossOutput, Term, link_terms, log_ratios, loss_from_ratios
from midpo.errors import ConfigError


class LossSettings(Protocol):
    """What the priors and the loss read from the `loss` section (midpo.config.LossConfig), duck-typed: this
    module imports no config."""

    prior: str
    beta: float | None  # None: the prior's official default
    label_smoothing: float
    sft_weight: float
    options: dict[str, Any]
    link: str  # the links (midpo.core.losses.link_terms)
    link_options: dict[str, Any]
    terms: list[dict[str, Any]]


@dataclass
class DefaultSettings:
    """A prior's own defaults (a Prior built without settings)."""

    prior: str
    beta: float | None = None
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    link: str = "sigmoid"
    link_options: dict[str, Any] = field(default_factory=dict)
    terms: list[dict[str, Any]] = field(default_factory=list)


AVAILABLE_KEYS = (
    "ref_seq_logps",  # per-sequence reference log-prob sums (any reference cache)
    "ref_token_logps",  # per-token reference log-probs (the reference cache, or online)
    "ref_full_vocab",  # reference logits at every response token (online reference only)
    "ref_topk",  # cached top-k reference log-probs + tail mass (ref.topk=K); approximates ref_full_vocab
    "ref_hidden_states",  # reference per-layer hidden states at response tokens (online reference only)
    "policy_full_vocab",  # policy logits at response tokens (response_logps(..., return_logits=True))
    "token_weights",  # per-token weights of each response (TIS-DPO)
    "prior_network",  # the learnable prior network (MI-DPO proper)
)

# need -> availability keys that serve it
_SERVED_BY = {
    "ref_seq_logps": ("ref_seq_logps", "ref_token_logps"),
    "ref_token_logps": ("ref_token_logps",),
    "ref_full_vocab": ("ref_full_vocab", "ref_topk"),
    "ref_hidden_states": ("ref_hidden_states",),
    "policy_full_vocab": ("policy_full_vocab",),
    "token_weights": ("token_weights",),
    "prior_network": ("prior_network",),
}

_WHAT = {
    "ref_seq_logps": "the reference's sequence log-probs",
    "ref_token_logps": "the reference's per-token log-probs",
    "ref_full_vocab": "the reference's full-vocab distribution per token",
    "ref_hidden_states": "the reference's hidden states (all layers) per token",
    "policy_full_vocab": "the policy's logits at every response token",
    "token_weights": "per-token weights for chosen and rejected responses",
    "prior_network": "the learnable prior network",
}

_FIX = {
    "ref_seq_logps": "run the reference stage (`midpo ref`) first or run with train.online_reference=true",
    "ref_token_logps": "run the reference stage (`midpo ref`, it stores per-token log-probs) or run with "
    "train.online_reference=true",
    "ref_full_vocab": "run with train.online_reference=true or build the top-k cache with ref.topk=K "
    "(approximate: the KL becomes a lower bound)",
    "ref_hidden_states": "run with train.online_reference=true (no cache stores hidden states)",
    "policy_full_vocab": "compute the policy with response_logps(..., return_logits=True)",
    "token_weights": "add chosen/rejected per-token weight columns (TIS-DPO token weight estimation from a "
    "forward and a reverse DPO model) to the data",
    "prior_network": "loss.prior=learned takes log zeta from the prior network (midpo/core/prior_net.py, the "
    "prior_net section): the training step must run it (midpo.train.prior_engine.PriorNetwork), whose forward "
    "fills PriorInputs.prior_logps",
}


@dataclass(frozen=True)
class Needs:
    """What a prior needs from the data and the forwards."""

    ref_seq_logps: bool = False
    ref_token_logps: bool = False
    ref_full_vocab: bool = False
    ref_hidden_states: bool = False
    policy_full_vocab: bool = False
    token_weights: bool = False
    prior_network: bool = False
    labels: bool = False  # asymmetric prior: log zeta depends on which side won (batch convention: chosen won)
    reference: str = "reference"  # which model plays pi_ref: "reference" | "previous_round_policy" (DICE) | "none"

    @property
    def needs_reference(self) -> bool:
        return self.ref_seq_logps or self.ref_token_logps or self.ref_full_vocab or self.ref_hidden_states

    @property
    def needs_full_vocab_reference(self) -> bool:
        return self.ref_full_vocab

    @property
    def needs_reference_hidden_states(self) -> bool:
        return self.ref_hidden_states

    @property
    def needs_token_weights(self) -> bool:
        return self.token_weights

    def required(self) -> list[str]:
        return [
            f.name for f in fields(self) if f.type in (bool, "bool") and getattr(self, f.name) and f.name != "labels"
        ]


@dataclass
class SidePair:
    chosen: Any
    rejected: Any


@dataclass
class TopK:
    """Cached top-k slice of the reference distribution at every response token of one side."""

    values: torch.Tensor  # (B, L, k) log-probs
    indices: torch.Tensor  # (B, L, k) long
    tail: torch.Tensor  # (B, L) log of the remaining mass


@dataclass
class PriorInputs:
    """A batch's tensors for a prior. Per-token tensors are left-aligned (midpo.core.logprobs)."""

    policy: ResponseLogps  # policy per-token log-probs (grad); chosen_logits/rejected_logits when return_logits
    ref: ResponseLogps | None = None  # reference per-token log-probs (no grad); + logits / hidden when online
    ref_seq: SidePair | None = None  # (B,) reference sequence sums, when only sums exist
    ref_topk: SidePair | None = None  # TopK per side, from the top-k reference cache
    token_weights: SidePair | None = None  # (B, Lc) / (B, Lr)
    prior_logps: SidePair | None = None  # (B, Lc) / (B, Lr) log zeta per token from the prior network (MI-DPO hook)

    def available(self) -> set[str]:
        a = set()
        if self.ref is not None:
            a |= {"ref_seq_logps", "ref_token_logps"}
            if self.ref.chosen_logits is not None:
                a.add("ref_full_vocab")
            if self.ref.chosen_hidden is not None:
                a.add("ref_hidden_states")
        if self.ref_seq is not None:
            a.add("ref_seq_logps")
        if self.ref_topk is not None:
            a.add("ref_topk")
        if self.policy.chosen_logits is not None:
            a.add("policy_full_vocab")
        if self.token_weights is not None:
            a.add("token_weights")
        if self.prior_logps is not None:
            a.add("prior_network")
        return a


@dataclass
class PriorOutput:
    """log zeta per side, or (``log_ratio``) logp_theta - log zeta itself: a prior whose log zeta holds the policy's
    own log-prob returns the difference it stands for (SimPO's logp/|y|, cEntropy's c logp - logp_ref), so the loss
    does not subtract two large, nearly equal sums. ``constant``: a per-side constant part of log zeta (SimPO's
    gamma/beta on the winner), left out of chosen/rejected: it enters the loss, not the logged rewards."""

    chosen: torch.Tensor  # log zeta(y_w): (B, Lc) per token or (B,) per sequence
    rejected: torch.Tensor  # log zeta(y_l): (B, Lr) or (B,)
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # (B,) per-pair terms added to the loss
    log_ratio: bool = False  # chosen/rejected are logp_theta - log zeta (less `constant`)
    constant: tuple[float, float] = (0.0, 0.0)  # (winner, loser) constant part of log zeta


_REQUIRED = object()  # marks an option without an official default


class Prior(nn.Module):
    """Base class. Subclasses set ``name``, ``NEEDS``, ``OPTIONS`` (name -> official default or
    _REQUIRED), ``DEFAULT_BETA``, and implement ``forward(inputs) -> PriorOutput``."""

    name: ClassVar[str] = ""
    NEEDS: ClassVar[Needs] = Needs()
    OPTIONS: ClassVar[dict[str, Any]] = {}
    DEFAULT_BETA: ClassVar[float] = 0.1

    def __init__(self, loss_cfg: LossSettings | None = None, **dims: Any) -> None:
        super().__init__()
        cfg = loss_cfg if loss_cfg is not None else DefaultSettings(prior=self.name)
        self.beta = float(cfg.beta) if cfg.beta is not None else self.DEFAULT_BETA
        if not self.beta > 0:
            raise ConfigError(f"loss.beta must be > 0, got {self.beta}")
        unknown = sorted(set(cfg.options) - set(self.OPTIONS))
        if unknown:
            valid = ", ".join(sorted(self.OPTIONS)) or "none"
            raise ConfigError(f"prior {self.name!r}: unknown loss.options {unknown}; valid options: {valid}")
        opts = {**self.OPTIONS, **cfg.options}
        missing = sorted(k for k, v in opts.items() if v is _REQUIRED)
        if missing:
            raise ConfigError(
                f"prior {self.name!r} needs loss.options.{missing[0]} (no official default): {self._hint()}"
            )
        self.options = opts

    def _hint(self) -> str:
        return ""

    @property
    def needs(self) -> Needs:
        return self.NEEDS

    def extra_repr(self) -> str:
        return f"beta={self.beta}, options={self.options}"


def _ref_side(inputs: PriorInputs, side: str) -> torch.Tensor:
    """Reference log-probs of one side: per token (B, L) when cached per token, else per sequence (B,)."""
    if inputs.ref is not None:
        ref, pol = getattr(inputs.ref, side), getattr(inputs.policy, side)
        if ref.shape != pol.shape:
            raise ValueError(
                f"reference {side} log-probs {tuple(ref.shape)} not aligned with policy {tuple(pol.shape)}"
            )
        return ref.detach()
    if inputs.ref_seq is not None:
        return getattr(inputs.ref_seq, side).detach()
    raise ValueError("no reference log-probs in the inputs (PriorInputs.ref or .ref_seq)")


def _ref_token(inputs: PriorInputs, side: str) -> torch.Tensor:
    ref = _ref_side(inputs, side)
    if ref.dim() != 2:
        raise ValueError("this prior needs per-token reference log-probs (PriorInputs.ref)")
    return ref


def _seq(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 1 else (x * mask).sum(-1)  # (B,)


def _kl_ref_policy(inputs: PriorInputs, side: str, chunk_size: int = 1024) -> torch.Tensor:
    """(B, L) KL_t(pi_ref || pi_theta) per response token (reference-weighted, as TDPO/SparsePO), 0 at padding."""
    pol_logits = getattr(inputs.policy, f"{side}_logits")
    mask = getattr(inputs.policy, f"{side}_mask")
    if pol_logits is None:
        raise ValueError("this prior needs the policy's logits: response_logps(..., return_logits=True)")
    ref_logits = None if inputs.ref is None else getattr(inputs.ref, f"{side}_logits")
    if ref_logits is not None:
        kl = per_token_kl(ref_logits.detach(), pol_logits, chunk_size)
    elif inputs.ref_topk is not None:
        tk: TopK = getattr(inputs.ref_topk, side)
        kl = per_token_kl_topk(tk.values, tk.indices, tk.tail, pol_logits, chunk_size)
    else:
        raise ValueError(f"no reference distribution: {_FIX['ref_full_vocab']}")
    return kl * mask  # (B, L)


# ---------------------------------------------------------------------------------------------
# the priors


class DPOPrior(Prior):
    """DPO: log zeta = logp_ref. Loss -logsig(b (lr_w - lr_l)), sums."""

    name = "dpo"
    NEEDS = Needs(ref_seq_logps=True)

    def forward(self, inputs: PriorInputs) -> PriorOutput:
        return PriorOutput(_ref_side(inputs, "chosen"), _ref_side(inputs, "rejected"))


class DICEPrior(DPOPrior):
    """DICE: the DPO loss with pi_ref = the PREVIOUS round's policy (log zeta = logp_prev).

    The method is an iterative data scheme outside the loss: each round samples responses from
    the current policy, scores them with the implicit reward logp_pi - logp_ref, selects pairs with
    a length-regularized reward, mixes them with offline data, and trains with the previous round's
    policy as reference. So per round: model.reference = previous round's policy checkpoint, and the
    reference cache is rebuilt with it (``Needs.reference``)."""

    name = "dice"
    NEEDS = Needs(ref_seq_logps=True, reference="previous_round_policy")


class CEntropyPrior(Prior):
    """H-DPO (centropy): log zeta = (1 - c) logp_theta + logp_ref (gradient flows through logp_theta),
    so logp - log zeta = c logp_theta - logp_ref, which is what it returns (``log_ratio``)."""

    name = "centropy"
    NEEDS = Needs(ref_seq_logps=True)
    OPTIONS = {"c": _REQUIRED}

    def _hint(self) -> str:
        return "the entropy coefficient of H-DPO; c < 1 sharpens, c = 1 is DPO"

    def forward(self, inputs: PriorInputs) -> PriorOutput:
        c = float(self.options["c"])
        out = []
        for side in ("chosen", "rejected"):
            ref, pol, mask = (
                _ref_side(inputs, side),
                getattr(inputs.policy, side),
                getattr(inputs.policy, f"{side}_mask"),
            )
            dt = torch.promote_types(torch.promote_types(pol.dtype, ref.dtype), torch.float32)
            pol = pol.to(dt) if ref.dim() == 2 else _seq(pol.to(dt), mask)  # (B, L) per token, or (B,)
            out.append(c * pol - ref.to(dt))
        return PriorOutput(*out, log_ratio=True)


class SimPOPrior(Prior):
    """SimPO: log zeta(y) = (1 - 1/|y|) logp_theta(y) + (gamma/b) 1[y = y_w] (gradient flows), so
    logp - log zeta = logp/|y| - gamma/b 1[y=y_w]: the token MEAN (EOS included), no reference.
    It returns logp/|y| (``log_ratio``) and gamma/b as the winner's ``constant``: the loss has the margin
    gamma, the rewards are b * mean log-prob (what TRL's CPO trainer with loss_type=simpo and SimPO's own
    trainer log). Default beta 2.0; gamma_beta_ratio 0.5 is SimPO's README start value (its config default: 0.25)."""

    name = "simpo"
    NEEDS = Needs(labels=True, reference="none")
    OPTIONS = {"gamma_beta_ratio": 0.5}
    DEFAULT_BETA = 2.0

    def forward(self, inputs: PriorInputs) -> PriorOutput:
        p = inputs.policy
        dt = torch.promote_types(p.chosen.dtype, torch.float32)
        out = []
        for side in ("chosen", "rejected"):
            mask = getattr(p, f"{side}_mask")
            n = mask.sum(-1).to(dt)  # (B,) |y|, EOS included
            out.append(_seq(getattr(p, side).to(dt), mask) / n)  # (B,) mean log-prob
        return PriorOutput(*out, log_ratio=True, constant=(float(self.options["gamma_beta_ratio"]), 0.0))


class LNDPOPrior(Prior):
    """Length-normalized DPO: log zeta(y) = (1 - 1/|y|) logp_theta(y) + logp_ref(y)/|y| (gradient flows), so
    logp - log zeta = lr(y)/|y|, the token MEAN of the log-ratio (EOS included), computed per token and returned
    as ``log_ratio``. Under the ipo link this is TRL's IPO (TRL divides IPO's log-ratios by the completion
    length); under sigmoid it is LN-DPO (the length-normalized DPO baseline of the SimPO paper)."""

    name = "lndpo"
    NEEDS = Needs(ref_seq_logps=True)

    def forward(self, inputs: PriorInputs) -> PriorOutput:
        p, out = inputs.policy, []
        for side in ("chosen", "rejected"):
            pol, mask, ref = getattr(p, side), getattr(p, f"{side}_mask"), _ref_side(inputs, side)
            dt = torch.promote_types(torch.promote_types(pol.dtype, ref.dtype), torch.float32)
            lr = _seq(pol.to(dt) - ref.to(dt), mask) if ref.dim() == 2 else _seq(pol.to(dt), mask) - ref.to(dt)
            out.append(lr / mask.sum(-1).to(dt))  # (B,) mean log-ratio
        return PriorOutput(*out, log_ratio=True)


class RDPOPrior(Prior):
    """R-DPO: log zeta = logp_ref - (r/b) |y| (|y| in tokens, EOS included), so the margin gains
    + r (|y_w| - |y_l|)."""

    name = "rdpo"
    NEEDS = Needs(ref_seq_logps=True)
    OPTIONS = {"r": _REQUIRED}

    def _hint(self) -> str:
        return "the length coefficient; try a small grid such as {0.05, 0.1, 0.5, 1.0}"

    def forward(self, inputs: PriorInputs) -> PriorOutput:
        r = float(self.options["r"])
        out = []
        for side in ("chosen", "rejected"):
            mask = getattr(inputs.policy, f"{side}_mask")
            ref = _seq(_ref_side(inputs, side), mask)
            out.append(ref - (r / self.beta) * mask.sum(-1).to(ref.dtype))
        return PriorOutput(*out)


class TDPOPrior(Prior):
    """TDPO. SeqKL = sum_t KL_t(pi_ref || pi_theta) (reference-weighted), gradient through the policy logits.
    TDPO1 (tdpo2=false): log zeta = logp_ref - SeqKL on both sides.
    TDPO2 (default): winner logp_ref - alpha * sg(SeqKL_w), loser logp_ref - alpha * SeqKL_l.
    With the top-k reference cache the KL is the top-k + tail approximation (a lower bound)."""

    name = "tdpo"
    NEEDS = Needs(ref_seq_logps=True, ref_full_vocab=True, policy_full_vocab=True, labels=True)
    OPTIONS = {"alpha": 0.5, "tdpo2": True, "chunk_size": 1024}

    def forward(self, inputs: PriorInputs) -> PriorOutput:
        p = inputs.policy
        cs = int(self.options["chunk_size"])
        kl_w = _kl_ref_policy(inputs, "chosen", cs).sum(-1)  # (B,)
        kl_l = _kl_ref_policy(inputs, "rejected", cs).sum(-1)  # (B,)
        ref_w = _seq(_ref_side(inputs, "chosen"), p.chosen_mask)
        ref_l = _seq(_ref_side(inputs, "rejected"), p.rejected_mask)
        if self.options["tdpo2"]:
            a = float(self.options["alpha"])
            return PriorOutput(ref_w - a * kl_w.detach(), ref_l - a * kl_l)
        return PriorOutput(ref_w - kl_w, ref_l - kl_l)


class TISDPOPrior(Prior):
    """TIS-DPO: log zeta = sum_t [(1 - w_t) logp_theta,t + w_t logp_ref,t] (gradient flows), so
    logp - log zeta = sum_t w_t lr_t. Weights come with the data; ``eos_weight`` (default: keep the
    given weight) overrides the weight of each response's last token (the official estimation gives EOS 0)."""

    name = "tisdpo"
    NEEDS = Needs(ref_token_logps=True, token_weights=True, labels=True)
    OPTIONS = {"eos_weight": None}

    def forward(self, inputs: PriorInputs) -> PriorOutput:
        if inputs.token_weights is None:
            raise ValueError(f"tisdpo needs token weights: {_FIX['token_weights']}")
        out = []
        for side in ("chosen", "rejected"):
            pol, mask = getattr(inputs.policy, side), getattr(inputs.policy, f"{side}_mask")
            w = getattr(inputs.token_weights, side).detach()  # (B, L)
            if w.shape != pol.shape:
                raise ValueError(f"{side} token weights {tuple(w.shape)} not aligned with {tuple(pol.shape)}")
            if self.options["eos_weight"] is not None:
                last = F.one_hot(mask.sum(-1) - 1, pol.shape[1]).bool()  # (B, L)
                w = torch.where(last, torch.full_like(w, float(self.options["eos_weight"])), w)
            out.append((1.0 - w) * pol + w * _ref_token(inputs, side))  # (B, L)
        return PriorOutput(*out)


class SparseMaskNet(nn.Module):
    """SparsePO's token-mask network over the reference's per-layer hidden states (the official
    "simple_all" shape): shared LayerNorm, one Linear(H, 1) + ReLU + dropout per layer, a bias-free
    mixer over layers + ReLU + dropout. (B, L, n_layers, H) -> (B, L), m >= 0."""

    def __init__(self, hidden_size: int, num_layers: int, dropout: float = 0.01, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.weight = nn.Parameter(torch.empty(num_layers, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_layers))
        self.mixer = nn.Parameter(torch.empty(num_layers))
        self.dropout = nn.Dropout(dropout)
        # nn.Linear's default init, per layer head and for the mixer.
        nn.init.uniform_(self.weight, -1 / math.sqrt(hidden_size), 1 / math.sqrt(hidden_size))
        nn.init.uniform_(self.bias, -1 / math.sqrt(hidden_size), 1 / math.sqrt(hidden_size))
        nn.init.uniform_(self.mixer, -1 / math.sqrt(num_layers), 1 / math.sqrt(num_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden.to(self.weight.dtype))  # (B, L, n, H)
        per_layer = self.dropout(F.relu(torch.einsum("blnh,nh->bln", x, self.weight) + self.bias))  # (B, L, n)
        return self.dropout(F.relu(per_layer @ self.mixer))  # (B, L)


class SparsePOPrior(Prior):
    """SparsePO: log zeta = logp_theta - sum_t m_u lr_t + sum_t m_d tokKL_t (gradient flows), with
    tokKL_t = -KL_t(pi_ref || pi_theta); so logp - log zeta = sum m_u lr_t - sum m_d tokKL_t and the
    margin is b (u - d). Masks come from SparseMaskNet on the reference's hidden states at the
    predicting positions; one shared network unless rw_kl_independent. Extra loss ``l1``:
    l1_u (|m_u^w|_1 + |m_u^l|_1) + l1_d (|m_d^w|_1 + |m_d^l|_1), both halved with a shared mask
    (as the official trainer). A mask that is off is 1. Needs hidden_size and num_layers."""

    name = "sparsepo"
    NEEDS = Needs(ref_token_logps=True, ref_full_vocab=True, ref_hidden_states=True, policy_full_vocab=True)
    OPTIONS = {
        "mask_dropout": 0.01,
        "l1_norm_param_u": 0.0,
        "l1_norm_param_d": 0.0,
        "mask_on_reward": True,
        "mask_on_kl": True,
        "rw_kl_independent": False,
    }

    def __init__(
        self, loss_cfg: LossSettings | None = None, *, hidden_size: int, num_layers: int, eps: float = 1e-5
    ) -> None:
        super().__init__(loss_cfg)
        o = self.options
        self.mask_u = SparseMaskNet(hidden_size, num_layers, o["mask_dropout"], eps)
        self.mask_d = SparseMaskNet(hidden_size, num_layers, o["mask_dropout"], eps) if o["rw_kl_independent"] else None
        shared = o["mask_on_reward"] and o["mask_on_kl"] and not o["rw_kl_independent"]
        self.l1_u = float(o["l1_norm_param_u"]) / (2.0 if shared else 1.0)
        self.l1_d = float(o["l1_norm_param_d"]) / (2.0 if shared else 1.0)

    def forward(self, inputs: PriorInputs) -> PriorOutput:
        if inputs.ref is None or inputs.ref.chosen_hidden is None:
            raise ValueError(f"sparsepo needs the reference hidden states: {_FIX['ref_hidden_states']}")
        o, out = self.options, []
        l1 = 0.0
        for side in ("chosen", "rejected"):
            pol, mask = getattr(inputs.policy, side), getattr(inputs.policy, f"{side}_mask")
            hidden = getattr(inputs.ref, f"{side}_hidden").detach()  # (B, L, n, H)
            m_u = self.mask_u(hidden).to(pol.dtype) * mask if o["mask_on_reward"] else mask.to(pol.dtype)  # (B, L)
            net_d = self.mask_d if self.mask_d is not None else self.mask_u
            m_d = net_d(hidden).to(pol.dtype) * mask if o["mask_on_kl"] else mask.to(pol.dtype)  # (B, L)
            lr = (pol - _ref_token(inputs, side)) * mask  # (B, L)
            tok_kl = -_kl_ref_policy(inputs, side).to(pol.dtype)  # (B, L)
            out.append(pol - m_u * lr + m_d * tok_kl)  # (B, L)
            if o["mask_on_reward"]:
                l1 = l1 + self.l1_u * m_u.abs().sum(-1)
            if o["mask_on_kl"]:
                l1 = l1 + self.l1_d * m_d.abs().sum(-1)
        extra = {"l1": l1} if isinstance(l1, torch.Tensor) and (self.l1_u or self.l1_d) else {}
        return PriorOutput(out[0], out[1], extra)


class LearnedPrior(Prior):
    """MI-DPO proper: log zeta per token from the learnable prior network (docs/algorithms.md, "MI-DPO
    proper"; midpo/core/prior_net.py). The prior network (midpo.train.prior_engine.PriorNetwork) computes it in
    its ``forward`` and the training step passes it as ``PriorInputs.prior_logps``; it is detached here, so the
    policy update treats zeta as fixed (the prior has its own update). a = beta (default 0.1)."""

    name = "learned"
    NEEDS = Needs(prior_network=True, reference="none")

    def forward(self, inputs: PriorInputs) -> PriorOutput:
        if inputs.prior_logps is None:
            raise ValueError(f"learned needs {_WHAT['prior_network']}: {_FIX['prior_network']}")
        out = []
        for side in ("chosen", "rejected"):
            z, pol = getattr(inputs.prior_logps, side), getattr(inputs.policy, side)
            if z.shape != pol.shape:
                raise ValueError(f"prior {side} log-probs {tuple(z.shape)} not aligned with policy {tuple(pol.shape)}")
            out.append(z.detach())
        return PriorOutput(*out)


PRIORS: dict[str, type[Prior]] = {
    cls.name: cls
    for cls in (
        DPOPrior,
        DICEPrior,
        CEntropyPrior,
        SimPOPrior,
        LNDPOPrior,
        RDPOPrior,
        TDPOPrior,
        TISDPOPrior,
        SparsePOPrior,
        LearnedPrior,
    )
}
PRIOR_NAMES: tuple[str, ...] = tuple(PRIORS)


def get_prior_class(name: str) -> type[Prior]:
    try:
        return PRIORS[name]
    except KeyError:
        raise ConfigError(f"unknown loss.prior {name!r}; valid priors: {', '.join(PRIOR_NAMES)}") from None


def build_prior(loss_cfg: LossSettings, model_config: Any = None) -> Prior:
    """The prior named by ``loss_cfg.prior``; ``model_config`` (an HF config) gives SparsePO its sizes."""
    cls = get_prior_class(loss_cfg.prior)
    if cls is SparsePOPrior:
        if model_config is None:
            raise ValueError("sparsepo needs the model config (hidden_size, num_hidden_layers) for its mask network")
        eps = getattr(model_config, "rms_norm_eps", None) or getattr(model_config, "layer_norm_eps", 1e-5)
        return cls(loss_cfg, hidden_size=model_config.hidden_size, num_layers=model_config.num_hidden_layers, eps=eps)
    return cls(loss_cfg)


def check_needs(prior: str | Prior | type[Prior], available: set[str] | frozenset[str]) -> None:
    """Raise ValueError naming what is missing and how to provide it."""
    if isinstance(prior, str):
        cls = get_prior_class(prior)
    else:
        cls = prior if isinstance(prior, type) else type(prior)
    unknown = sorted(set(available) - set(AVAILABLE_KEYS))
    if unknown:
        raise ValueError(f"unknown availability keys {unknown}; valid: {', '.join(AVAILABLE_KEYS)}")
    problems = [
        f"{cls.name} needs {_WHAT[need]}: {_FIX[need]}"
        for need in cls.NEEDS.required()
        if not any(k in available for k in _SERVED_BY[need])
    ]
    if problems:
        raise ConfigError("; ".join(problems) + f" (available: {', '.join(sorted(available)) or 'nothing'})")


def prior_log_ratios(prior: Prior, inputs: PriorInputs) -> LogRatios:
    """The first half of the loss: the prior's log zeta applied, per pair (what every link reads)."""
    check_needs(prior, inputs.available())
    z = prior(inputs)
    return log_ratios(inputs.policy, z.chosen, z.rejected, log_ratio=z.log_ratio, constant=z.constant,
                      extra_losses=z.extra_losses)


def compute_loss(prior: Prior, inputs: PriorInputs, loss_cfg: LossSettings, *,
                 terms: tuple[Term, ...] | None = None, delta: float | None = None) -> LossOutput:
    """The trainer's one entry point: the prior's log zeta, then the links of ``loss_cfg`` (``terms``: already
    resolved by midpo.core.losses.link_terms) with a = prior.beta. ``delta``: bco_pair's running reward mean."""
    return loss_from_ratios(prior_log_ratios(prior, inputs), beta=prior.beta,
                            terms=link_terms(loss_cfg) if terms is None else terms,
                            sft_weight=loss_cfg.sft_weight, delta=delta)
