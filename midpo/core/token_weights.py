"""TIS-DPO per-token weights from a forward and a reverse DPO model (docs/algorithms.md, TIS-DPO): pure functions
of one response's per-token log-probs (numpy). The stage that scores the models is midpo.stages.weights."""

from __future__ import annotations

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks of `x`, ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def rank_weights(scores: np.ndarray, lo: float = 0.7, hi: float = 1.3, eos_weight: float = 0.0) -> np.ndarray:
    """Per-token weights of ONE response (last token = EOS) from its scores s_t: rank-mapped to [lo, hi]."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.empty(len(scores), dtype=np.float32)
    body = scores[:-1]
    if len(body) == 1:
        out[:-1] = (lo + hi) / 2
    elif len(body) > 1:
        out[:-1] = lo + (hi - lo) * average_ranks(body) / (len(body) - 1)
    if len(scores):
        out[-1] = eos_weight
    return out


def tis_scores(lp_fwd: np.ndarray, lp_rev: np.ndarray, side: str) -> np.ndarray:
    """s_t of one response: fwd - rev for chosen, its negation for rejected."""
    s = np.asarray(lp_fwd, dtype=np.float64) - np.asarray(lp_rev, dtype=np.float64)
    return s if side == "chosen" else -s
