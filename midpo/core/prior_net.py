"""The learnable token-level prior network of MI-DPO proper (docs/algorithms.md, "MI-DPO proper").

    zeta_phi(y | [x]) = prod_t zeta_phi(y_t | y_<t [, x])      a causal LM normalized by its softmax

Layouts (both built with ``collate_pairs``, pairs kept together, the SAME response-token order as
the policy's batch, so the N per-token values line up one to one with the policy's):
- ``condition_on_prompt=true``: the policy's own batch (prompt + response);
- unconditioned: ``[BOS] + response`` (BOS gives zeta(y_1) a context).

Update objectives (pure functions below, on flat per-token tensors):
- ``marginal``: sum_t KL(sg pi(.|x,y<t) || zeta(.|y<t[,x])) on the batch's responses, the alternating
  (Blahut-Arimoto) step toward the policy's marginal. Computed chunk by chunk from the policy
  logits of the policy's own forward (flat, detached: ``ResponseLogps.logits``); the prior's
  full-vocab values exist one chunk at a time, and the logits' gradient is formed in closed form
  (``_HeadTerms``). The ``joint`` objective differentiates checkpointed chunks with autograd.
- ``joint``: the MI-DPO loss w.r.t. zeta (policy detached) + anchor_weight * anchor, anchor =
  ``kl_init`` (sum_t KL(zeta_init || zeta)) or ``nll`` (sum_t -log zeta(y_t)), both responses.
  Why the anchor: J alone lowers log zeta(y_w) and raises log zeta(y_l) without limit (collapse).
  Per token, J's pull on log zeta(y_t) is at most a (= beta); for a context-wise (tabular) prior,
  the ``nll`` anchor wins iff anchor_weight > a, the ``kl_init`` anchor iff
  anchor_weight * zeta_init(y_t) > a * sigmoid(-margin) (so with near-uniform init tokens it only
  stops the collapse once the margin has grown, see tests/core/test_prior_net.py).

Sums are per pair (over both responses' tokens), averaged over the micro-batch's pairs.
The prior network that runs all this on its own DeepSpeed engine is midpo/train/prior_engine.py.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from midpo.core.batching import PairBatch, collate_pairs
from midpo.core.logprobs import ResponseLogps, _attn_implementation, attention_windows, fp32_logits

OBJECTIVES = ("marginal", "joint")
ANCHORS = ("kl_init", "nll")


# ---------------------------------------------------------------------------------------------
# building the network


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    dec = model.get_decoder()
    layers = getattr(dec, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder.layers ModuleList; cannot truncate to k layers")
    return layers


def truncate_layers(model: torch.nn.Module, k: int) -> torch.nn.Module:
    """In place: keep the first ``k`` decoder layers (embedding, final norm and head untouched)."""
    layers = _layers(model)
    n = len(layers)
    if not 0 < k <= n:
        raise ValueError(f"prior_net.num_layers must be in [1, {n}] (0 = all), got {k}")
    if k == n:
        return model
    model.get_decoder().layers = torch.nn.ModuleList(list(layers)[:k])
    model.config.num_hidden_layers = k
    lt = getattr(model.config, "layer_types", None)
    if isinstance(lt, list):  # per-layer attention types (sliding/full) must match the layer count
        model.config.layer_types = lt[:k]
    return model


def prior_from_model(init: torch.nn.Module, num_layers: int = 0) -> torch.nn.Module:
    """A trainable copy of ``init`` (whole, or its first ``num_layers`` layers + final norm + head)."""
    model = copy.deepcopy(init)
    if num_layers:
        truncate_layers(model, num_layers)
    model.requires_grad_(True)
    model.train()
    model.config.use_cache = False
    return model


def check_vocab(prior_config, policy_config) -> None:
    pv, qv = getattr(prior_config, "vocab_size", None), getattr(policy_config, "vocab_size", None)
    if pv != qv:
        raise ValueError(f"prior_net.init has vocab_size {pv}, the policy {qv}: the prior must share the policy's "
                         "vocabulary (same tokenizer)")


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warmup over the prior's first ``warmup_steps`` updates, then constant."""
    return lambda u: min(1.0, (u + 1) / warmup_steps) if warmup_steps > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# batch layout


