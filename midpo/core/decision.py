"""Issue #23's pre-stated decision rule (docs/experiment.md), pure: paired per-seed differences, their 95%
t-interval, and the reading "beats" / "worse" / "no difference" / "inconclusive" against a minimum effect."""

from __future__ import annotations

import math

# two-sided 95% t quantiles t_{0.975, df}, df = 1..30 (standard tables); beyond 30 the normal's 1.96 is within 4%
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df >= 1), got df {df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_interval(xs: list[float]) -> dict:
    """{n, mean, sd, half, lo, hi}: the 95% t-interval on the mean of ``xs`` (half = nan for n < 2)."""
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "sd": float("nan"), "half": float("nan"), "lo": float("nan"),
                "hi": float("nan")}
    m = sum(xs) / n
    if n < 2:
        return {"n": 1, "mean": m, "sd": float("nan"), "half": float("nan"), "lo": float("nan"), "hi": float("nan")}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": m, "sd": sd, "half": half, "lo": m - half, "hi": m + half}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Per-seed differences a[s] - b[s] over the seeds both have, and their ``mean_interval`` (+ "seeds", "diffs")."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    return {**mean_interval(diffs), "seeds": seeds, "diffs": diffs}


def decide(iv: dict, delta: float, higher_is_better: bool = True) -> str:
    """The reading of a paired interval (docs/experiment.md): "beats" when the interval is entirely on the good
    side of 0 and the mean at least ``delta`` there; "worse" the mirror; "no difference" when the whole interval
    lies within (-delta, +delta); else "inconclusive" (also with fewer than 2 seeds)."""
    lo, hi, m = iv["lo"], iv["hi"], iv["mean"]
    if iv["n"] < 2 or any(math.isnan(v) for v in (lo, hi, m)):
        return "inconclusive"
    if not higher_is_better:
        lo, hi, m = -hi, -lo, -m
    if lo > 0 and m >= delta:
        return "beats"
    if hi < 0 and m <= -delta:
        return "worse"
    if -delta < lo and hi < delta:
        return "no difference"
    return "inconclusive"


def choose_by_validation(means: dict[float, float], tie: float = 0.002) -> float:
    """docs/experiment.md's choice of the prior lr: the candidate with the highest mean validation accuracy; one
    within ``tie`` of the best goes to the smaller candidate."""
    if not means:
        raise ValueError("choose_by_validation: no candidates")
    best = max(means.values())
    return min(c for c, m in means.items() if m >= best - tie)
