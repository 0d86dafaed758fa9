"""The training planner's arithmetic (pure: shapes, lengths and settings in; bytes and seconds out).

Memory per device at its peak, term by term (bytes), for a Llama-shaped decoder (GQA attention, SwiGLU MLP,
RMSNorm) under DeepSpeed ZeRO stage 0/2/3, and a step-time estimate. Every coefficient is derived from what
the forward saves for backward (below, `activation_bytes_per_token`); the only fitted numbers are the allocator
headroom and the CUDA context, from the H100 measurements in docs/results.md (the calibration test holds them).

Memory model (P parameters, N data-parallel ranks, w bytes per compute element: 2 for bf16, 4 for fp32):
- stage 0, fp32: weights 4P, gradients 4P, Adam 8P. bf16 adds an fp32 master copy (4P) and fp32 gradients
  (DeepSpeed's bf16 optimizer accumulates in fp32), the latter only while the optimizer steps.
- stage 2: weights wP; gradients w P / N (partitioned after each reduce; the reduce bucket is separate);
  master + Adam 12 P / N (DeepSpeed clones an fp32 partition even from fp32 weights).
- stage 3: weights w P / N plus the gathered ones (`gathered_params`: what stage3_max_reuse_distance keeps for
  the backward, capped by stage3_max_live_parameters, at least two layers); with DeepSpeed's defaults (1e9 both)
  a model under ~1e9 parameters would stay gathered whole (measured on CPU it did not: docs/plan.md);
  gradients w P / N; master + Adam as stage 2; fp32 gradient partitions 4 P / N during the step (bf16).
- offload_optimizer: master, Adam and fp32 gradients live on the host (not counted against the device).
- LoRA (`lora_rank` > 0): the base's weights as above (ZeRO-3 still shards and gathers them), plus the adapters;
  gradients, master and Adam (and their communication) only for the T trained parameters (the adapters and the
  modules_to_save copies, `ModelShape.lora_params`); the frozen base takes no weight-gradient matmul (2x its
  forward, core.flops). Activations are counted as for full fine-tuning (each adapted linear's input is saved for
  its adapter's gradient anyway; the rank-r intermediates are small).
- activations: bytes per stored token (rows x padded length of the widest micro-batch) per layer, x layers;
  with gradient checkpointing one layer input per layer plus one layer's full activations.
- the output head: one chunk of `head_chunk_tokens` response positions x vocab in w (matmul output) + fp32
  (log-softmax input and output) + fp32 gradient; without chunking (all positions fit one chunk) the same for
  all of them.
- the MI-DPO prior network: its own parameters' states under its own ZeRO stage, and its activations over
  `[BOS] + response` (or prompt + response when conditioned).
- sequence parallelism (k = `sequence_parallel` ranks per micro-batch, runtime.seqpar): each rank stores its
  1/k of the positions (activations, eager's scores for h/k heads over the whole row, its response positions
  through the head: all / k), plus, for rows of several sequences (packed, shared), the row's whole bool 4-D
  mask (rows x T^2 bytes; a row of one causal sequence needs none); ZeRO still shards over every rank.
- peak = max(backward: states + activations + head + buckets, optimizer step: states + fp32 gradients);
  the device needs peak x (1 + ALLOCATOR_HEADROOM) + CUDA_CONTEXT_GIB.

Host memory per node (`host_memory`, GPUs only: on CPU the host is the device), the model states the host holds,
x HOST_BUFFER_FACTOR: loading (stage 0/2: every process builds the whole model in its dtype before moving it to
its device; ZeRO-3 under zero.Init: one module at a time in fp32, its largest) and, under the shipped
zero3_offload, every rank's parameter partition (w) and optimizer partition (fp32 master, Adam, fp32 gradients:
16 bytes per trained parameter). The data, the reference cache and Python are not counted.

Step time: a fixed overhead per micro-step (MICRO_STEP_OVERHEAD_S + LAYER_LAUNCH_S per layer), plus model FLOPs as `core.flops.train_flops` counts them (recompute under checkpointing adds one forward
of the body, 4/3 of the work), at `efficiency` x the device's peak, plus the collectives per ZeRO stage
(ring all-reduce moves 2 (N-1)/N of the buffer, reduce-scatter and all-gather (N-1)/N each) over the
interconnect; under sequence parallelism each rank computes 1/k of its group's micro-batch and adds the
all-to-alls around attention in full (`sp_all_to_all_bytes`). Overlap: with overlap_comm the collectives hide
behind compute up to the compute time (only the excess is added); without it they add in full. Offloaded optimizer: the host Adam (HOST_ADAM_PARAMS_PER_S)
and the PCIe copies (PCIE_GBPS) add in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from midpo.core.budget import fill_to_budget
from midpo.core.flops import train_flops

GIB = 2.0 ** 30
ALLOCATOR_HEADROOM = 0.08  # reserved-but-unallocated fraction (the H100 OOM log: 3.24 GiB over 74.2 allocated)
CUDA_CONTEXT_GIB = 1.5  # CUDA context + NCCL + kernels, outside torch's allocator (same log: 79.10 - 77.42)
DENSE_MASK_ROW_TOKENS = 512  # core.batching's row cap under a dense mask (sdpa/eager); kept equal by a test
HOST_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeed's CPU Adam, per rank (an assumption, not measured here)
PCIE_GBPS = 25.0  # host <-> device copies for optimizer offload (an assumption)
# DeepSpeed's own host estimate (zero.stage3.estimate_zero3_model_states_mem_needs) multiplies by this: pinned
# buffers and allocator rounding; not measured here (no GPU host with offload was available), a test holds the equality
HOST_BUFFER_FACTOR = 1.5
MICRO_STEP_OVERHEAD_S = 0.005  # per micro-step: Python, data, the loss (an assumption)
LAYER_LAUNCH_S = 0.0003  # per layer per micro-step, forward + backward: kernel launches, ZeRO-3 hooks (assumption)


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a Llama layer's


def lora_targets(modules: tuple[str, ...], save: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The linear layers LoRA adapts ("all-linear" = every one but the head), checked with the modules_to_save
    `save` the planner can size (names containing "norm": every RMSNorm; lm_head; embed_tokens): ValueError
    names any other."""
    names = LINEAR_NAMES if modules in (("all-linear",), ("all_linear",)) else tuple(modules)
    unknown = [m for m in names if m not in LINEAR_NAMES] + [m for m in save if not (
        "norm" in m or m in ("lm_head", "embed_tokens"))]
    if unknown:
        raise ValueError(f"the planner cannot size LoRA modules {unknown} (it knows {sorted(LINEAR_NAMES)}, norms, "
                         "lm_head, embed_tokens)")
    return names