def response_rows(batch: PairBatch) -> list[dict]:
    """The response token lists of each pair of ``batch`` (chosen = seq s, rejected = seq s + B)."""
    toks = batch.input_ids.reshape(-1).index_select(0, batch.target_index).tolist()  # (N,) in (s, t) order
    lens = batch.response_lens.tolist()
    seqs, o = [], 0
    for n in lens:
        seqs.append(toks[o : o + n])
        o += n
    B = batch.num_pairs
    return [{"chosen_ids": seqs[i], "rejected_ids": seqs[B + i]} for i in range(B)]


def prior_batch(batch: PairBatch, *, condition_on_prompt: bool, bos_id: int | None, pad_id: int,
                max_row_tokens: int | None = None) -> PairBatch:
    """The prior's batch: the policy's own (conditioned) or [BOS] + response (unconditioned).
    ``max_row_tokens``: packed-row budget of the unconditioned batch (batching.row_tokens_for: under a dense
    block mask one row of every response costs quadratic attention; the trainer packs the policy's the same way)."""
    if condition_on_prompt:
        return batch
    if bos_id is None:
        raise ValueError("the unconditioned prior needs a BOS token: set prior_net.bos_token_id (the init model's "
                         "config has no bos_token_id)")
    rows = [{"prompt_ids": [bos_id], **r} for r in response_rows(batch)]
    return collate_pairs(rows, layout=batch.layout, pad_id=pad_id,
                         max_row_tokens=max_row_tokens).to(batch.input_ids.device)


# ---------------------------------------------------------------------------------------------
# the forward: per-token log zeta, entropy and KL(target || zeta), chunked


def side_getter(chosen: torch.Tensor, rejected: torch.Tensor, batch: PairBatch) -> Callable[[int, int], torch.Tensor]:
    """Target logits as left-aligned per-side (B, L, V) tensors (ResponseLogps.*_logits) -> a function
    (s, e) -> (e - s, V) DETACHED logits of flat response tokens s..e (never crossing the chosen/rejected
    boundary). Indexes only the chunk, so no flat (N, V) copy is made."""
    B = batch.num_pairs
    seq, pos = batch.response_seq, batch.response_pos

    def get(s: int, e: int) -> torch.Tensor:
        if e <= s:  # an empty chunk (chunk counts are equalized over ranks, see _ranges)
            return chosen.detach()[:0, 0]
        side = chosen if int(seq[s]) < B else rejected
        rows = seq[s:e] - (0 if side is chosen else B)
        return side.detach()[rows, pos[s:e]]

    return get


