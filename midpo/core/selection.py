"""Pair selection of on-policy rounds (`midpo iterate`), pure: scores in, chosen/rejected indices out.

DICE (Chen et al., "Bootstrapping Language Models with DPO Implicit Rewards"): the implicit reward of the
current DPO policy pi_t against its own reference pi_{t-1} is

    r(x, y) = beta * (log pi_t(y|x) - log pi_{t-1}(y|x))        (sums over response tokens, EOS included)

and pairs are selected with a length-regularized reward, r(x, y) - alpha * |y| (|y| in tokens): chosen is
the best of a prompt's samples, rejected the worst. Without the length term the longer answers win, since
DPO raises the log-ratio of long responses more (its length exploitation). The same selection serves every
labeller: the checker's 0/1 scores or a reward model's scores take r's place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# why a prompt made no pair (selection.json counts them)
DROP_TOO_FEW = "too_few_samples"
DROP_TIE = "tie"
DROP_MARGIN = "below_margin"


def implicit_rewards(policy_logps: Sequence[float], reference_logps: Sequence[float], beta: float) -> list[float]:
    """beta * (log pi_t(y|x) - log pi_{t-1}(y|x)) per sample (sequence log-prob sums)."""
    if len(policy_logps) != len(reference_logps):
        raise ValueError(f"{len(policy_logps)} policy log-probs vs {len(reference_logps)} reference log-probs")
    return [beta * (float(p) - float(r)) for p, r in zip(policy_logps, reference_logps)]


def length_regularized(scores: Sequence[float], lengths: Sequence[int], alpha: float) -> list[float]:
    """DICE's shaped reward: score - alpha * |y|."""
    if len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} scores vs {len(lengths)} lengths")
    return [float(s) - alpha * int(n) for s, n in zip(scores, lengths)]


def select_pair(shaped: Sequence[float], min_margin: float = 0.0) -> tuple[int, int] | str:
    """(best, worst) sample indices of one prompt, or the reason it makes no pair. Best is the first maximum,
    worst the last minimum (deterministic). Equal best and worst (a tie, e.g. every answer right) carry no
    preference: dropped; so is a gap not above `min_margin`."""
    if len(shaped) < 2:
        return DROP_TOO_FEW
    if any(not math.isfinite(s) for s in shaped):
        raise ValueError(f"non-finite score among {list(shaped)}")
    best = max(range(len(shaped)), key=lambda i: (shaped[i], -i))
    worst = min(range(len(shaped)), key=lambda i: (shaped[i], -i))
    gap = shaped[best] - shaped[worst]
    if gap == 0:
        return DROP_TIE
    if gap <= min_margin:
        return DROP_MARGIN
    return best, worst


def replay_count(n_onpolicy: int, fraction: float, available: int) -> int:
    """Offline pairs to add so that they are `fraction` of the mixed set: n / (n_onpolicy + n) = fraction,
    rounded to the nearest integer, capped at what is available."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
    return min(available, int(math.floor(n_onpolicy * fraction / (1.0 - fraction) + 0.5)))


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if len(values) else float("nan")
