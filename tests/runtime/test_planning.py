"""runtime.planning: the planner's settings from a recipe and a DeepSpeed config, held against CPU peak memory
measured by bench/plan_bench.py (docs/plan.md: method and the full table): three configurations within 10%."""

from __future__ import annotations

import pytest
import torch

from midpo.config import load_config
from midpo.core import plan as P
from midpo.runtime.planning import settings_from

SHAPE = P.ModelShape(vocab=8000, hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=4)  # plan_bench's model
# the ZeRO sections of the shipped templates (zero3_cpu_fp32 leaves max_live/reuse at DeepSpeed's 1e9)
ZERO = {0: {"stage": 0},
        2: {"stage": 2, "reduce_bucket_size": "auto", "allgather_bucket_size": "auto"},
        3: {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto"}}


def bench_lengths(micro: int, steps: int, seed: int) -> list[tuple[int, int, int]]:
    """The (prompt, chosen, rejected) lengths of bench/plan_bench.rows_for (same generator calls)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(micro * steps):
        p, c, r = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((16, 80), (16, 192), (16, 192)))
        torch.randint(3, 8000, (p + c + r,), generator=gen)
        out.append((p, c, r))
    return out


# (processes, ZeRO stage, layout, micro, measured MiB: the larger rank's resident high-water mark over its baseline)
MEASURED = [(2, 0, "padded", 8, 1069.9), (1, 3, "padded", 16, 2104.1), (2, 2, "padded", 16, 1853.3)]


@pytest.mark.parametrize("procs,stage,layout,micro,measured", MEASURED)
def test_cpu_peak_within_10_percent(procs, stage, layout, micro, measured):
    cfg = load_config(None, ["model.dtype=fp32", f"train.micro_batch_size={micro}", "train.packing=false"])
    s = settings_from(cfg, {"zero_optimization": ZERO[stage]}, world=procs, attn="sdpa", dtype="fp32", cuda=False,
                      hidden=SHAPE.hidden)
    peak = max(P.memory(SHAPE, s, P.widest(P.micro_batches(bench_lengths(micro, 4, rank), micro, layout, None))).peak
               for rank in range(procs))
    assert abs(peak / 2 ** 20 / measured - 1) < 0.10