def flat_getter(logits: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    return lambda s, e: logits.detach()[s:e]


def _terms(logits, targets, tgts, keep: list | None = None):
    """(logp (m,), entropy (m,), *KL(target || zeta) (m,) one per target) from fp32 logits (m, V).
    ``keep``: a list that receives q = softmax(logits) and each target's p (m, V), for a backward."""
    lse = torch.logsumexp(logits, -1)  # (m,)
    # Same ops as logprobs._chunk_logps, so a prior equal to the reference gives bit-equal log-probs.
    logp = logits.gather(-1, targets[:, None])[:, 0] - lse
    logq = logits - lse[:, None]  # (m, V)
    q = logq.exp()
    ent = -(q * logq).sum(-1)
    kls, ps = [], []
    for x in tgts:
        lp = torch.log_softmax(x.to(logq.dtype), -1)  # (m, V) target, no grad
        p = lp.exp()
        kls.append((p * (lp - logq)).sum(-1))
        ps.append(p)
    if keep is not None:
        keep += [q, *ps]
    return (logp, ent, *kls)


def _chunk_terms(head, softcap, h, targets, tgts):
    """``_terms`` of head(h). ``tgts``: (m, V) target logits (detached), or a function () -> them (called
    here, so that a checkpoint keeps no full-vocab copies)."""
    return _terms(fp32_logits(head(h), softcap), targets, tgts() if callable(tgts) else tgts)


class _HeadTerms(torch.autograd.Function):
    """``_terms`` of the head's output with a hand-written backward, for the prior's update:
    ``_HeadTerms.apply(head(h), head, softcap, h.detach(), targets, keep, *tgts)``.

    Forward computes the values without an autograd graph (the same ops, so the same values as the no-grad
    path). Backward returns the gradient of the head's output in closed form, with q = softmax(logits),
    p_g = softmax(target_g) (the forward's own intermediates, bit for bit):
        d logp_t / d logits = onehot(y_t) - q
        d KL(p_g || q) / d logits = q - p_g
    (entropy is a metric: no gradient; sum_v p_g = 1 is used where autograd carried the computed sum, 1 up
    to rounding). ``keep=True`` keeps q and the p_g from forward to backward; otherwise nothing full-vocab
    is kept and backward recomputes head(h) without grad (as activation checkpointing recomputed the chunk).
    The caller keeps only the LAST chunk: backward runs it first, so its q, p_g replace the tensors a
    recompute would allocate at that moment, and the peak memory stays one chunk's. Versus autograd through
    a checkpointed chunk this skips the recomputed forward and the backward of every elementwise op (~20
    full-vocab passes per chunk; the kept chunk also its head matmul). The head's own backward stays in the
    caller's graph (head(h) is this function's input), so under ZeRO-3 its weight gradient is reduced once
    per backward, as for any layer."""

    @staticmethod
    def forward(ctx, raw, head, softcap, h, targets, keep, *tgts):
        ctx.set_materialize_grads(False)
        logits = fp32_logits(raw, softcap)
        kept = [] if keep else None
        outs = _terms(logits, targets, tgts, kept)
        if keep and softcap:
            kept.append(logits)
        ctx.kept, ctx.head, ctx.softcap, ctx.n, ctx.raw_dtype = kept, head, softcap, len(tgts), raw.dtype
        ctx.save_for_backward(h, targets, *tgts)
        ctx.mark_non_differentiable(outs[1])
        return outs

    @staticmethod
    def backward(ctx, g_logp, g_ent, *g_kls):
        h, targets, *tgts = ctx.saved_tensors
        with torch.no_grad():
            if ctx.kept is not None:
                q, *ps = ctx.kept
                logits = ps.pop() if ctx.softcap else None
                ctx.kept = None  # freed as soon as this chunk is done
            else:  # recompute (the same ops as _terms)
                logits = fp32_logits(ctx.head(h), ctx.softcap)  # (m, V)
                q = (logits - torch.logsumexp(logits, -1)[:, None]).exp_()
                ps = [torch.log_softmax(x.to(q.dtype), -1).exp_() for x in tgts]
            grad = None
            for g, p in zip(g_kls, ps):
                if g is not None:
                    d = (q - p).mul_(g[:, None])  # (q - p) g, (m, V)
                    grad = d if grad is None else grad.add_(d)
            if g_logp is not None:
                gl = g_logp[:, None].to(q.dtype)
                grad = q.mul_(-gl) if grad is None else grad.addcmul_(q, gl, value=-1)
                grad.scatter_add_(-1, targets[:, None], gl)
            if ctx.softcap:  # logits = c tanh(raw / c): d logits / d raw = 1 - tanh^2
                grad.mul_(1 - (logits / ctx.softcap) ** 2)
        return (grad.to(ctx.raw_dtype), None, None, None, None, None, *([None] * ctx.n))


def _side_token_counts(batch: PairBatch) -> tuple[int, int]:
    B = batch.num_pairs
    nc = int(batch.response_lens[:B].sum())
    return nc, int(batch.response_lens.sum()) - nc


def _ranges(batch: PairBatch, chunk_size: int, max_counts: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Chunks of the flat response tokens that never straddle the chosen/rejected boundary.

    ``max_counts``: the (chosen, rejected) token counts of the largest micro-batch over ranks. Each side is
    then cut into exactly ceil(max / chunk_size) chunks on EVERY rank (sizes vary, some may be empty): under
    ZeRO-3 each output-head call gathers the head (and reduce-scatters its gradient in backward), so ranks
    with different chunk counts issue different collectives and hang (as engine.equal_chunk_size)."""
    nc, nr = _side_token_counts(batch)
    out = []
    for lo, m, mx in ((0, nc, None if max_counts is None else max_counts[0]),
                      (nc, nr, None if max_counts is None else max_counts[1])):
        k = -(-(m if mx is None else mx) // chunk_size)
        if k == 0:
            continue
        size = -(-m // k)
        out += [(lo + min(j * size, m), lo + min((j + 1) * size, m)) for j in range(k)]
    return out


class PriorLM(torch.nn.Module):
    """The HF causal LM behind one engine forward (ZeRO-3's bookkeeping hangs off the root module, as
    engine.PolicyLogps). The inner model is ``.model`` (export.gather_engine_state_dict unwraps it).

    forward(batch, getters) -> (logp (N,), entropy (N,), *kl (N,) one per getter), flat in
    ``batch.target_index`` order, fp32; kl_g = KL(target_g || zeta) per token.
    forward(batch, return_logits=True) -> ((N, V) logits,) (the frozen init of the kl_init anchor).
    With grad, ``fused=True`` differentiates the chunks through ``_HeadTerms`` (closed-form logits gradient:
    the marginal objective), else through autograd on checkpointed chunks (the joint objective: at the
    prior's init its kl_init anchor's gradient is 0 up to rounding, and Adam turns whatever the rounding
    gives into full-size steps, so that path keeps its exact rounding)."""

    def __init__(self, model: torch.nn.Module, chunk_size: int = 1024,
                 all_max: Callable[[list[int]], list[int]] | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        # the element-wise max of per-rank counts (runtime.dist.all_max under several ranks; identity alone),
        # injected so this module stays free of torch.distributed
        self.all_max = all_max

    @property
    def config(self):
        return self.model.config

    def forward(self, batch: PairBatch, getters: tuple = (), return_logits: bool = False, fused: bool = False) -> tuple:
        model = self.model
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        kw = batch.model_inputs(_attn_implementation(model), dtype=head.weight.dtype,
                                windows=attention_windows(model.config))
        hid = decoder(**kw, use_cache=False).last_hidden_state  # (R, T, H)
        h = hid.reshape(-1, hid.shape[-1]).index_select(0, batch.logit_index)  # (N, H)
        if return_logits:
            logits = head(h)
            return ((torch.tanh(logits / softcap) * softcap) if softcap else logits,)
        targets = batch.input_ids.reshape(-1).index_select(0, batch.target_index)  # (N,)
        parts = []
        counts = list(_side_token_counts(batch))
        ranges = _ranges(batch, self.chunk_size, tuple(self.all_max(counts) if self.all_max else counts))
        for i, (s, e) in enumerate(ranges):
            tgts = functools.partial(lambda s, e: tuple(get(s, e) for get in getters), s, e)  # (m, V) each
            if not (torch.is_grad_enabled() and h.requires_grad):
                parts.append(_chunk_terms(head, softcap, h[s:e], targets[s:e], tgts))
            elif fused:
                # one chunk of full-vocab fp32 values alive at a time; the head matmul is recomputed in backward
                hc, last = h[s:e], i == len(ranges) - 1
                parts.append(_HeadTerms.apply(head(hc), head, softcap, hc.detach(), targets[s:e], last, *tgts()))
            else:  # autograd through the chunk, recomputed in backward (activation checkpointing)
                parts.append(checkpoint(_chunk_terms, head, softcap, h[s:e], targets[s:e], tgts, use_reentrant=False))
        return tuple(torch.cat([p[i] for p in parts]) for i in range(2 + len(getters)))


# ---------------------------------------------------------------------------------------------
# objectives (pure functions of flat per-token tensors and the prior's batch)


def per_pair_sum(values: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """(N,) per-token values -> (B,) sum over both responses of each pair."""
    B = batch.num_pairs
    seq_sum = torch.zeros(2 * B, dtype=values.dtype, device=values.device).index_add(0, batch.response_seq, values)
    return seq_sum[:B] + seq_sum[B:]


def marginal_objective(kl_policy: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """mean over pairs of sum_t KL(sg pi || zeta) over both responses."""
    return per_pair_sum(kl_policy, batch).mean()


def joint_objective(policy: ResponseLogps, logp: torch.Tensor, batch: PairBatch, *, beta: float,
                    anchor: torch.Tensor, anchor_weight: float) -> torch.Tensor:
    """mean over pairs of MI-DPO loss w.r.t. zeta (policy detached) + anchor_weight * per-pair anchor sum.
    ``anchor``: (N,) per-token anchor (KL(init || zeta) or -log zeta(y_t))."""
    from midpo.core.losses import mi_dpo_loss

    z = ResponseLogps.from_flat(logp, batch)
    j = mi_dpo_loss(policy.detach(), z.chosen, z.rejected, beta=beta).losses  # (B,)
    return (j + anchor_weight * per_pair_sum(anchor, batch)).mean()
