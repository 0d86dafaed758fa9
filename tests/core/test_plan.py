"""The planner's arithmetic (midpo.core.plan): geometry equal to collate_pairs, parameter counts equal to a built
model's, and peak memory against the GPU measurements recorded in docs/results.md (one H100, ZeRO-3 bf16, the
1.1B TinyLlama shape of bench/gpu_check.py): within 15%, and the micro-32 run that ran out of memory predicted
as not fitting."""

from __future__ import annotations

import pytest
import torch

from midpo.core import batching, plan
from midpo.core.plan import GIB, Hardware, ModelShape, Settings

TINYLLAMA = ModelShape(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4)
H100 = Hardware(gpus_per_node=1, gpu_mem_gib=79.18)  # torch's reported capacity in the OOM log


def gpu_check_lengths(micro: int, layout_index: int, steps: int = 10) -> list[tuple[int, int, int]]:
    """The (prompt, chosen, rejected) lengths bench/gpu_check.py drew for its `layout_index`-th layout: the same
    torch generator calls as its random_rows (4 rows for the packing check, then steps + 2 batches per layout)."""
    gen = torch.Generator().manual_seed(0)

    def rows(n: int) -> list[tuple[int, int, int]]:
        out = []
        for _ in range(n):
            lens = []
            for lo, hi in ((64, 160), (96, 256), (96, 256)):
                k = int(torch.randint(lo, hi, (1,), generator=gen))
                torch.randint(3, 32000, (k,), generator=gen)  # the token ids: drawn, not needed
                lens.append(k + 1)  # BOS before the prompt, EOS after a response
            out.append(tuple(lens))
        return out

    rows(4)
    drawn = [[x for _ in range(steps + 2) for x in rows(micro)] for _ in range(layout_index + 1)]
    return drawn[layout_index]


# (micro, layout, index of the layout in gpu_check's order, measured torch.cuda.max_memory_allocated GiB)
H100_RUNS = [(8, "packed", 0, 32.107), (8, "padded", 1, 29.605), (16, "packed", 0, 47.327), (16, "padded", 1, 42.109)]


@pytest.mark.parametrize("micro,layout,index,measured", H100_RUNS)
def test_h100_peak_within_15_percent(micro, layout, index, measured):
    s = Settings(world=1, zero_stage=3, micro=micro, layout=layout, prefetch_bucket=0.9 * 2 ** 24)
    p = plan.evaluate(TINYLLAMA, s, gpu_check_lengths(micro, index), H100)
    assert abs(p.memory.peak / GIB - measured) / measured < 0.15
    assert p.fits


def test_h100_micro32_predicted_out_of_memory():
    s = Settings(world=1, zero_stage=3, micro=32, layout="packed", prefetch_bucket=0.9 * 2 ** 24)
    assert not plan.evaluate(TINYLLAMA, s, gpu_check_lengths(32, 0), H100).fits


def test_h100_mi_dpo_prior_network():
    """The 5-of-22-layer prior (marginal objective: the policy's logits kept) measured 39.62 GiB."""
    s = Settings(world=1, zero_stage=3, micro=8, layout="packed", prefetch_bucket=0.9 * 2 ** 24, prior_layers=5,
                 full_logits=True)
    p = plan.evaluate(TINYLLAMA, s, gpu_check_lengths(8, 0), H100)
    assert abs(p.memory.peak / GIB - 39.617) / 39.617 < 0.15