@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped causal LM (Qwen2's q/k/v biases are counted when `qkv_bias`)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False
    qkv_bias: bool = False

    @classmethod
    def from_hf(cls, c: dict[str, Any]) -> ModelShape:
        """From a Hugging Face config.json dict (Llama, Qwen2, Mistral field names)."""
        heads = int(c["num_attention_heads"])
        return cls(vocab=int(c["vocab_size"]), hidden=int(c["hidden_size"]),
                   intermediate=int(c["intermediate_size"]), layers=int(c["num_hidden_layers"]), heads=heads,
                   kv_heads=int(c.get("num_key_value_heads") or heads),
                   tied=bool(c.get("tie_word_embeddings", False)),
                   qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)))

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_dim
        attn = h * h * 2 + h * kv * 2 + ((h + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * h * self.intermediate + 2 * h

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def params(self, layers: int | None = None) -> int:
        n = self.layers if layers is None else layers
        return n * self.layer_params() + self.hidden + self.embed_params() * (1 if self.tied else 2)

    def flop_params(self, layers: int | None = None) -> tuple[int, int]:
        """(body, head) as `core.flops.flop_params` counts them."""
        n = self.layers if layers is None else layers
        return n * self.layer_params() + self.hidden, self.embed_params()

    def largest_module_params(self) -> int:
        """Parameters of the largest single module (the embedding or head, or an MLP projection): what ZeRO-3
        holds whole on the host while loading under zero.Init."""
        return max(self.embed_params(), self.hidden * self.intermediate)

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a decoder layer (Llama's module names)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return dict(zip(LINEAR_NAMES, ((h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)), strict=True))

    def lora_params(self, rank: int, modules: tuple[str, ...], save: tuple[str, ...] = ()) -> tuple[int, int]:
        """(adapter parameters, trained full copies) of LoRA at `rank` on `modules` with PEFT's modules_to_save
        `save` (`lora_targets`)."""
        dims = self.linear_dims()
        names = lora_targets(modules, save)
        adapters = self.layers * sum(rank * (dims[m][0] + dims[m][1]) for m in names)
        copies = 0
        if any("norm" in m for m in save):
            copies += 2 * self.hidden * self.layers + self.hidden
        copies += self.embed_params() * sum(m in ("lm_head", "embed_tokens") for m in set(save))
        return adapters, copies


@dataclass(frozen=True)
class Batch:
    """One micro-batch's geometry: what the forward stores and computes."""

    pairs: int
    stored_tokens: int  # rows x padded row length: what activations are stored for
    real_tokens: int  # tokens the model computes on (the shared layout's prompt once)
    response_tokens: int  # positions through the output head
    attention_context: float  # sum over real tokens of attended keys (core.flops)
    row_len: int  # padded row length (eager attention's T^2 term)
    rows: int
    prior_tokens: int = 0  # the prior network's input tokens (BOS + response, or prompt + response)


def micro_batch(lengths: list[tuple[int, int, int]], layout: str, row_tokens: int | None) -> Batch:
    """The geometry `core.batching.collate_pairs` gives (prompt, chosen, rejected) lengths in `layout`
    (`row_tokens`: the packed row cap; None = one row, flash-attn)."""
    B = len(lengths)
    seqs = [p + c for p, c, _ in lengths] + [p + r for p, _, r in lengths]
    resp = sum(c + r for _, c, r in lengths)

    def tri(n: int) -> float:
        return n * (n + 1) / 2

    ctx = sum(tri(s) for s in seqs)
    prior = sum(c + r + 2 for _, c, r in lengths)
    if layout == "packed":
        cap = sum(seqs) if not row_tokens else max(row_tokens, max(seqs))
        fill = [0]
        for n in seqs:
            if fill[-1] + n > cap:
                fill.append(0)
            fill[-1] += n
        return Batch(B, len(fill) * max(fill), sum(seqs), resp, ctx, max(fill), len(fill), prior)
    if layout == "shared":
        rows = [p + c + r for p, c, r in lengths]
        ctx = sum(tri(p + c) + tri(r) + p * r for p, c, r in lengths)
        return Batch(B, B * max(rows), sum(rows), resp, ctx, max(rows), B, prior)
    if layout != "padded":
        raise ValueError(f"layout must be packed, padded or shared, got {layout!r}")
    return Batch(B, 2 * B * max(seqs), sum(seqs), resp, ctx, max(seqs), 2 * B, prior)


def micro_batches(lengths: list[tuple[int, int, int]], micro: int, layout: str,
                  row_tokens: int | None) -> list[Batch]:
    """Consecutive micro-batches of `micro` pairs over `lengths` (the tail dropped, as the sampler does)."""
    return [micro_batch(lengths[i:i + micro], layout, row_tokens)
            for i in range(0, len(lengths) - micro + 1, micro)]


def widest(batches: list[Batch]) -> Batch:
    """The micro-batch that sets peak memory (most stored tokens)."""
    return max(batches, key=lambda b: (b.stored_tokens, b.response_tokens))


@dataclass(frozen=True)
class Settings:
    """What the planner varies, plus what it must know of the run."""

    world: int = 1
    zero_stage: int = 3
    offload_optimizer: bool = False
    dtype_bytes: int = 2
    micro: int = 8
    grad_accum: int = 1
    layout: str = "padded"
    attn: str = "sdpa"  # sdpa | eager | flash_attention_2
    checkpointing: bool = False
    head_chunk_tokens: int = 1024
    max_live_parameters: float = 1e9
    max_reuse_distance: float = 1e9  # stage3_max_reuse_distance (DeepSpeed's default, as max_live_parameters)
    prefetch_bucket: float = 0.0  # elements
    reduce_bucket: float = 2 ** 24  # elements
    allgather_bucket: float = 2 ** 24  # elements (stage 2)
    overlap_comm: bool = True
    prior_layers: int = -1  # MI-DPO prior network: -1 none, 0 = all layers, k = first k
    prior_zero_stage: int = 3
    prior_conditioned: bool = False
    prior_chunk_tokens: int = 1024
    token_budget: int = 0  # train.micro_batch_tokens: micro-batches cut to this many tokens (micro x accum pairs)
    sequence_parallel: int = 1  # train.sequence_parallel: ranks per micro-batch (data parallel = world / this)
    lora_rank: int = 0  # model.lora.r: 0 = full fine-tuning
    lora_modules: tuple[str, ...] = ("all-linear",)  # model.lora.target_modules
    lora_save: tuple[str, ...] = ()  # model.lora.modules_to_save (trained in full)
    full_logits: bool = False  # the policy's head runs once over all response positions, logits kept (TDPO,
    # SparsePO, MI-DPO's marginal objective: core.logprobs.response_logps return_logits/return_flat_logits)
    cuda: bool = True

    @property
    def row_tokens(self) -> int | None:
        return None if "flash" in self.attn else DENSE_MASK_ROW_TOKENS

    @property
    def data_parallel(self) -> int:
        return max(1, self.world // self.sequence_parallel)


def sp_all_to_all_bytes(shape: ModelShape, s: Settings, batch: Batch) -> float:
    """Bytes one rank sends per micro-step in the all-to-alls around attention (sequence parallelism): q, k, v to
    heads and the output back, (k-1)/k of its 1/k of the stored tokens each, per layer; forward, backward (the
    same exchanges of the gradients) and the recompute's forward under checkpointing."""
    k = s.sequence_parallel
    if k <= 1:
        return 0.0
    per_token = (2 * shape.hidden + 2 * shape.kv_dim) * s.dtype_bytes
    passes = 3 if s.checkpointing else 2
    return shape.layers * passes * batch.stored_tokens / k * (k - 1) / k * per_token


def activation_bytes_per_token(shape: ModelShape, w: int, attn: str) -> float:
    """Bytes one decoder layer saves for backward per stored token (no checkpointing), from what each op keeps:
    two RMSNorms (HF upcasts to fp32: the fp32 input and the normalized output in w), q and k after RoPE and v
    (expanded to all heads by repeat_kv unless flash-attn takes GQA itself), the attention output and its
    contiguous copy for o_proj, the log-sum-exp (fp32 per head), and the SwiGLU MLP's gate, silu(gate), up and
    their product (4 x intermediate)."""
    h, kv = shape.hidden, shape.kv_dim
    norms = 2 * (4 + w) * h
    kv_stored = 2 * kv if "flash" in attn else 2 * h
    attention = w * (h + kv_stored) + 2 * w * h + 4 * shape.heads
    mlp = 4 * w * shape.intermediate
    return norms + attention + mlp


def gathered_params(n_params: int, max_live: float, reuse: float, layer_params: int) -> float:
    """Parameters ZeRO-3 holds gathered at the backward's start: a parameter is kept after its forward use when it
    is used again within `reuse` (stage3_max_reuse_distance) elements of the trace, which the forward's last half of
    that distance is (its backward follows in reverse order); never more than `max_live`
    (stage3_max_live_parameters) nor the model, never less than two layers (the one computing and the prefetch)."""
    return min(float(n_params), max(2.0 * layer_params, min(max_live, reuse / 2 + layer_params)))


def _states(n_params: int, stage: int, world: int, w: int, offload: bool, max_live: float,
            layer_params: int, reuse: float = 1e9, trainable: int | None = None) -> dict[str, float]:
    """Model states of one engine, per device (bytes): weights, gradients, optimizer; 'step_extra' exists only
    while the optimizer steps. `offload` = the shipped zero3_offload: optimizer and parameter partitions on the
    host (the device keeps only gathered weights and buckets). `trainable` (LoRA): the parameters with gradients
    and optimizer states (default: all `n_params`)."""
    P = float(n_params)
    T = P if trainable is None else float(trainable)
    master = 4.0  # ZeRO 1-3 keep an fp32 copy of their partition even when the weights are fp32
    out: dict[str, float] = {}
    if stage == 0:
        out["weights"] = w * P
        if w == 4:
            out["gradients"], out["optimizer"], out["step_extra"] = 4 * T, 8 * T, 0.0
        else:  # DeepSpeed's bf16 optimizer: fp32 gradient accumulators, master + Adam partitioned over ranks
            out["gradients"], out["optimizer"], out["step_extra"] = (w + 4) * T, 12 * T / world, 0.0
        return out
    shard, tshard = P / world, T / world
    out["weights"] = w * (shard if stage == 3 else P) * (0.0 if offload else 1.0)
    if stage == 3:
        # gathered into buffers of their own even at world size 1 (the partition is not reused)
        out["weights_gathered"] = w * gathered_params(n_params, max_live, reuse, layer_params)
    out["gradients"] = 0.0 if offload else w * tshard
    out["optimizer"] = 0.0 if offload else (master + 8.0) * tshard
    out["step_extra"] = 0.0 if offload or w == 4 else 4.0 * tshard
    return out


def policy_params(shape: ModelShape, s: Settings) -> tuple[int, int]:
    """(parameters held, parameters trained) of the policy: the model, plus LoRA's adapters when on (whose
    trained set is the adapters and the modules_to_save copies, which PEFT adds beside their frozen originals)."""
    if not s.lora_rank:
        return shape.params(), shape.params()
    adapters, copies = shape.lora_params(s.lora_rank, s.lora_modules, s.lora_save)
    return shape.params() + adapters + copies, adapters + copies


@dataclass
class MemoryPlan:
    terms: dict[str, float]  # bytes
    backward_peak: float
    step_peak: float
    peak: float  # bytes allocated at the peak
    needed_gib: float  # device memory needed: peak x (1 + headroom) + context

    def to_json(self) -> dict:
        return {"terms_gib": {k: round(v / GIB, 3) for k, v in self.terms.items()},
                "peak_allocated_gib": round(self.peak / GIB, 3), "needed_gib": round(self.needed_gib, 3)}


def prior_depth(shape: ModelShape, s: Settings) -> int:
    """Decoder layers of the MI-DPO prior network (`prior_layers` 0 = all of the policy's; capped at them)."""
    return shape.layers if s.prior_layers == 0 else min(s.prior_layers, shape.layers)


def memory(shape: ModelShape, s: Settings, batch: Batch) -> MemoryPlan:
    """Peak memory of one device (see the module docstring for each term)."""
    w, L = s.dtype_bytes, shape.layers
    t: dict[str, float] = {}
    held, trained = policy_params(shape, s)
    st = _states(held, s.zero_stage, s.world, w, s.offload_optimizer, s.max_live_parameters,
                 shape.layer_params(), s.max_reuse_distance, trainable=trained)
    step_extra = st.pop("step_extra")
    t.update({f"policy_{k}": v for k, v in st.items()})
    per_tok = activation_bytes_per_token(shape, w, s.attn)
    stream = w * shape.hidden  # the residual stream: each layer's input (checkpointing keeps only these)
    sp = max(1, s.sequence_parallel)
    stored = batch.stored_tokens / sp  # sequence parallelism: this rank's columns of the rows
    if s.checkpointing:
        act = stored * (L * stream + per_tok)
    else:
        act = stored * (L * per_tok + 2 * stream)
    if s.attn == "eager":  # scores and probabilities per head, T^2 per row (SP: h/k heads, the whole row)
        act += batch.rows * shape.heads / sp * batch.row_len ** 2 * 2 * w * (1 if s.checkpointing else L)
    t["activations"] = act
    one_sequence_rows = s.layout == "padded" or (s.layout == "packed" and batch.rows == 2 * batch.pairs)
    if sp > 1 and not one_sequence_rows:  # rows of several sequences: their whole bool mask on every rank
        t["sp_attention_mask"] = float(batch.rows * batch.row_len ** 2)
    resp = -(-batch.response_tokens // sp)
    chunk = min(resp, s.head_chunk_tokens)
    t["head_logits"] = chunk * shape.vocab * (w + (4 if w != 4 else 0) + 4 + 4)  # fp32 copy only from bf16
    if s.full_logits:
        t["head_logits"] += resp * shape.vocab * w
    if s.zero_stage == 3:
        t["buckets"] = w * (s.prefetch_bucket + s.reduce_bucket)
    elif s.zero_stage == 2:
        t["buckets"] = w * (s.reduce_bucket + s.allgather_bucket)
    else:
        t["buckets"] = 0.0
    prior_step = 0.0
    if s.prior_layers >= 0:
        pl = prior_depth(shape, s)
        pst = _states(shape.params(pl), s.prior_zero_stage, s.world, w, False, s.max_live_parameters,
                      shape.layer_params(), s.max_reuse_distance)
        prior_step = pst.pop("step_extra")
        t["prior_states"] = sum(pst.values())
        tokens = batch.prior_tokens + (batch.real_tokens if s.prior_conditioned else 0)
        t["prior_activations"] = tokens * (pl * per_tok + 2 * stream)
        t["prior_logits"] = min(batch.response_tokens, s.prior_chunk_tokens) * shape.vocab * (w + 4 + 4 + 4)
    states = sum(v for k, v in t.items() if k.startswith("policy_") or k == "prior_states")
    backward = sum(t.values())
    step = states + step_extra + prior_step
    t["optimizer_step_gradients_fp32"] = step_extra + prior_step
    peak = max(backward, step)
    needed = peak / GIB * (1 + ALLOCATOR_HEADROOM) + (CUDA_CONTEXT_GIB if s.cuda else 0.0)
    return MemoryPlan(t, backward, step, peak, needed)


def _host_load(n_params: int, stage: int, w: int, largest: int, offload: bool) -> float:
    """Host bytes one process holds while it loads a model: stage 0/2 the whole model in its dtype (moved to the
    device after); ZeRO-3 under zero.Init its largest module in fp32 (offload: nothing beyond its partitions)."""
    if stage == 3:
        return 0.0 if offload else 4.0 * largest
    return float(w) * n_params


def host_memory(shape: ModelShape, s: Settings, ranks_per_node: int) -> dict[str, float]:
    """Host memory of one node (bytes, HOST_BUFFER_FACTOR included), term by term (see the module docstring);
    {} on CPU, where the host is the device `memory` plans."""
    if not s.cuda:
        return {}
    w, largest = s.dtype_bytes, shape.largest_module_params()
    held, trained = policy_params(shape, s)
    load = _host_load(held, s.zero_stage, w, largest, s.offload_optimizer)
    if s.prior_layers >= 0:  # loaded after the policy's host copy went to the device: the larger of the two
        pl = prior_depth(shape, s)
        load = max(load, _host_load(shape.params(pl), s.prior_zero_stage, w, largest, False))
    t = {"host_model_load": load * ranks_per_node}
    if s.offload_optimizer:  # the shipped zero3_offload: parameters and optimizer partitions on the host
        t["host_offload_params"] = w * held / s.world * ranks_per_node
        t["host_offload_optimizer"] = 16.0 * trained / s.world * ranks_per_node
    return {k: v * HOST_BUFFER_FACTOR for k, v in t.items()}


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_mem_gib: float = 80.0
    peak_tflops: float = 989.0  # dense bf16 per device (H100 SXM)
    interconnect_gbps: float = 0.0  # per device, GB/s; 0: 150 inside one node, 25 across nodes
    efficiency: float = 0.4  # achieved fraction of peak on model FLOPs (an assumption; MFU of tuned runs)
    host_mem_gib: float = 0.0  # host memory per node; 0: unknown (the host need is shown, not checked)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def bandwidth(self) -> float:
        return (self.interconnect_gbps or (150.0 if self.nodes == 1 else 25.0)) * 1e9


def comm_bytes_per_step(n_params: int, s: Settings, trainable: int | None = None) -> float:
    """Bytes each rank sends per optimizer step (ring collectives) for the policy's ZeRO stage; gradients (and
    stage 2's updated partitions) only of the `trainable` parameters (LoRA), ZeRO-3's weight gathers of all."""
    N = s.world
    if N == 1:
        return 0.0
    f = (N - 1) / N
    P, w = float(n_params), s.dtype_bytes
    T = P if trainable is None else float(trainable)
    if s.zero_stage == 0:
        return 2 * f * T * w  # one all-reduce of the accumulated gradients
    if s.zero_stage in (1, 2):
        return s.grad_accum * f * T * w + f * T * w  # reduce-scatter per micro-step, all-gather after the step
    return s.grad_accum * (2 * f * P + f * T) * w  # all-gather forward + backward, reduce-scatter, per micro-step


def step_time(shape: ModelShape, s: Settings, batches: list[Batch], hw: Hardware) -> dict[str, float]:
    """Seconds of one optimizer step over this rank's `batches` (its micro-batches; see the module docstring for
    the assumptions)."""
    body, head = shape.flop_params()
    frozen_body = frozen_head = 0
    if s.lora_rank:  # the adapters' matmuls join the body; the base (and a head not trained in full) is frozen
        adapters, _ = shape.lora_params(s.lora_rank, s.lora_modules, s.lora_save)
        frozen_body, frozen_head = body, (0 if "lm_head" in s.lora_save else head)
        body += adapters
    f = work = a2a = 0.0
    sp = max(1, s.sequence_parallel)
    for b in batches:
        a2a += sp_all_to_all_bytes(shape, s, b)
        fb = train_flops(body, head, shape.layers, shape.hidden, b.real_tokens, b.response_tokens,
                         b.attention_context, frozen_body, frozen_head)
        f += fb
        work += fb * (4.0 / 3.0 if s.checkpointing else 1.0)  # recompute: the body's forward again
        if s.prior_layers >= 0:
            pl = prior_depth(shape, s)
            pb, ph = shape.flop_params(pl)
            work += train_flops(pb, ph, pl, shape.hidden, b.prior_tokens, b.response_tokens, 0.0)
    steps = len(batches)
    compute = work / sp / (hw.peak_tflops * 1e12 * hw.efficiency)  # SP: a rank computes 1/k of its group's work
    held, trained = policy_params(shape, s)
    comm = comm_bytes_per_step(held, replace(s, grad_accum=steps), trained) / hw.bandwidth
    exposed = max(0.0, comm - compute) if s.overlap_comm else comm
    offload = 0.0
    if s.offload_optimizer:
        shard = trained / s.world
        # host Adam over the shard; gradients down (w), updated weights up (w), per step; gathered weights come
        # up from the host once per forward and once per backward of every micro-step
        offload = shard / HOST_ADAM_PARAMS_PER_S + (2 * shard + 2 * steps * held) \
            * s.dtype_bytes / (PCIE_GBPS * 1e9)
    overhead = steps * (MICRO_STEP_OVERHEAD_S + LAYER_LAUNCH_S * shape.layers)
    sp_comm = a2a / hw.bandwidth  # on the critical path: attention waits for it
    total = compute + exposed + offload + overhead + sp_comm
    pairs = sum(b.pairs for b in batches) * s.data_parallel
    return {"step_s": total, "compute_s": compute, "comm_s": comm, "comm_exposed_s": exposed,
            "sp_all_to_all_s": sp_comm,
            "offload_s": offload, "overhead_s": overhead, "micro_steps": float(steps),
            "model_flops_per_step": f * s.data_parallel, "pairs_per_s": pairs / total if total else float("inf")}


@dataclass
class Plan:
    settings: Settings
    memory: MemoryPlan
    time: dict[str, float]
    fits: bool
    notes: list[str] = field(default_factory=list)
    host: dict[str, float] = field(default_factory=dict)  # host bytes per node (host_memory)

    @property
    def host_needed_gib(self) -> float:
        return sum(self.host.values()) / GIB

    def to_json(self) -> dict:
        keys = ("zero_stage", "offload_optimizer", "micro", "grad_accum", "token_budget", "layout", "checkpointing",
                "world", "sequence_parallel")
        return {"settings": {k: getattr(self.settings, k) for k in keys}, "fits": self.fits,
                **self.memory.to_json(), "time": {k: round(v, 4) for k, v in self.time.items()},
                "host_terms_gib": {k: round(v / GIB, 3) for k, v in self.host.items()},
                "host_needed_gib": round(self.host_needed_gib, 3), "notes": self.notes}


def rank_steps(lengths: list[tuple[int, int, int]], s: Settings) -> list[list[Batch]]:
    """One rank's optimizer steps over `lengths` (its micro x accum pairs per step, in order): fixed-count
    micro-batches, or with `s.token_budget` the cut core.budget.fill_to_budget makes (the sampler's). Fewer pairs
    than one step: they are repeated."""
    per = s.micro * s.grad_accum
    if len(lengths) < per:
        lengths = (lengths * (-(-per // max(len(lengths), 1))))[:per]
    out = []
    for i in range(0, len(lengths) - per + 1, per):
        chunk = lengths[i:i + per]
        if s.token_budget:
            groups = [[chunk[j] for j in g] for g in fill_to_budget(chunk, s.token_budget, s.layout)]
        else:
            groups = [chunk[k:k + s.micro] for k in range(0, per, s.micro)]
        out.append([micro_batch(g, s.layout, s.row_tokens) for g in groups])
    return out


def evaluate(shape: ModelShape, s: Settings, lengths: list[tuple[int, int, int]], hw: Hardware) -> Plan:
    """One setting: memory at its widest micro-batch, time averaged over its steps."""
    steps = rank_steps(lengths, s)
    mem = memory(shape, s, widest([b for st in steps for b in st]))
    times = [step_time(shape, s, st, hw) for st in steps]
    tm = {k: sum(t[k] for t in times) / len(times) for k in times[0]}
    tm["pairs_per_s"] = s.micro * s.grad_accum * s.data_parallel / tm["step_s"]
    host = host_memory(shape, s, hw.gpus_per_node)
    host_fits = hw.host_mem_gib <= 0 or sum(host.values()) / GIB <= hw.host_mem_gib
    return Plan(s, mem, tm, mem.needed_gib <= hw.gpu_mem_gib and host_fits, host=host)


SEARCH_PAIRS = 1024  # pairs of the length sample the search lays out per setting (the as-written plan uses all)
BUDGETS = tuple(256 * 2 ** k for k in range(12))  # token budgets tried: 256 .. 524288


def search(shape: ModelShape, base: Settings, lengths: list[tuple[int, int, int]], hw: Hardware,
           global_batch: int, layouts: tuple[str, ...] | None = None) -> list[Plan]:
    """Every setting (ZeRO stage, optimizer offload, checkpointing, layout; micro-batch x accumulation, or a token
    budget: the largest of BUDGETS that fits) whose micro x accumulation x world equals `global_batch`, fitting
    ones first, fastest first."""
    world = hw.world
    dp = max(1, world // base.sequence_parallel)  # SP groups share a micro-batch
    per_rank, rem = divmod(global_batch, dp)
    if rem or per_rank < 1:
        raise ValueError(f"global batch {global_batch} is not a multiple of {dp} data-parallel ranks")
    sample = lengths[:SEARCH_PAIRS]
    micros = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
    plans = []
    for stage in (0, 2, 3):
        for offload in ((False, True) if stage == 3 else (False,)):  # the shipped zero3_offload
            for ckpt in (False, True):
                for layout in layouts or (base.layout,):
                    combo = replace(base, world=world, zero_stage=stage, offload_optimizer=offload,
                                    checkpointing=ckpt, layout=layout, token_budget=0)
                    for m in micros:
                        plans.append(evaluate(shape, replace(combo, micro=m, grad_accum=per_rank // m), sample, hw))
                    fitting = None
                    for b in BUDGETS:
                        p = evaluate(shape, replace(combo, micro=per_rank, grad_accum=1, token_budget=b), sample, hw)
                        if not p.fits:
                            break
                        fitting = p
                        if p.time["micro_steps"] <= 1:
                            break
                    if fitting is not None:
                        plans.append(fitting)
    plans.sort(key=lambda p: (not p.fits, round(p.time["step_s"], 6), p.time["micro_steps"], p.memory.needed_gib))
    return plans
