"""Learning-rate schedules: linear warmup, then cosine / linear decay to zero, or constant.

A pure function of the step (`lr_multiplier`) so the schedule is testable without an optimizer and
exactly reproducible on resume; `make_scheduler` wraps it in a `LambdaLR` that DeepSpeed steps once
per optimizer step and saves in its checkpoint.
"""

from __future__ import annotations

import math

import torch


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(total_steps * warmup_ratio))


def lr_multiplier(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr used for optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup  # step 0 trains at lr/warmup, not at 0 (a wasted step otherwise)
    if kind == "constant":
        return 1.0
    decay = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; use cosine, linear or constant")


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, kind: str):
    warm = warmup_steps(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, warm, kind))
