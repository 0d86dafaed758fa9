"""Loss links: the function of the prior-adjusted margin (issue #21), pure functions of tensors.

midpo's loss has two axes. The prior zeta (midpo.core.priors) decides what is compared; the link
decides the function of it. Per pair, with the prior already applied:

    r_w = logp_theta(y_w) - log zeta(y_w)      chosen_logratio   (B,)
    r_l = logp_theta(y_l) - log zeta(y_l)      rejected_logratio (B,)
    h   = r_w - r_l                             the margin; beta (= a) scales it for most links

and every link maps (r_w, r_l, beta, its own hyperparameters) to a per-pair loss (B,) with gradient.
`sigmoid` is DPO, the loss midpo.core.losses.mi_dpo_loss computes. Length normalization, a missing
reference and target margins belong to the prior (e.g. the SimPO prior), so a link takes r_w and
r_l as given. docs/algorithms.md, "Links", has each formula, its source and where TRL's code differs.

    losses = link_loss("ipo", r_w, r_l, beta=0.1)                                   # (B,)
    total, terms = combine([("sigmoid", 1.0, {}), ("bco_pair", 0.5, {"delta": d})], r_w, r_l, beta=0.1)

Math runs in fp32 at least (float64 inputs stay float64), in logsigmoid forms, so that margins and
log-ratios of +-1e4 give finite losses and gradients. Metrics stay TRL's for every link
(rewards = beta * logratio, computed by midpo.core.losses.LossOutput); ``combine`` also returns each
term's weighted per-pair value for loss/<link>.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _prep(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Both sides as (B,) in fp32 at least (float64 stays float64); beta checked."""
    if chosen_logratio.dim() != 1 or chosen_logratio.shape != rejected_logratio.shape:
        raise ValueError(
            f"links take per-pair (B,) log-ratios of equal shape, got chosen {tuple(chosen_logratio.shape)} "
            f"and rejected {tuple(rejected_logratio.shape)}"
        )
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be finite and > 0, got {beta}")
    dt = torch.promote_types(torch.promote_types(torch.float32, chosen_logratio.dtype), rejected_logratio.dtype)
    return chosen_logratio.to(dt), rejected_logratio.to(dt)


def _check_open(link: str, name: str, value: float, lo: float, hi: float, lo_closed: bool = False) -> None:
    ok = (lo <= value if lo_closed else lo < value) and value < hi
    if not ok:
        raise ValueError(f"link {link!r}: {name} must lie in {'[' if lo_closed else '('}{lo}, {hi}), got {value}")


# ---------------------------------------------------------------------------------------------
# The links. Each: (chosen_logratio (B,), rejected_logratio (B,), *, beta, own hyperparameters) -> (B,).
# The beta-scaled margin is beta * r_w - beta * r_l (the difference of TRL's rewards), computed in the
# same order as midpo.core.losses.mi_dpo_loss so that `sigmoid` reproduces it bit for bit.
# ---------------------------------------------------------------------------------------------


def sigmoid(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float, eps: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023): -log sigma(beta h). With label smoothing eps (cDPO, Mitchell 2023):
    -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), eps in [0, 0.5)."""
    _check_open("sigmoid", "eps", eps, 0.0, 0.5, lo_closed=True)
    c, r = _prep(chosen_logratio, rejected_logratio, beta)
    margin = beta * c - beta * r  # (B,)
    losses = -F.logsigmoid(margin)
    if eps:
        losses = (1.0 - eps) * losses - eps * F.logsigmoid(-margin)
    return losses


def ipo(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17): (h - 1/(2 tau))^2 with tau = beta; h is NOT scaled by beta.
    The margin is taken as given: TRL's per-token-mean IPO is this link under a length-normalizing prior."""
    c, r = _prep(chosen_logratio, rejected_logratio, beta)
    return (c - r - 1.0 / (2.0 * beta)) ** 2


def hinge(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float, delta: float = 1.0) -> Tensor:
    """SLiC calibration loss (Zhao et al. 2023): max(0, delta - beta h). delta = 1 is TRL's `hinge`;
    SLiC-HF's own form is beta = 1 with its margin delta (and a reference-free prior)."""
    if not math.isfinite(delta):
        raise ValueError(f"link 'hinge': delta must be finite, got {delta}")
    c, r = _prep(chosen_logratio, rejected_logratio, beta)
    return F.relu(delta - (beta * c - beta * r))


