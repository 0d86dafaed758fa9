"""Ulysses sequence parallelism, the process part: the SP groups, the all-to-all around attention, the gather of
per-token log-probs (core.seqpar has the index arithmetic).

    sp = setup_groups(k)                 # COLLECTIVE: consecutive ranks [g k, (g+1) k) form SP group g
    install(model, sp)                   # the model's attention becomes the all-to-all wrapper (for its lifetime)
    response_logps(model, batch, shard=sp.shard, head_calls=...)   # batch collated with pad_to_multiple=k

Why not DeepSpeed's `ulysses_sp.UlyssesSPAttentionHF` (0.19): its wrapper drops every 4-D mask and relies on
position_ids for causality, which isolates packed sequences only under flash-attn; midpo's packed and
shared-prompt rows on sdpa/eager need their block / shared-prompt masks and Mistral's and Gemma 2's sliding windows
(core.logprobs.attention_windows), and it refuses eager (Gemma 2's soft-capping). It also replaces the global
`sdpa` entry of transformers' attention table for every model in the process, and its data-loader adapter shards
HF `labels` batches, not PairBatch's flat response indices. So the wrapper here passes the row's whole 4-D mask to
the model's own attention after the all-to-all, registered under its own name and set on the SP model only.

Data parallelism runs across groups: the sampler and the chunk runner see `dp_size` ranks (`dp_rank` = group
index); ZeRO shards over every rank. Every rank of a group computes the same loss, and the group's gradients sum
to the micro-batch's, so the loss is scaled by k for DeepSpeed's average over all ranks (train.step).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from midpo.core.seqpar import SeqShard

ATTN_NAME = "midpo_ulysses"


@dataclass
class SeqGroups:
    """This rank's SP group (size, rank in it, the process group) and the data-parallel view over groups."""

    size: int
    rank: int
    group: object  # torch.distributed ProcessGroup
    dp_rank: int
    dp_size: int

    @property
    def shard(self) -> SeqShard:
        return SeqShard(self.rank, self.size, lambda local, counts: group_gather(local, counts, self))


def layout(world: int, size: int, rank: int) -> tuple[int, int, int]:
    """(SP rank, data-parallel rank, data-parallel size) of `rank`: consecutive ranks share a group (on a
    multi-node job with k <= GPUs per node the all-to-all stays inside a node)."""
    if size < 1 or world % size:
        raise ValueError(f"sequence_parallel={size} must divide the number of processes ({world})")
    return rank % size, rank // size, world // size


def data_parallel(sp: SeqGroups | None, world: int, rank: int) -> tuple[int, int]:
    """(size, rank) of the data-parallel view: the SP groups (a group is one data-parallel rank), or every rank."""
    return (world, rank) if sp is None else (sp.dp_size, sp.dp_rank)


