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


# ---------------------------------------------------------------------------------------------
# auto: train.layout / train.ds_config resolved from a recipe (the choice itself: tests/core/test_auto.py)

def _resolve(overrides=(), *, attn="sdpa", dtype="fp32", cuda=False, gib=64.0, dense=True, shape=SHAPE, world=2):
    from midpo.runtime.planning import resolve_auto

    cfg = load_config(None, [f"model.dtype={dtype}", *overrides])
    return resolve_auto(cfg, shape, bench_lengths(8, 4, 0), world=world, attn=attn, dtype=dtype, cuda=cuda,
                        device_gib=gib, memory_source="test", dense_mask=dense)


def test_auto_on_cpu_is_stage_0_shared_and_recorded():
    cfg, picks = _resolve()
    assert (cfg.train.ds_config, cfg.train.layout) == ("zero0_cpu_fp32", "shared")
    assert cfg.train.packing is None and cfg.train.share_prompt is None  # the older booleans stay unset
    assert picks["train.ds_config"]["value"] == "zero0_cpu_fp32" and "fits 90% of the 64.00 GiB test" in \
        picks["train.ds_config"]["reason"]
    assert picks["train.layout"]["value"] == "shared" and "sdpa" in picks["train.layout"]["reason"]
    # the resolved config round-trips (what <run_dir>/config.yaml and a checkpoint record), and resolves to itself
    from midpo.config import config_from_dict, to_dict

    assert config_from_dict(to_dict(cfg)) == cfg
    again, none = _resolve([f"train.ds_config={cfg.train.ds_config}", f"train.layout={cfg.train.layout}"])
    assert again == cfg and none == {}


def test_auto_when_nothing_fits_takes_the_smallest_need_and_never_offloads_on_cpu():
    cfg, picks = _resolve(gib=0.05)  # nothing fits 50 MB
    need = picks["train.ds_config"]["needed_gib"]
    assert list(need) == ["zero0_cpu_fp32", "zero2_cpu_fp32", "zero3_cpu_fp32"]  # CPU: no offload candidate
    # this 20M-parameter model: ZeRO-3's gathered weights and buckets cost more than its sharding saves
    assert cfg.train.ds_config == min(need, key=need.get) and "nothing fits" in picks["train.ds_config"]["reason"]


def test_auto_on_cuda_bf16_can_offload_and_flash_packs():
    cfg, picks = _resolve(attn="flash_attention_2", dtype="bf16", cuda=True, gib=1e-3)
    assert cfg.train.ds_config == "zero3_offload" and cfg.train.layout == "packed"
    cfg, _ = _resolve(attn="flash_attention_2", dtype="bf16", cuda=True, gib=80.0)
    assert cfg.train.ds_config == "zero0_bf16"


def test_auto_fallbacks_compile_remote_code_unknown_shape_fp16():
    from midpo.config import ConfigError

    cfg, picks = _resolve(["train.compile=true"], gib=1e-3)  # compile: ZeRO-3 is no candidate
    assert list(picks["train.ds_config"]["needed_gib"]) == ["zero0_cpu_fp32", "zero2_cpu_fp32"]
    assert "train.compile" in picks["train.ds_config"]["reason"]
    cfg, picks = _resolve(dense=False)
    assert cfg.train.layout == "padded" and "remote code" in picks["train.layout"]["reason"]
    cfg, picks = _resolve(shape=None)
    assert cfg.train.ds_config == "zero3_cpu_fp32" and "no memory plan" in picks["train.ds_config"]["reason"]
    with pytest.raises(ConfigError, match="fp16"):
        _resolve(dtype="fp16")


def test_explicit_settings_are_kept():
    cfg, picks = _resolve(["train.packing=false", "train.ds_config=zero2_cpu_fp32"])
    assert (cfg.train.layout, cfg.train.ds_config, picks) == ("padded", "zero2_cpu_fp32", {})
    cfg, picks = _resolve(["train.share_prompt=true"], attn="flash_attention_2")  # not overridden (train refuses it)
    assert cfg.train.layout == "shared" and "train.layout" not in picks
