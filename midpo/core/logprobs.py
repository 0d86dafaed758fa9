"""Per-token log-probs of response tokens from one (packed or padded) forward.

Conventions (shared with the reference cache): every per-token tensor is LEFT-aligned per
response: column t = response token t (EOS included), padding columns are 0 and masked False.
Log-probs are fp32 (float64 inputs stay float64); logits are cast to fp32 chunk by chunk, so
full-vocab fp32 log-probs are never materialized for the whole batch (TRL's
``selective_log_softmax`` idea: logsumexp per chunk + gather).

Module imports only torch: the model is passed in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from midpo.core.batching import PairBatch
from midpo.core.router import load_balancing_loss
from midpo.core.seqpar import SeqShard, gather_in_order, owners, shard_inputs, spans


@dataclass
class ResponseLogps:
    """Per-token response log-probs of B pairs; chosen and rejected have their own widths."""

    chosen: torch.Tensor  # (B, Lc) fp32, 0 where chosen_mask is False
    chosen_mask: torch.Tensor  # (B, Lc) bool
    rejected: torch.Tensor  # (B, Lr)
    rejected_mask: torch.Tensor  # (B, Lr) bool
    # Optional extras for full-vocab priors (filled by response_logps when asked).
    chosen_logits: torch.Tensor | None = None  # (B, Lc, V) logits predicting each response token
    rejected_logits: torch.Tensor | None = None  # (B, Lr, V)
    chosen_hidden: torch.Tensor | None = (
        None  # (B, Lc, n_layers, H) per-layer hidden states at the predicting positions
    )
    rejected_hidden: torch.Tensor | None = None  # (B, Lr, n_layers, H)
    # (N, V) DETACHED logits predicting each response token, flat in ``batch.target_index`` order (the MI-DPO
    # hook's marginal objective reads the policy distribution without taking gradients through it).
    logits: torch.Tensor | None = None
    # response_logps(return_topk=k): flat in target order, (N, k) fp32 log-probs (descending), (N, k) token ids,
    # (N,) log of the remaining mass -- computed chunk by chunk, never holding (N, V) logits
    topk_values: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None
    # response_logps(router_aux=True): () fp32, the MoE routers' load-balancing loss over this forward's real
    # tokens (midpo.core.router), with grad
    router_aux: torch.Tensor | None = None

    @property
    def chosen_sum(self) -> torch.Tensor:
        return (self.chosen * self.chosen_mask).sum(-1)  # (B,)

    @property
    def rejected_sum(self) -> torch.Tensor:
        return (self.rejected * self.rejected_mask).sum(-1)  # (B,)

    @property
    def chosen_len(self) -> torch.Tensor:
        return self.chosen_mask.sum(-1)  # (B,) long

    @property
    def rejected_len(self) -> torch.Tensor:
        return self.rejected_mask.sum(-1)  # (B,) long

    def to(self, device: torch.device | str) -> ResponseLogps:
        return ResponseLogps(
            **{
                f.name: (None if (v := getattr(self, f.name)) is None else v.to(device))
                for f in dataclasses.fields(self)
            }
        )

    def detach(self) -> ResponseLogps:
        return ResponseLogps(
            **{f.name: (None if (v := getattr(self, f.name)) is None else v.detach()) for f in dataclasses.fields(self)}
        )

    @classmethod
    def from_lists(
        cls,
        chosen: Sequence[Sequence[float]],
        rejected: Sequence[Sequence[float]],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> ResponseLogps:
        """From per-sequence per-token lists (the reference cache's columns) to left-aligned tensors."""
        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen lists but {len(rejected)} rejected lists")
        c, cm = _left_align(chosen, dtype, device)
        r, rm = _left_align(rejected, dtype, device)
        return cls(c, cm, r, rm)

    @classmethod
    def from_flat(cls, values: torch.Tensor, batch: PairBatch) -> ResponseLogps:
        """(N,) values in ``batch.target_index`` order -> left-aligned chosen / rejected."""
        (c, cm), (r, rm) = split_flat(values, batch)
        return cls(c, cm, r, rm)


def _left_align(lists: Sequence[Sequence[float]], dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(x) for x in lists], dtype=torch.long)  # (B,)
    L = int(lens.max()) if len(lists) else 0
    mask = torch.arange(L)[None, :] < lens[:, None]  # (B, L)
    out = torch.zeros(len(lists), L, dtype=dtype)
    if L:
        out[mask] = torch.tensor([v for x in lists for v in x], dtype=dtype)
    return out.to(device), mask.to(device)


