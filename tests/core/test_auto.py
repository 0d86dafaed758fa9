"""core.auto: `train.ds_config=auto` picks the cheapest ZeRO stage whose memory fits, `train.layout=auto` the layout
the attention kernel serves best. The ZeRO cases are placed by model-state bytes computed here by hand (ZeRO paper
accounting, DeepSpeed's bf16 optimizer), not by the planner's code: a device between two candidates' needs must get
the cheaper one that fits."""

from __future__ import annotations

import pytest

from midpo.core.auto import AUTO_MARGIN, choose_layout, choose_zero
from midpo.core.plan import GIB, ModelShape, Settings

# ~1.9B parameters, MHA: ZeRO-3's gathered weights (reuse distance 1e9 / 2 + a layer) are well under the model
SHAPE = ModelShape(vocab=32000, hidden=4096, intermediate=11008, layers=8, heads=32, kv_heads=32)
WORLD = 8
LENGTHS = [(8, 8, 8)] * 64  # 16-token sequences, micro 1: activations and logits are a few MB
HEADROOM, CONTEXT = 1.08, 1.5  # core.plan's allocator headroom and CUDA context (the calibrated constants)


def settings(stage: int, offload: bool = False) -> Settings:
    return Settings(world=WORLD, zero_stage=stage, offload_optimizer=offload, dtype_bytes=2, micro=1, grad_accum=1,
                    layout="packed", attn="flash_attention_2", max_live_parameters=1e9 if stage == 3 else 0.0,
                    max_reuse_distance=1e9 if stage == 3 else 0.0, reduce_bucket=2 ** 24 if stage else 0.0,
                    allgather_bucket=2 ** 24 if stage == 2 else 0.0, cuda=True)


CANDIDATES = [("zero0_bf16", settings(0)), ("zero2_bf16", settings(2)), ("zero3_bf16", settings(3)),
              ("zero3_offload", settings(3, True))]


def hand_needed_gib() -> dict[str, float]:
    """Model states per device (bytes), by hand: bf16 weights 2P; stage 0 fp32 gradient accumulators + bf16 grads
    (6P) and master + Adam partitioned (12P/N); ZeRO-2 bf16 grads and master + Adam partitioned; ZeRO-3 everything
    partitioned plus the gathered weights (reuse distance / 2 + one layer, bf16) and its fp32 gradient partition at
    the step; offload: only the gathered weights stay on the device. ZeRO-2/3 under bf16 also hold an fp32 copy of
    their gradient partition while the optimizer steps (4P/N), which then sets the peak (it exceeds the buckets and
    these short pairs' activations). Buckets: 2^24 elements each in bf16."""
    L = SHAPE.layers
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    P = L * layer + 4096 + 2 * 32000 * 4096
    gathered = 2 * (1e9 / 2 + layer)
    bucket = 2 * 2 ** 24
    step_fp32 = 4 * P / WORLD
    peaks = {"zero0_bf16": 2 * P + 6 * P + 12 * P / WORLD,
             "zero2_bf16": 2 * P + 2 * P / WORLD + 12 * P / WORLD + max(2 * bucket, step_fp32),
             "zero3_bf16": 2 * P / WORLD + gathered + 2 * P / WORLD + 12 * P / WORLD + max(bucket, step_fp32),
             "zero3_offload": gathered + bucket}
    return {k: v / GIB * HEADROOM + CONTEXT for k, v in peaks.items()}


def device_for(need_gib: float) -> float:
    """The device memory at which a need of `need_gib` just fits auto's share of it."""
    return need_gib / (1 - AUTO_MARGIN)


def test_hand_accounting_orders_the_candidates():
    need = hand_needed_gib()
    assert need["zero0_bf16"] > need["zero2_bf16"] > need["zero3_bf16"] > need["zero3_offload"]


@pytest.mark.parametrize("expect", ["zero0_bf16", "zero2_bf16", "zero3_bf16", "zero3_offload"])
def test_the_cheapest_stage_that_fits(expect):
    need = hand_needed_gib()
    names = [n for n, _ in CANDIDATES]
    i = names.index(expect)
    # halfway between this candidate's need and the next more expensive one's: it fits, the cheaper ones do not
    device = device_for((need[expect] + need[names[i - 1]]) / 2 if i else need[expect] * 2)
    pick = choose_zero(SHAPE, CANDIDATES, LENGTHS, device)
    assert pick.value == expect, (pick.reason, need)
    # the planner agrees with the hand sum up to these short pairs' activations and logits (~0.05 GiB)
    assert pick.needed_gib[expect] == pytest.approx(need[expect], abs=0.1)
    assert f"fits 90% of the {device:.2f} GiB" in pick.reason
    assert list(pick.needed_gib) == names[:i + 1]  # stops at the first that fits
    if i:
        assert "cheaper ones do not fit" in pick.reason and names[i - 1] in pick.reason