def head_calls(batch, shard, chunk_tokens: int) -> int:
    """COLLECTIVE: output-head calls of an SP forward, the same on every rank (ZeRO-3 gathers the head per call):
    enough for the rank that scores the most response tokens, `chunk_tokens` at a time."""
    from midpo.core.seqpar import local_count
    from midpo.runtime import dist as pdist

    n = local_count(batch.logit_index, batch.input_ids.shape[1], shard)
    return max(1, -(-pdist.all_max(n) // chunk_tokens))


def setup_groups(size: int) -> SeqGroups | None:
    """COLLECTIVE: every rank creates every SP group (torch's new_group is collective); None when size is 1."""
    from midpo.runtime import dist as pdist

    world, rank = pdist.world_size(), pdist.rank()
    sp_rank, dp_rank, dp_size = layout(world, size, rank)
    if size == 1:
        return None
    mine = None
    for g in range(dp_size):
        pg = dist.new_group(list(range(g * size, (g + 1) * size)))
        if g == dp_rank:
            mine = pg
    return SeqGroups(size, sp_rank, mine, dp_rank, dp_size)


# ---------------------------------------------------------------------------------------------
# collectives with autograd


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 (k equal blocks): block i goes to rank i. Its own inverse, so the backward is
    the same exchange of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous()
        out = torch.empty_like(g)
        dist.all_to_all_single(out, g, group=ctx.group)
        return out, None


class _GatherPieces(torch.autograd.Function):
    """Every rank's (n_r, *rest) piece -> their concatenation in rank order; backward: this rank's slice (each
    rank of the group holds the same downstream loss)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, counts: tuple, rank: int, group) -> torch.Tensor:
        ctx.counts, ctx.rank = counts, rank
        width = max(1, max(counts))
        buf = local.new_zeros((width, *local.shape[1:]))
        buf[: local.shape[0]] = local
        bufs = [torch.empty_like(buf) for _ in counts]
        dist.all_gather(bufs, buf, group=group)
        return torch.cat([b[:c] for b, c in zip(bufs, counts, strict=True)])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        start = sum(ctx.counts[: ctx.rank])
        return g[start: start + ctx.counts[ctx.rank]], None, None, None


def group_gather(local: torch.Tensor, counts: list[int], sp: SeqGroups) -> torch.Tensor:
    if local.shape[0] != counts[sp.rank]:
        raise RuntimeError(f"SP rank {sp.rank} holds {local.shape[0]} values, its count says {counts[sp.rank]}")
    return _GatherPieces.apply(local, tuple(int(c) for c in counts), sp.rank, sp.group)


# ---------------------------------------------------------------------------------------------
# attention


def seq_to_heads(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """(b, h, T/k, d) this rank's positions of every head -> (b, h/k, T, d) every position of its heads."""
    b, h, t, d = x.shape
    blocks = x.reshape(b, size, h // size, t, d).transpose(0, 1)  # block j: heads of rank j
    got = _AllToAll.apply(blocks, group)  # block i: rank i's positions of my heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * t, d)


def heads_to_seq(o: torch.Tensor, size: int, group) -> torch.Tensor:
    """(b, T, h/k, d) attention output of this rank's heads -> (b, T/k, h, d) its positions of every head."""
    b, T, hk, d = o.shape
    blocks = o.reshape(b, size, T // size, hk, d).transpose(0, 1)  # block j: positions of rank j
    got = _AllToAll.apply(blocks, group)  # block i: my positions of rank i's heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, T // size, size * hk, d)


@dataclass
class _AttnState:
    size: int
    group: object
    core: str  # the model's own attention: sdpa | eager


def _core_function(module, core: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if core == "eager":  # every model file has its own eager_attention_forward (Gemma 2: soft-capping)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[core]


def ulysses_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function of an SP model: all-to-all to all positions of h/k heads, the model's own attention
    with the row's whole 4-D mask, all-to-all back."""
    st: _AttnState = module._midpo_sp
    q, k, v = (seq_to_heads(t, st.size, st.group) for t in (query, key, value))
    if attention_mask is None and st.core == "eager":  # a causal row (PairBatch.causal_rows): eager needs a mask
        T = q.shape[2]
        attention_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
    if st.core == "eager" and attention_mask is not None and attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        attention_mask = torch.where(attention_mask, zero, torch.finfo(q.dtype).min)
    if attention_mask is None:  # sdpa: causal over the whole row (transformers' sdpa sets is_causal without a mask)
        kwargs.setdefault("is_causal", True)
    out, _ = _core_function(module, st.core)(module, q, k, v, attention_mask, **kwargs)  # (b, T, h/k, d)
    return heads_to_seq(out, st.size, st.group), None


def install(model: torch.nn.Module, sp: SeqGroups) -> None:
    """Make `model`'s attention the all-to-all wrapper, for the model's lifetime (activation checkpointing recomputes
    attention in backward). Refuses head counts the group size does not divide."""
    from transformers import AttentionInterface

    cfg = model.config
    core = getattr(cfg, "_attn_implementation", None) or "eager"
    if core == ATTN_NAME:
        return
    if "flash" in core or core not in ("sdpa", "eager"):
        raise ValueError(f"sequence parallelism runs on attention sdpa or eager (a dense 4-D mask per row); the model "
                         f"resolves to {core!r}: set model.attn_implementation=sdpa")
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if heads % sp.size or kv % sp.size:
        raise ValueError(f"sequence_parallel={sp.size} must divide the attention heads ({heads}) and key/value heads "
                         f"({kv}) of {type(model).__name__}: each rank attends with a 1/{sp.size} slice of them")
    AttentionInterface.register(ATTN_NAME, ulysses_attention)
    state = _AttnState(sp.size, sp.group, core)
    n = 0
    for m in model.modules():
        if getattr(m, "config", None) is cfg and hasattr(m, "num_key_value_groups"):
            m._midpo_sp = state  # a plain attribute: not a parameter, not in the state dict
            n += 1
    if n == 0:
        raise ValueError(f"no attention module found in {type(model).__name__} for sequence parallelism")
    cfg._attn_implementation = ATTN_NAME
    model._midpo_sp_core = core  # what a mask's form is decided by (core.logprobs reads _attn_implementation)