def split_flat(values: torch.Tensor, batch: PairBatch):
    """(N, *rest) per-response-token values -> ((chosen (B, Lc, *rest), mask (B, Lc)), (rejected ..., mask)).

    One scatter per side; padding columns are zero."""
    B = batch.num_pairs
    out = []
    for side in (0, 1):
        lens = batch.response_lens[side * B : (side + 1) * B]  # (B,)
        L = int(lens.max())
        sel = (batch.response_seq >= side * B) & (batch.response_seq < (side + 1) * B)  # (N,)
        rows = batch.response_seq[sel] - side * B
        cols = batch.response_pos[sel]
        dense = values.new_zeros((B, L, *values.shape[1:]))
        dense = dense.index_put((rows, cols), values[sel])  # out-of-place keeps autograd simple
        mask = torch.arange(L, device=lens.device)[None, :] < lens[:, None]  # (B, L)
        out.append((dense, mask))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# chunked full-vocab helpers (all fp32; float64 in, float64 out)


def _fdtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log_softmax(logits, -1).gather(-1, index[..., None])[..., 0], chunked over the leading
    positions so only one chunk of full-vocab fp32 values exists at a time.

    logits (..., V), index (...) -> (...) fp32."""
    flat = logits.reshape(-1, logits.shape[-1])  # (M, V)
    idx = index.reshape(-1)  # (M,)
    parts = []
    for s in range(0, flat.shape[0], chunk_size):
        lg = flat[s : s + chunk_size].to(_fdtype(flat))  # (m, V)
        parts.append(lg.gather(-1, idx[s : s + chunk_size, None])[:, 0] - torch.logsumexp(lg, -1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=_fdtype(flat))
    return out.reshape(index.shape)


def per_token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """KL_t(p || q) = sum_v p(v) (log p(v) - log q(v)) per position, chunked. (..., V) x2 -> (...).

    TDPO/SparsePO use p = reference, q = policy (reference-weighted)."""
    shape = logits_p.shape[:-1]
    fp = logits_p.reshape(-1, logits_p.shape[-1])
    fq = logits_q.reshape(-1, logits_q.shape[-1])
    dt = torch.promote_types(_fdtype(fp), _fdtype(fq))
    parts = []
    for s in range(0, fp.shape[0], chunk_size):
        lp = torch.log_softmax(fp[s : s + chunk_size].to(dt), -1)  # (m, V)
        lq = torch.log_softmax(fq[s : s + chunk_size].to(dt), -1)  # (m, V)
        parts.append((lp.exp() * (lp - lq)).sum(-1))
    out = torch.cat(parts) if parts else fp.new_zeros(0, dtype=dt)
    return out.reshape(shape)


def topk_logprobs(
    logits: torch.Tensor, k: int, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax(logits) and the log of the remaining mass, chunked.

    logits (..., V) -> values (..., k) fp32 log-probs (descending), indices (..., k) long,
    tail_logmass (...) = log(1 - sum exp(values)), computed as a logsumexp over the other logits
    (-inf when k == V)."""
    V = logits.shape[-1]
    if not 0 < k <= V:
        raise ValueError(f"k must be in [1, {V}], got {k}")
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, V)
    vals, idxs, tails = [], [], []
    for s in range(0, flat.shape[0], chunk_size):
        lg = flat[s : s + chunk_size].to(_fdtype(flat))  # (m, V)
        lse = torch.logsumexp(lg, -1, keepdim=True)  # (m, 1)
        top, idx = lg.topk(k, -1)  # (m, k)
        rest = lg.scatter(-1, idx, float("-inf"))  # (m, V)
        vals.append(top - lse)
        idxs.append(idx)
        tails.append(torch.logsumexp(rest, -1) - lse[:, 0])
    return (
        torch.cat(vals).reshape(*shape, k),
        torch.cat(idxs).reshape(*shape, k),
        torch.cat(tails).reshape(shape),
    )