def robust(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float, eps: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), eps = probability that a label is flipped, in [0, 0.5):
    [(1 - eps) l(y_w, y_l) - eps l(y_l, y_w)] / (1 - 2 eps), l(a, b) = -log sigma(beta (r_a - r_b))."""
    _check_open("robust", "eps", eps, 0.0, 0.5, lo_closed=True)
    c, r = _prep(chosen_logratio, rejected_logratio, beta)
    margin = beta * c - beta * r  # (B,)
    clean = -F.logsigmoid(margin)  # l(y_w, y_l)
    flipped = -F.logsigmoid(-margin)  # l(y_l, y_w)
    return ((1.0 - eps) * clean - eps * flipped) / (1.0 - 2.0 * eps)


def exo_pair(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float, eps: float = 1e-3) -> Tensor:
    """EXO-pref (Ji et al. 2024, Eq. 16), K = 2: KL(q || p) with q = softmax(beta r) over {y_w, y_l}
    = (sigma(beta h), sigma(-beta h)) and the smoothed label p = (1 - eps, eps), eps in (0, 1)."""
    _check_open("exo_pair", "eps", eps, 0.0, 1.0)
    c, r = _prep(chosen_logratio, rejected_logratio, beta)
    margin = beta * c - beta * r  # (B,)
    # log q from logsigmoid (never log of a sigmoid); q * (log q - log p) is 0 * finite where q underflows.
    log_qw, log_ql = F.logsigmoid(margin), F.logsigmoid(-margin)
    return torch.sigmoid(margin) * (log_qw - math.log1p(-eps)) + torch.sigmoid(-margin) * (log_ql - math.log(eps))


def nca_pair(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float) -> Tensor:
    """NCA (Chen et al. 2024), pairwise: -log sigma(beta r_w) - 1/2 log sigma(-beta r_w) - 1/2 log sigma(-beta r_l).
    Not a function of the margin alone: it anchors each side's own log-ratio."""
    c, r = _prep(chosen_logratio, rejected_logratio, beta)
    rw, rl = beta * c, beta * r  # (B,) TRL's rewards
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


def bco_pair(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float, delta: float | Tensor) -> Tensor:
    """BCO (Jung et al. 2024) on pairs: -log sigma(beta r_w - delta) - log sigma(-(beta r_l - delta)).
    delta is the reward shift, a running mean of the rewards beta r (both sides) kept by the caller;
    a float, a 0-d tensor or one value per pair. It is a constant of the step (detached here)."""
    c, r = _prep(chosen_logratio, rejected_logratio, beta)
    d = torch.as_tensor(delta, dtype=c.dtype, device=c.device).detach()
    if d.dim() != 0 and d.shape != c.shape:
        raise ValueError(f"link 'bco_pair': delta must be a scalar or per pair {tuple(c.shape)}, got {tuple(d.shape)}")
    if not bool(torch.isfinite(d).all()):
        raise ValueError("link 'bco_pair': delta must be finite")
    rw, rl = beta * c, beta * r  # (B,)
    return -F.logsigmoid(rw - d) - F.logsigmoid(-(rl - d))


def sppo_hard(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float) -> Tensor:
    """SPPO (Wu et al. 2024, Eq. 4.7) with hard win probabilities P(y_w) = 1, P(y_l) = 0 and eta = 1/beta:
    (r_w - eta/2)^2 + (r_l + eta/2)^2, summed over the pair's two responses (as TRL); the log-ratios are
    NOT scaled by beta. SPPO's pi_t is the previous iterate: in midpo that is the prior's choice."""
    c, r = _prep(chosen_logratio, rejected_logratio, beta)
    half_eta = 0.5 / beta
    return (c - half_eta) ** 2 + (r + half_eta) ** 2