@pytest.mark.parametrize("layout,row_tokens", [("packed", 64), ("packed", None), ("padded", None), ("shared", None)])
def test_geometry_equals_collate(layout, row_tokens):
    gen = torch.Generator().manual_seed(1)
    lengths = [tuple(int(torch.randint(1, 40, (1,), generator=gen)) for _ in range(3)) for _ in range(5)]
    rows = [{"prompt_ids": [1] * p, "chosen_ids": [3] * c, "rejected_ids": [4] * r} for p, c, r in lengths]
    b = batching.collate_pairs(rows, layout=layout, pad_id=0, max_row_tokens=row_tokens)
    g = plan.micro_batch(lengths, layout, row_tokens)
    assert (g.stored_tokens, g.real_tokens, g.response_tokens, g.rows) == (
        b.input_ids.numel(), b.num_tokens, b.target_index.numel(), b.input_ids.shape[0])
    assert g.attention_context == pytest.approx(b.attention_context)
    assert plan.DENSE_MASK_ROW_TOKENS == batching.DENSE_MASK_ROW_TOKENS


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_parameter_counts_equal_a_built_model(model_type, tied):
    from transformers import AutoConfig, AutoModelForCausalLM

    from midpo.core.flops import flop_params

    hf = AutoConfig.for_model(model_type, vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(hf)
    shape = ModelShape.from_hf(hf.to_dict())
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert shape.flop_params() == flop_params(model)


def test_zero3_shards_states_and_search_reaches_global_batch():
    lengths = [(100, 200, 180)] * 64
    hw = Hardware(gpus_per_node=8, gpu_mem_gib=80)
    s0 = plan.memory(TINYLLAMA, Settings(world=8, zero_stage=0, dtype_bytes=4, max_live_parameters=0),
                     plan.micro_batch(lengths[:8], "padded", None))
    s3 = plan.memory(TINYLLAMA, Settings(world=8, zero_stage=3, max_live_parameters=0),
                     plan.micro_batch(lengths[:8], "padded", None))
    P = TINYLLAMA.params()
    # stage 0 fp32: weights, gradients, Adam's two moments (16 bytes); stage 3 bf16: bf16 weights and gradients,
    # fp32 master and moments (16 bytes) over 8 ranks
    assert s0.terms["policy_weights"] + s0.terms["policy_gradients"] + s0.terms["policy_optimizer"] == 16 * P
    assert s3.terms["policy_weights"] + s3.terms["policy_gradients"] + s3.terms["policy_optimizer"] == 16 * P / 8
    plans = plan.search(TINYLLAMA, Settings(), lengths, hw, global_batch=128)
    assert plans[0].fits
    assert all(p.settings.micro * p.settings.grad_accum * 8 == 128 for p in plans)


def test_token_budget_bounds_the_widest_micro_batch_on_long_tails():
    """Long-tailed lengths: fixed 16-pair micro-batches are as wide as their longest pair allows; a token budget
    holds every multi-pair micro-batch under it, so the peak drops and the global batch is unchanged."""
    lengths = [(20, 30, 40)] * 60 + [(200, 900, 700)] * 4
    lengths = [lengths[(i * 37) % 64] for i in range(64)]  # spread the long ones
    hw = Hardware(gpus_per_node=1)
    fixed = plan.evaluate(TINYLLAMA, Settings(micro=16, grad_accum=1, layout="padded"), lengths, hw)
    budget_s = Settings(micro=16, grad_accum=1, layout="padded", token_budget=2048)
    budget = plan.evaluate(TINYLLAMA, budget_s, lengths, hw)
    widest = plan.widest([b for step in plan.rank_steps(lengths, budget_s) for b in step])
    assert widest.stored_tokens <= 2048 or widest.pairs == 1
    assert budget.memory.peak < fixed.memory.peak
    assert budget.time["micro_steps"] > 1 == fixed.time["micro_steps"]
    assert budget.time["pairs_per_s"] * budget.time["step_s"] == pytest.approx(16)


def test_sequence_parallel_divides_activations_and_adds_its_all_to_all():
    """k=2: activations (and eager's per-head scores) halve, a shared row's bool mask is added whole, a rank computes
    half its group's work and sends q, k, v and the output through the all-to-all: each coded here separately."""
    lengths = [(1000, 1500, 1400)] * 2
    b = plan.micro_batch(lengths, "padded", None)
    for attn in ("sdpa", "eager"):
        one = Settings(world=2, micro=2, layout="padded", attn=attn, dtype_bytes=2)
        two = Settings(world=2, micro=2, layout="padded", attn=attn, dtype_bytes=2, sequence_parallel=2)
        m1, m2 = plan.memory(TINYLLAMA, one, b), plan.memory(TINYLLAMA, two, b)
        assert m2.terms["activations"] == pytest.approx(m1.terms["activations"] / 2)
        assert "sp_attention_mask" not in m1.terms and "sp_attention_mask" not in m2.terms  # padded: causal rows
        assert m2.terms["policy_weights"] == m1.terms["policy_weights"]  # ZeRO shards over every rank either way
    shared = plan.micro_batch(lengths, "shared", None)
    m3 = plan.memory(TINYLLAMA, Settings(world=2, micro=2, layout="shared", sequence_parallel=2), shared)
    assert m3.terms["sp_attention_mask"] == shared.rows * shared.row_len ** 2  # one bool mask per row
    hw = Hardware(gpus_per_node=2)
    t1, t2 = plan.step_time(TINYLLAMA, one, [b], hw), plan.step_time(TINYLLAMA, two, [b], hw)
    assert t2["compute_s"] == pytest.approx(t1["compute_s"] / 2)
    want = TINYLLAMA.layers * 2 * (b.stored_tokens / 2) * 0.5 * (2 * 2048 + 2 * 256) * 2  # fwd + bwd, bf16
    assert t2["sp_all_to_all_s"] == pytest.approx(want / hw.bandwidth) and t1["sp_all_to_all_s"] == 0
    assert t2["pairs_per_s"] == pytest.approx(2 / t2["step_s"])  # one data-parallel group of 2 pairs


@pytest.mark.parametrize("modules,save", [("all-linear", ["norm"]), (["q_proj", "v_proj"], []),
                                          (["k_proj", "down_proj"], ["lm_head"])])
def test_lora_counts_equal_peft_and_only_trained_parameters_take_states(modules, save):
    """LoRA's adapters and trained copies as PEFT builds them on a real (tiny, untied) Llama; stage 0 fp32 holds
    4 bytes per parameter held and 4 + 8 (gradient, Adam) per parameter trained; a frozen base takes 2x its forward's
    FLOPs; ZeRO-3 gathers all weights but reduces only the trained gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(hf), LoraConfig(r=4, target_modules=modules, modules_to_save=save or None))
    held = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = ModelShape.from_hf(hf.to_dict())
    mods = (modules,) if isinstance(modules, str) else tuple(modules)
    s = Settings(world=1, zero_stage=0, dtype_bytes=4, lora_rank=4, lora_modules=mods, lora_save=tuple(save))
    assert plan.policy_params(shape, s) == (held, trained)
    b = plan.micro_batch([(10, 20, 30)] * 2, "padded", None)
    m = plan.memory(shape, s, b)
    assert (m.terms["policy_weights"], m.terms["policy_gradients"], m.terms["policy_optimizer"]) == (
        4 * held, 4 * trained, 8 * trained)
    full = plan.memory(shape, Settings(world=1, zero_stage=0, dtype_bytes=4), b)
    assert full.terms["policy_gradients"] == 4 * shape.params()
    s3 = Settings(world=4, zero_stage=3, dtype_bytes=2, lora_rank=4, lora_modules=mods, lora_save=tuple(save))
    assert plan.comm_bytes_per_step(held, s3, trained) == pytest.approx(3 / 4 * (2 * held + trained) * 2)
    hw = Hardware(gpus_per_node=1)
    lo = plan.step_time(shape, s, [b], hw)["model_flops_per_step"]
    body, head = shape.flop_params()
    adapters = trained - (sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n))
    ctx = b.attention_context
    head_trained = "lm_head" in save
    want = (2 * 2 * body + 3 * 2 * adapters) * b.real_tokens + (3 if head_trained else 2) * 2 * head * b.response_tokens \
        + 3 * 4 * hf.num_hidden_layers * hf.hidden_size * ctx
    assert lo == pytest.approx(want)


def test_prior_network_adds_its_work_to_the_step_time():
    """The prior network's FLOPs add to the policy's; the policy's compute is not divided by anything at k = 1."""
    b = plan.micro_batch([(100, 200, 180)] * 4, "padded", None)
    hw = Hardware(gpus_per_node=1)
    none = plan.step_time(TINYLLAMA, Settings(micro=4), [b], hw)
    prior = plan.step_time(TINYLLAMA, Settings(micro=4, prior_layers=4), [b], hw)
    pb, ph = TINYLLAMA.flop_params(4)
    prior_flops = 6 * pb * b.prior_tokens + 6 * ph * b.response_tokens
    rate = hw.peak_tflops * 1e12 * hw.efficiency
    assert prior["compute_s"] == pytest.approx(none["compute_s"] + prior_flops / rate)


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("qwen2", True)])
def test_host_memory_equals_deepspeeds_estimate(model_type, tied):
    """Host memory per node against DeepSpeed's own estimator (zero.stage3.estimate_zero3_model_states_mem_needs,
    zero_init as midpo loads ZeRO-3 models, with its 1.5 buffer factor), fed the parameter counts DeepSpeed reads off
    a built model (model_to_params); stage 0/2, which DeepSpeed's ZeRO-3 estimator does not cover, by hand: every
    process loads the whole model in bf16."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model(model_type, vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    total, largest = model_to_params(AutoModelForCausalLM.from_config(hf))
    shape = ModelShape.from_hf(hf.to_dict())
    for gpn, nodes in ((8, 1), (8, 4), (4, 2)):
        s = Settings(world=gpn * nodes, zero_stage=3, dtype_bytes=2, cuda=True)
        for offload in (False, True):
            host = plan.host_memory(shape, plan.replace(s, offload_optimizer=offload), gpn)
            ds_cpu, _, _ = estimate_zero3_model_states_mem_needs(total, largest, gpn, nodes, cpu_offload=offload,
                                                                 cpu_offload_params=offload, zero_init=True)
            assert sum(host.values()) == pytest.approx(ds_cpu, rel=1e-9, abs=2)
        for stage in (0, 2):
            host = plan.host_memory(shape, plan.replace(s, zero_stage=stage), gpn)
            assert sum(host.values()) == pytest.approx(2 * total * gpn * 1.5)
    assert plan.host_memory(shape, Settings(cuda=False), 2) == {}  # on CPU the host is the device


def test_host_memory_of_lora_offload_and_a_prior_network():
    """LoRA under offload: the host keeps every parameter's partition but optimizer states only for the trained
    ones; a prior network loads after the policy's host copy went to the device (the larger load counts)."""
    s = Settings(world=16, zero_stage=3, offload_optimizer=True, dtype_bytes=2, cuda=True, lora_rank=16)
    held, trained = plan.policy_params(TINYLLAMA, s)
    assert trained < held / 50
    host = plan.host_memory(TINYLLAMA, s, 8)
    assert host["host_offload_params"] == pytest.approx(1.5 * 2 * held / 16 * 8)
    assert host["host_offload_optimizer"] == pytest.approx(1.5 * 16 * trained / 16 * 8)
    s2 = Settings(world=8, zero_stage=2, dtype_bytes=2, cuda=True, prior_layers=4, prior_zero_stage=2)
    assert plan.host_memory(TINYLLAMA, s2, 8)["host_model_load"] == pytest.approx(1.5 * 2 * TINYLLAMA.params() * 8)
    s3 = plan.replace(s2, zero_stage=3)  # ZeRO-3 policy (one module in fp32), a ZeRO-2 prior of 4 layers: the prior's
    assert plan.host_memory(TINYLLAMA, s3, 8)["host_model_load"] == pytest.approx(1.5 * 2 * TINYLLAMA.params(4) * 8)