def per_token_kl_topk(
    ref_values: torch.Tensor,
    ref_indices: torch.Tensor,
    ref_tail: torch.Tensor,
    logits_q: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """KL_t(ref || q) from a cached top-k slice of the reference, (..., k) x2, (...), (..., V) -> (...).

    Approximation: the reference's tail is one bucket, compared with q's mass on the same
    complement: sum_topk p (log p - log q) + p_tail (log p_tail - log q_tail). By the log-sum
    inequality this is a LOWER bound of the full KL, exact when k == V."""
    shape = logits_q.shape[:-1]
    k = ref_values.shape[-1]
    fq = logits_q.reshape(-1, logits_q.shape[-1])
    fv, fi, ft = ref_values.reshape(-1, k), ref_indices.reshape(-1, k), ref_tail.reshape(-1)
    dt = torch.promote_types(_fdtype(fq), _fdtype(fv))
    parts = []
    for s in range(0, fq.shape[0], chunk_size):
        lq = torch.log_softmax(fq[s : s + chunk_size].to(dt), -1)  # (m, V)
        idx = fi[s : s + chunk_size]
        lp = fv[s : s + chunk_size].to(dt)  # (m, k)
        head = (lp.exp() * (lp - lq.gather(-1, idx))).sum(-1)  # (m,)
        q_tail = torch.logsumexp(lq.scatter(-1, idx, float("-inf")), -1)  # (m,)
        p_tail = ft[s : s + chunk_size].to(dt)
        # 0 * log 0 = 0: a reference with no tail mass contributes nothing.
        tail = torch.where(torch.isinf(p_tail), torch.zeros_like(p_tail), p_tail.exp() * (p_tail - q_tail))
        parts.append(head + tail)
    return torch.cat(parts).reshape(shape)


# ---------------------------------------------------------------------------------------------
# model forwards


def fp32_logits(raw: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Head output -> logits in (at least) fp32, with Gemma's final_logit_softcapping when set."""
    logits = raw.to(_fdtype(raw))  # (m, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _target_logps(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, t[:, None])[:, 0] - torch.logsumexp(logits, -1)  # (m,)


def _logps_from_logits(softcap: float | None, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _target_logps(fp32_logits(logits, softcap), t)  # (m,)


def _chunk_logps(head: torch.nn.Module, softcap: float | None, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _logps_from_logits(softcap, head(h), t)  # (m,)


def attention_windows(config) -> dict[str, int | None]:
    """Layer type -> sliding window (None: full attention) of a transformers config: Mistral's one window for
    every layer, Gemma 2's alternating sliding/full layers (`layer_types`), Qwen's windows when switched on
    (`sliding_window` is None or 0 when off)."""
    window = getattr(config, "sliding_window", None) or None
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None)
    if not types:
        return {"sliding_attention" if window else "full_attention": window}
    return {t: (window if t == "sliding_attention" else None) for t in dict.fromkeys(types)}


def _attn_implementation(model) -> str | None:
    return getattr(model.config, "_attn_implementation", None) or getattr(model.config, "attn_implementation", None)


def response_logps(
    model: torch.nn.Module,
    batch: PairBatch,
    *,
    chunk_size: int = 1024,
    return_hidden: bool = False,
    return_logits: bool = False,
    return_flat_logits: bool = False,
    return_topk: int = 0,
    router_aux: bool = False,
    shard: SeqShard | None = None,
    head_calls: int = 0,
) -> ResponseLogps:
    """Forward ``batch`` through a transformers causal LM and return per-token response log-probs.

    The decoder (``model.get_decoder()``) runs once; only the N response-predicting hidden states go
    through the output head, ``chunk_size`` positions at a time, in fp32. With grad enabled each
    chunk is recomputed in backward (activation checkpointing) so at most one chunk of full-vocab
    logits is alive at any time. Logits = head(hidden) with the optional
    ``config.final_logit_softcapping`` (Gemma); models with other logit post-processing are not
    supported (``sequence_logps_naive`` is the check).

    return_logits: also ``chosen_logits``/``rejected_logits`` (B, L, V) in the head's dtype, with grad
    (TDPO/SparsePO KL; memory N x V), and ``logits`` (below). return_flat_logits: only ``logits``, the
    (N, V) logits DETACHED and flat (the MI-DPO hook's marginal objective). Either way the head then runs
    ONCE over all N positions and the log-probs are taken from slices of those same logits (no second
    head pass, no recomputed head matmul in backward; the logits are kept anyway). Values equal the
    chunked path's (same ops per slice).
    return_hidden: also per-layer hidden states (B, L, n_layers, H) at the predicting positions
    (SparsePO's mask network; ``hidden_states[1:]``, one per layer).
    return_topk=k (no grad; the reference cache's top-k slice): also ``topk_values``/``topk_ids``/
    ``tail_logmass`` (see ``topk_logprobs``), taken from each chunk's logits as they are made, so memory
    stays at one chunk x V instead of N x V.
    router_aux (mixture-of-experts models: ``config.num_experts_per_tok``): also ``router_aux``, the routers'
    load-balancing loss over every real token of the forward (prompts included, padding not).
    shard (sequence parallelism, core.seqpar; the model's attention must be the all-to-all wrapper,
    runtime.seqpar.install): this rank runs its columns of the rows, scores the response tokens whose predicting
    position it holds, in ``head_calls`` output-head calls (the same count on every rank, some maybe empty), and
    the values of the whole group are gathered; the log-probs alone (no logits, hidden states, top-k, router loss).
    Pass the bare HF module (under DeepSpeed, ``engine.module``): ZeRO-3 gathers through module hooks.
    """
    if return_topk and (return_logits or return_flat_logits):
        raise ValueError("return_topk makes the top-k without keeping logits; with return_logits use topk_logprobs")
    if shard is not None and (return_logits or return_flat_logits or return_hidden or return_topk or router_aux):
        raise ValueError("sequence parallelism returns per-token log-probs only (no logits, hidden states, top-k or "
                         "router loss)")
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    kw = batch.model_inputs(_attn_implementation(model), dtype=head.weight.dtype,
                            windows=attention_windows(model.config), dense=shard is not None)
    if shard is not None:
        kw = shard_inputs(kw, shard)
    if router_aux:
        kw["output_router_logits"] = True
    out = decoder(**kw, use_cache=False, output_hidden_states=return_hidden)
    hid = out.last_hidden_state  # (R, T, H); under a shard (R, T / size, H)
    if shard is None:
        h = hid.reshape(-1, hid.shape[-1]).index_select(0, batch.logit_index)  # (N, H)
        targets = batch.input_ids.reshape(-1).index_select(0, batch.target_index)  # (N,)
        cuts = [(s, min(s + chunk_size, h.shape[0])) for s in range(0, h.shape[0], chunk_size)]
    else:
        owner, local = owners(batch.logit_index, batch.input_ids.shape[1], shard.size)
        mine = (owner == shard.rank).nonzero()[:, 0]  # ascending: this rank's response tokens
        h = hid.reshape(-1, hid.shape[-1]).index_select(0, local[mine])  # (n, H)
        # targets from the WHOLE row: shifted before the split, so a shard's last position has its target
        targets = batch.input_ids.reshape(-1).index_select(0, batch.target_index[mine])  # (n,)
        cuts = spans(h.shape[0], head_calls or -(-h.shape[0] // chunk_size))

    grad = torch.is_grad_enabled() and h.requires_grad
    parts = []
    if return_logits or return_flat_logits:
        raw = head(h)  # (N, V): the one head pass, kept (it is returned)
        # Slices come from ONE split so that backward assembles the logits' gradient once, not per chunk.
        sizes = [min(chunk_size, h.shape[0] - s) for s in range(0, h.shape[0], chunk_size)]
        # A slice's saved tensors are views of `raw` unless a cast/softcap makes new ones: then recompute those.
        light = not softcap and _fdtype(raw) == raw.dtype
        for zc, tc in zip(raw.split(sizes), targets.split(sizes)):
            if grad and not light:
                parts.append(checkpoint(_logps_from_logits, softcap, zc, tc, use_reentrant=False))
            else:
                parts.append(_logps_from_logits(softcap, zc, tc))
        with torch.set_grad_enabled(grad and return_logits):  # the flat copy alone is detached: no graph
            logits = torch.tanh(raw / softcap) * softcap if softcap else raw  # (N, V)
        if return_logits:
            (res_cl, _), (res_rl, _) = split_flat(logits, batch)
    elif return_topk:
        if grad:
            raise ValueError("return_topk is for scoring without gradients (torch.no_grad())")
        tops = []
        for s in range(0, h.shape[0], chunk_size):
            z = fp32_logits(head(h[s : s + chunk_size]), softcap)  # (m, V), this chunk only
            parts.append(_target_logps(z, targets[s : s + chunk_size]))
            tops.append(topk_logprobs(z, return_topk))
    else:
        # One chunk: checkpointing would free its logits between forward and backward only to recompute
        # them, with the same peak (backward needs the chunk's logits either way): skip the head recompute.
        single = len(cuts) <= 1
        for s, e in cuts:
            hc, tc = h[s:e], targets[s:e]
            if grad and not single:
                parts.append(checkpoint(_chunk_logps, head, softcap, hc, tc, use_reentrant=False))
            else:
                parts.append(_chunk_logps(head, softcap, hc, tc))
    flat = torch.cat(parts) if parts else h.new_zeros(0, dtype=_fdtype(h))
    if shard is not None:
        flat = gather_in_order(flat, owner, shard)  # (N,) in target order, the whole group's
    res = ResponseLogps.from_flat(flat, batch)

    if return_topk:
        res.topk_values, res.topk_ids, res.tail_logmass = (torch.cat(x) for x in zip(*tops))
    if return_logits or return_flat_logits:
        res.logits = logits.detach()
    if return_logits:
        res.chosen_logits, res.rejected_logits = res_cl, res_rl
    if router_aux:
        if not getattr(out, "router_logits", None):
            raise ValueError(f"{type(model).__name__} returns no router logits for a load-balancing loss: set "
                             "train.router_aux_loss_coef=0")
        res.router_aux = load_balancing_loss(out.router_logits, model.config.num_experts_per_tok,
                                             batch.token_mask.reshape(-1))
    if return_hidden:
        layers = torch.stack(out.hidden_states[1:], dim=2)  # (R, T, n_layers, H)
        per = layers.reshape(-1, *layers.shape[2:]).index_select(0, batch.logit_index)  # (N, n_layers, H)
        (res.chosen_hidden, _), (res.rejected_hidden, _) = split_flat(per, batch)
    return res


def sequence_logps_naive(
    model: torch.nn.Module, prompt_ids: Sequence[int] | torch.Tensor, response_ids: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """Plain single-sequence forward: log pi(response_t | prompt, response_<t) for every response
    token, (L,) fp32. The reference for tests and for the reference-cache check."""
    dev = next(model.parameters()).device
    p = torch.as_tensor(prompt_ids, dtype=torch.long, device=dev)
    r = torch.as_tensor(response_ids, dtype=torch.long, device=dev)
    ids = torch.cat([p, r])[None]  # (1, P+L)
    logits = model(input_ids=ids, use_cache=False).logits[0].float()  # (P+L, V)
    pred = logits[p.numel() - 1 : -1]  # (L, V): position i predicts token i+1
    return torch.log_softmax(pred, -1).gather(-1, r[:, None])[:, 0]
