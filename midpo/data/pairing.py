"""Rated or ranked responses -> (chosen, rejected) index pairs, by a named strategy. Pure functions.

`goodness[i]` is response i's score (higher is better) or its negated rank (rank 1 is best). Ties never
become pairs: a pair's margin `goodness[chosen] - goodness[rejected]` is > 0 and >= `min_margin`.

    best_vs_worst   the first best response against the first worst (index order breaks ties)
    best_vs_random  the first best against one response drawn uniformly from those it beats by the margin
                    (the Zephyr / ultrafeedback_binarized recipe); the draw is `row_rng`'s, seeded per row
    all_pairs       every (i, j) with goodness[i] - goodness[j] >= the margin, i then j in index order
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from midpo.runtime.fingerprint import hash_json

STRATEGIES = ("best_vs_worst", "best_vs_random", "all_pairs")


def row_rng(seed: int, key: object) -> random.Random:
    """The per-row generator of best_vs_random: Random(first 64 bits of sha256 of the canonical JSON of
    [seed, key]) -- a function of the seed and the row's content, not of its position, chunking or workers."""
    return random.Random(int(hash_json([seed, key])[:16], 16))


def _beats(a: float, b: float, min_margin: float) -> bool:
    return a > b and a - b >= min_margin


def make_pairs(goodness: Sequence[float], strategy: str, min_margin: float = 0.0,
               rng: random.Random | None = None) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs; empty when no two responses differ by the margin."""
    g = list(goodness)
    if len(g) < 2:
        return []
    if strategy == "all_pairs":
        return [(i, j) for i in range(len(g)) for j in range(len(g)) if _beats(g[i], g[j], min_margin)]
    best = max(range(len(g)), key=lambda i: (g[i], -i))  # the first of the best
    if strategy == "best_vs_worst":
        worst = min(range(len(g)), key=lambda i: (g[i], i))  # the first of the worst
        return [(best, worst)] if _beats(g[best], g[worst], min_margin) else []
    if strategy == "best_vs_random":
        cands = [j for j in range(len(g)) if _beats(g[best], g[j], min_margin)]
        if not cands:
            return []
        assert rng is not None, "best_vs_random needs the row's generator"
        return [(best, cands[rng.randrange(len(cands))])]
    raise ValueError(f"unknown pairing strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