def test_without_zero2_a_misfit_at_stage_0_goes_to_zero3():
    need = hand_needed_gib()
    cands = [CANDIDATES[0], CANDIDATES[2], CANDIDATES[3]]
    assert choose_zero(SHAPE, cands, LENGTHS, need["zero0_bf16"] * 2).value == "zero0_bf16"
    assert choose_zero(SHAPE, cands, LENGTHS, device_for(need["zero2_bf16"])).value == "zero3_bf16"


def test_the_margin_keeps_a_borderline_fit_out():
    """A stage that fits the device only within AUTO_MARGIN (what `midpo plan` still calls fitting) is passed over."""
    need = hand_needed_gib()
    device = need["zero0_bf16"] / (1 - AUTO_MARGIN / 2)
    assert choose_zero(SHAPE, CANDIDATES, LENGTHS, device).value == "zero2_bf16"
    assert choose_zero(SHAPE, CANDIDATES, LENGTHS, device, margin=0.0).value == "zero0_bf16"


def test_nothing_fits_takes_the_last_and_says_so():
    need = hand_needed_gib()
    pick = choose_zero(SHAPE, CANDIDATES, LENGTHS, need["zero3_offload"] / 2)
    assert pick.value == "zero3_offload" and "nothing fits" in pick.reason
    assert set(pick.needed_gib) == {n for n, _ in CANDIDATES}
    cpu = [("zero0_cpu_fp32", settings(0)), ("zero3_cpu_fp32", settings(3))]  # CPU: no offload candidate
    assert choose_zero(SHAPE, cpu, LENGTHS, 0.5).value == "zero3_cpu_fp32"  # the smaller need at 8 devices
    with pytest.raises(ValueError):
        choose_zero(SHAPE, [], LENGTHS, 80.0)


def test_longer_pairs_move_the_choice():
    """The activations count: a device that holds stage 0 for short pairs does not for 4096-token ones."""
    need = hand_needed_gib()
    device = device_for(need["zero0_bf16"] + 1.0)
    assert choose_zero(SHAPE, CANDIDATES, LENGTHS, device).value == "zero0_bf16"
    long = [(2048, 2048, 2048)] * 8
    assert choose_zero(SHAPE, CANDIDATES, long, device).value != "zero0_bf16"


@pytest.mark.parametrize(("attn", "dense", "expect"), [
    ("flash_attention_2", True, "packed"), ("flash_attention_2", False, "packed"),  # varlen needs no mask
    ("sdpa", True, "shared"), ("eager", True, "shared"),
    ("sdpa", False, "padded"), ("eager", False, "padded"),  # remote code: a 4-D mask may not be honoured
])
def test_layout_follows_the_attention_kernel(attn, dense, expect):
    pick = choose_layout(attn, dense)
    assert pick.value == expect and attn in pick.reason
    if expect == "padded":
        assert "remote code" in pick.reason


def test_layout_refuses_an_unknown_kernel():
    with pytest.raises(ValueError, match="flex"):
        choose_layout("flex", True)


def test_host_memory_rules_out_what_the_node_cannot_load():
    """On GPUs, a candidate whose host memory per node does not fit is skipped even when its device memory does:
    stage 0/2 load the whole model in every process (2P x 8 x 1.5, by hand), ZeRO-3 one module at a time, offload
    keeps 18 bytes per parameter (x 1.5) on the host."""
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    P = SHAPE.layers * layer + 4096 + 2 * 32000 * 4096
    load_02 = 2 * P * WORLD * 1.5 / GIB
    device = 10_000.0  # every candidate fits the device
    assert choose_zero(SHAPE, CANDIDATES, LENGTHS, device).value == "zero0_bf16"
    assert choose_zero(SHAPE, CANDIDATES, LENGTHS, device, host_gib=load_02 / (1 - AUTO_MARGIN) * 1.01,
                       ranks_per_node=WORLD).value == "zero0_bf16"
    pick = choose_zero(SHAPE, CANDIDATES, LENGTHS, device, host_gib=load_02 / (1 - AUTO_MARGIN) * 0.99,
                       ranks_per_node=WORLD)
    assert pick.value == "zero3_bf16" and "host memory per node" in pick.reason
    # the offload candidate alone, a host below its 18 bytes per parameter: nothing fits, said with the host's size
    offload_host = 18 * P * 1.5 / GIB
    pick = choose_zero(SHAPE, CANDIDATES[3:], LENGTHS, device, host_gib=offload_host * 0.5, ranks_per_node=WORLD)
    assert pick.value == "zero3_offload" and pick.reason.startswith("nothing fits") and "host" in pick.reason