def apo_zero(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024): (1 - sigma(beta r_w)) + sigma(beta r_l), TRL's value
    (the paper's -sigma(beta r_w) + sigma(beta r_l) plus the constant 1). 1 - sigma(x) is computed as sigma(-x)."""
    c, r = _prep(chosen_logratio, rejected_logratio, beta)
    return torch.sigmoid(-(beta * c)) + torch.sigmoid(beta * r)


def apo_down(chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024): sigma(beta r_w) + (1 - sigma(beta h)), TRL's value
    (the paper's sigma(beta r_w) - sigma(beta h) plus the constant 1)."""
    c, r = _prep(chosen_logratio, rejected_logratio, beta)
    return torch.sigmoid(beta * c) + torch.sigmoid(-(beta * c - beta * r))


# ---------------------------------------------------------------------------------------------
# The registry: one dict, one list of names; options (hyperparameter -> default) come from each
# function's keyword-only parameters, so a default is written once, in the signature.
# ---------------------------------------------------------------------------------------------


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()  # marks a hyperparameter without a default


@dataclass(frozen=True)
class Link:
    name: str
    fn: Callable[..., Tensor]
    options: Mapping[str, Any]  # hyperparameter -> default, or REQUIRED
    source: str
    hint: str = ""  # how to choose a REQUIRED hyperparameter

    def __call__(self, chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float, **params: Any) -> Tensor:
        return self.fn(chosen_logratio, rejected_logratio, beta=beta, **self._filled(params))

    def _filled(self, params: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(self.options))
        if unknown:
            valid = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"link {self.name!r}: unknown parameters {unknown}; valid parameters: {valid}")
        opts = {**self.options, **params}
        missing = [k for k, v in opts.items() if v is REQUIRED]
        if missing:
            raise ValueError(f"link {self.name!r} needs {missing[0]} (no default): {self.hint}")
        return opts

    def check(self, **params: Any) -> dict[str, Any]:
        """The hyperparameters with their defaults filled in, after every check a call makes (unknown or missing
        names, ranges: the link runs once on one float64 pair, beta = 1); raises the call's ValueError."""
        opts = self._filled(params)
        zero = torch.zeros(1, dtype=torch.float64)
        self.fn(zero, zero, beta=1.0, **opts)
        return opts


def _link(fn: Callable[..., Tensor], source: str, hint: str = "") -> Link:
    options = {
        p.name: (REQUIRED if p.default is inspect.Parameter.empty else p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "beta"
    }
    return Link(fn.__name__, fn, options, source, hint)


LINKS: dict[str, Link] = {
    link.name: link
    for link in (
        _link(sigmoid, "DPO, Rafailov et al. 2023 (arXiv 2305.18290); cDPO label smoothing, Mitchell 2023"),
        _link(ipo, "IPO, Azar et al. 2023 (arXiv 2310.12036), Eq. 17"),
        _link(hinge, "SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425)"),
        _link(
            robust,
            "Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409)",
            "the label-flip rate, in [0, 0.5); the paper's experiments use 0.1 (eps = 0 is DPO)",
        ),
        _link(exo_pair, "EXO, Ji et al. 2024 (arXiv 2402.00856), Eq. 16"),
        _link(nca_pair, "NCA, Chen et al. 2024 (arXiv 2402.05369)"),
        _link(
            bco_pair,
            "BCO, Jung et al. 2024 (arXiv 2404.04656)",
            "the reward shift: a running mean of the detached rewards beta * logratio of both sides, kept by the "
            "caller (0 reproduces TRL >= 0.29's bco_pair)",
        ),
        _link(sppo_hard, "SPPO, Wu et al. 2024 (arXiv 2405.00675), Eq. 4.7 with hard probabilities"),
        _link(apo_zero, "APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 7"),
        _link(apo_down, "APO-down, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 8"),
    )
}
LINK_NAMES: tuple[str, ...] = tuple(LINKS)


def get_link(name: str) -> Link:
    try:
        return LINKS[name]
    except KeyError:
        raise ValueError(f"unknown link {name!r}; valid links: {', '.join(LINK_NAMES)}") from None


def link_loss(name: str, chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float, **params: Any) -> Tensor:
    """Per-pair loss (B,) of the link ``name``; ``params`` are its hyperparameters (defaults filled in)."""
    return get_link(name)(chosen_logratio, rejected_logratio, beta=beta, **params)


def combine(
    terms: Sequence[tuple[str, float, Mapping[str, Any] | None]],
    chosen_logratio: Tensor,
    rejected_logratio: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of links (TRL's multi-loss ``loss_type=[...]``, ``loss_weights=[...]``), per pair.

    terms: ``(link name, weight, params or None)``, each link at most once. Returns the per-pair total
    (B,) with gradient and, per link, its weighted per-pair value (B,), detached, for loss/<link>: the
    values add up to the total (the mean of the total is TRL's sum of weighted means)."""
    if not terms:
        raise ValueError(
            f"combine needs at least one (link, weight, params) term; valid links: {', '.join(LINK_NAMES)}"
        )
    total: Tensor | None = None
    parts: dict[str, Tensor] = {}
    for term in terms:
        if not isinstance(term, (tuple, list)) or len(term) != 3:
            raise ValueError(f"each term is (link name, weight, params), got {term!r}")
        name, weight, params = term
        if name in parts:
            raise ValueError(f"link {name!r} appears twice in combine; merge its weights into one term")
        weight = float(weight)
        if not math.isfinite(weight):
            raise ValueError(f"link {name!r}: weight must be finite, got {weight}")
        value = weight * link_loss(name, chosen_logratio, rejected_logratio, beta=beta, **dict(params or {}))
        parts[name] = value.detach()
        total = value if total is None else total + value
    assert total is not None
    return total, parts
