"""Collate preference pairs into one forward: chosen and rejected of a pair always share a batch.

Three layouts, same sequence order (sequence s = chosen of pair s for s < B, rejected of pair s - B
for s >= B):

- ``padded``: 2B rows, right padding, a 2-D ``attention_mask`` (2B, T).
- ``packed``: all 2B sequences concatenated into ONE row (1, T), ``position_ids`` restarting at 0
  per sequence, ``seq_lens``/``cu_seqlens``. On CUDA with ``flash_attention_2`` transformers
  splits the row from the position_ids alone; with ``sdpa`` (CPU) that does NOT isolate the
  sequences (docs/environment.md), so :meth:`PairBatch.model_inputs` builds a 4-D block-diagonal
  causal mask on demand (bool for sdpa, additive float for eager).

- ``shared``: one row per pair, ``prompt + chosen + rejected``, the prompt computed ONCE for both
  responses (prefix sharing): the rejected tokens' ``position_ids`` continue from the prompt's end
  and a 4-D mask keeps them from seeing the chosen tokens, so every response token sees exactly
  what it sees in its own sequence. Saves the second prompt forward (2P+C+R -> P+C+R tokens per
  pair); needs a dense mask (sdpa/eager), so not for flash-attn.

Response tokens are located by flat index tensors into ``input_ids.view(-1)``, so extracting
per-token log-probs is one gather, never a Python loop over tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

LAYOUTS = ("packed", "padded", "shared")
# Packed row length when attention needs a dense block mask (sdpa/eager): long enough that padding
# stays small, short enough that the quadratic mask/attention cost stays small next to the MLPs.
DENSE_MASK_ROW_TOKENS = 512


def row_tokens_for(model) -> int | None:
    """The packed-row budget for `model` (an HF model or a DeepSpeed engine wrapping one): one row
    under flash-attn (varlen kernels, no mask), DENSE_MASK_ROW_TOKENS otherwise."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "model", inner) if not hasattr(inner, "config") else inner
    attn = getattr(getattr(inner, "config", None), "_attn_implementation", None) or ""
    return None if "flash" in attn else DENSE_MASK_ROW_TOKENS


@dataclass
class PairBatch:
    layout: str  # "packed" | "padded" | "shared"
    input_ids: torch.Tensor  # (R, T) long; R = 2B padded, 1 packed (or more with max_row_tokens), B shared
    position_ids: torch.Tensor  # (R, T) long; restarts at 0 for every sequence (shared: rejected continue the prompt)
    attention_mask: torch.Tensor | None  # (2B, T) long, padded only; None when packed
    seq_lens: torch.Tensor  # (2B,) long, prompt + response tokens of each sequence
    cu_seqlens: (
        torch.Tensor | None
    )  # (2B+1,) int32 start offsets in the packed row (tail padding after [-1]); None padded
    prompt_lens: torch.Tensor  # (2B,) long
    response_lens: torch.Tensor  # (2B,) long, EOS included
    target_index: (
        torch.Tensor
    )  # (N,) long, flat index into input_ids.view(-1) of each response token, N = sum(response_lens)
    response_seq: torch.Tensor  # (N,) long, sequence s of each response token (sorted by s, then t)
    response_pos: torch.Tensor  # (N,) long, position t of the token inside its response (0 = first)
    num_pairs: int
    num_tokens: int  # real tokens in input_ids (prompt + response, both sides; shared: the prompt once), no padding
    num_pad_tokens: int  # padding tokens in input_ids; padding fraction = num_pad_tokens / input_ids.numel()
    # (N,) explicit predicting positions where "one to the left" is wrong (shared: the first rejected token is
    # predicted by the prompt's last token, not by the chosen response's EOS); None = target_index - 1
    predict_index: torch.Tensor | None = None

    @property
    def logit_index(self) -> torch.Tensor:
        """(N,) flat index of the position whose output predicts each response token (one to the left;
        always inside the same sequence because prompts are non-empty; shared layout: see predict_index)."""
        return self.target_index - 1 if self.predict_index is None else self.predict_index

    @property
    def attention_context(self) -> float:
        """Sum over real tokens of how many tokens each attends to (itself included): the causal attention
        work of this batch, layout-independent except for the shared layout's prompt (attended once, and
        each response sees it plus its own earlier tokens). Model FLOPs of the QK^T and AV matmuls =
        4 * hidden * layers * this, forward only."""
        def tri(n: torch.Tensor) -> torch.Tensor:
            return n * (n + 1) // 2

        if self.layout != "shared":
            return float(tri(self.seq_lens).sum())
        B = self.num_pairs
        p, c, r = self.prompt_lens[:B], self.response_lens[:B], self.response_lens[B:]
        return float((tri(p) + (c + r) * p + tri(c) + tri(r)).sum())

    @property
    def segment_ids(self) -> torch.Tensor:
        """(R, T) long: sequence id of every token; padding gets id 2B (its own block)."""
        n_seq = self.seq_lens.numel()
        if self.layout == "packed":
            seg = torch.full(self.input_ids.shape, n_seq, dtype=torch.long, device=self.input_ids.device)
            flat = seg.view(-1)
            # token k of sequence s sits at flat index start_s + k; start_s = target_index of its first
            # response token minus its prompt length (every sequence has >= 1 response token)
            first = torch.cumsum(self.response_lens, 0) - self.response_lens  # (2B,) index into target_index
            starts = self.target_index[first] - self.prompt_lens  # (2B,)
            seq_of_tok = torch.repeat_interleave(torch.arange(n_seq, device=seg.device), self.seq_lens)
            tok_starts = torch.repeat_interleave(starts, self.seq_lens)
            k = torch.arange(int(self.seq_lens.sum()), device=seg.device) - torch.repeat_interleave(
                torch.cumsum(self.seq_lens, 0) - self.seq_lens, self.seq_lens)
            flat[tok_starts + k] = seq_of_tok
            return seg  # (R, T)
        rows = torch.arange(n_seq, device=self.input_ids.device)[:, None].expand_as(self.input_ids)
        return torch.where(self.attention_mask.bool(), rows, n_seq)  # (2B, T)

    @property
    def token_mask(self) -> torch.Tensor:
        """(R, T) bool: the slots of real tokens (False: padding), in every layout."""
        if self.layout == "packed":
            return self.segment_ids < self.seq_lens.numel()
        if self.layout == "padded":
            return self.attention_mask.bool()
        B = self.num_pairs
        row_lens = self.prompt_lens[:B] + self.response_lens[:B] + self.response_lens[B:]  # (B,)
        return torch.arange(self.input_ids.shape[1], device=row_lens.device)[None, :] < row_lens[:, None]

    def _within(self, window: int | None) -> torch.Tensor | bool:
        """(R, T, T) bool: key k is less than `window` positions behind query q (HF's sliding window: a token sees
        itself and the window - 1 before it); True without a window. Positions, not slots: in the shared layout
        the rejected response continues from the prompt's end."""
        if not window:
            return True
        pos = self.position_ids
        return (pos[:, :, None] - pos[:, None, :]) < int(window)

    def block_causal_mask(self, dtype: torch.dtype = torch.bool, window: int | None = None) -> torch.Tensor:
        """(R, 1, T, T) block-diagonal causal mask of the packed rows. bool: True = may attend (sdpa);
        a float dtype gives the additive form 0 / finfo.min (eager ignores bool 4-D masks). window: sliding
        window attention (a token sees at most `window` tokens: itself and the ones before it)."""
        if self.layout != "packed":
            raise ValueError("block_causal_mask is only defined for the packed layout")
        seg = self.segment_ids  # (R, T)
        T = seg.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
        return _mask_form((seg[:, :, None] == seg[:, None, :]) & causal & self._within(window), dtype)  # (R, 1, T, T)

    def shared_prompt_mask(self, dtype: torch.dtype = torch.bool, window: int | None = None) -> torch.Tensor:
        """(B, 1, T, T) mask of the shared layout: causal, and a token sees the prompt plus its own part
        (prompt / chosen / rejected / padding): the rejected response never sees the chosen one. window: as in
        `block_causal_mask`, counted in positions."""
        if self.layout != "shared":
            raise ValueError("shared_prompt_mask is only defined for the shared layout")
        B, T = self.input_ids.shape
        p, c, r = self.prompt_lens[:B], self.response_lens[:B], self.response_lens[B:]
        j = torch.arange(T, device=self.input_ids.device)[None, :]
        # part of every slot: 0 prompt, 1 chosen, 2 rejected, 3 padding
        part = (j >= p[:, None]).long() + (j >= (p + c)[:, None]).long() + (j >= (p + c + r)[:, None]).long()
        causal = torch.ones(T, T, dtype=torch.bool, device=part.device).tril()
        allowed = causal & ((part[:, :, None] == part[:, None, :])
                            | ((part[:, None, :] == 0) & (part[:, :, None] != 3)))  # (B, T, T)
        return _mask_form(allowed & self._within(window), dtype)  # (B, 1, T, T)

    @property
    def causal_rows(self) -> bool:
        """Every row holds one sequence from column 0 (then padding): its mask is plain causal (padding keys come
        after every real query). Packed rows holding one sequence each, or the padded layout."""
        if self.layout == "padded":
            return True
        return self.layout == "packed" and self.seq_lens.numel() == self.input_ids.shape[0]

    def dense_mask(self, dtype: torch.dtype = torch.bool, window: int | None = None) -> torch.Tensor:
        """(R, 1, T, T) 4-D mask of any layout: packed and shared as above; padded: causal and the key a real token
        (what transformers derives from the 2-D mask). Sequence parallelism passes it whole to attention."""
        if self.layout == "packed":
            return self.block_causal_mask(dtype, window)
        if self.layout == "shared":
            return self.shared_prompt_mask(dtype, window)
        T = self.input_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.input_ids.device).tril()
        return _mask_form(causal & self.token_mask[:, None, :] & self._within(window), dtype)

    def model_inputs(self, attn_implementation: str | None = "sdpa", dtype: torch.dtype = torch.float32,
                     windows: dict[str, int | None] | None = None, dense: bool = False) -> dict:
        """Keyword arguments for a transformers decoder forward with the right mask for this layout.

        packed + flash_attention_2*: position_ids only (transformers derives cu_seqlens from them);
        packed + sdpa/other: bool block mask; packed + eager: additive mask in the model dtype.
        shared: its 4-D mask (bool for sdpa, additive for eager); flash-attn cannot express it.
        windows: layer type -> sliding window (None: full attention), see `core.logprobs.attention_windows`.
        transformers uses a given 4-D mask as it is, so the windows are built into it here; with several layer
        types (Gemma 2's alternating layers) the mask is a dict of one mask per type, as the models take it.
        dense: a 4-D mask in every layout, padded included (sequence parallelism: core.seqpar), or none when every
        row is one causal sequence without a sliding window (`causal_rows`: no T x T mask in memory; the attention
        is then causal over the whole row, runtime.seqpar); not for flash-attn."""
        kw = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if dense:
            if attn_implementation and "flash" in attn_implementation:
                raise ValueError("sequence parallelism here passes a dense 4-D mask to attention, which flash-attn "
                                 "cannot take: use attn_implementation sdpa or eager")
            if self.causal_rows and not any((windows or {}).values()):
                return kw  # plain causal attention: no T x T mask at all (attention_mask None = causal)
            form = dtype if attn_implementation == "eager" else torch.bool
            masks = {kind: self.dense_mask(form, window=w) for kind, w in (windows or {"full_attention": None}).items()}
            kw["attention_mask"] = masks if len(masks) > 1 else next(iter(masks.values()))
        elif self.layout == "padded":
            kw["attention_mask"] = self.attention_mask
        elif attn_implementation and "flash" in attn_implementation:
            if self.layout == "shared":
                raise ValueError("the shared-prompt layout needs a dense 4-D mask, which flash-attn cannot take: "
                                 "use attn_implementation sdpa, or the packed layout (train.layout=packed)")
        else:
            mask = self.shared_prompt_mask if self.layout == "shared" else self.block_causal_mask
            form = dtype if attn_implementation == "eager" else torch.bool
            windows = windows or {"full_attention": None}
            masks = {kind: mask(form, window=w) for kind, w in windows.items()}
            kw["attention_mask"] = masks if len(masks) > 1 else next(iter(masks.values()))
        return kw

    def to(self, device: torch.device | str) -> PairBatch:
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in dataclasses.fields(self)
        }
        return PairBatch(**moved)


def _mask_form(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, T, T) bool "may attend" -> (R, 1, T, T): bool for sdpa, or the additive form 0 / finfo.min of a
    float dtype (eager ignores bool 4-D masks)."""
    if dtype == torch.bool:
        return allowed[:, None]
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def collate_pairs(
    rows: list[dict],
    *,
    layout: str = "packed",
    pad_id: int,
    pad_to_multiple: int = 1,
    max_row_tokens: int | None = None,
) -> PairBatch:
    """Rows with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of int; responses end in EOS)
    -> one :class:`PairBatch` holding 2B sequences (prompt+chosen, then prompt+rejected).

    ``max_row_tokens`` (packed only): fill rows of at most this many tokens (at least the longest
    sequence) in sequence order instead of one row. With a dense block mask (sdpa/eager on CPU)
    attention costs grow with the square of the row length, so a micro-batch of 2000 tokens in one
    row pays ~16x the attention of 125-token rows; flash-attn has no such cost (use None)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not rows:
        raise ValueError("collate_pairs needs at least one row")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    for i, r in enumerate(rows):
        # An empty prompt leaves the first response token without a predicting position.
        if not r["prompt_ids"]:
            raise ValueError(f"row {i}: empty prompt_ids (at least one prompt token, e.g. BOS, is required)")
        if not r["chosen_ids"] or not r["rejected_ids"]:
            raise ValueError(f"row {i}: empty chosen_ids or rejected_ids (responses end in EOS)")

    B = len(rows)
    seqs = [list(r["prompt_ids"]) + list(r["chosen_ids"]) for r in rows]
    seqs += [list(r["prompt_ids"]) + list(r["rejected_ids"]) for r in rows]
    prompt_lens = torch.tensor([len(r["prompt_ids"]) for r in rows] * 2, dtype=torch.long)  # (2B,)
    response_lens = torch.tensor(
        [len(r["chosen_ids"]) for r in rows] + [len(r["rejected_ids"]) for r in rows], dtype=torch.long
    )  # (2B,)
    seq_lens = prompt_lens + response_lens  # (2B,)
    n_seq = 2 * B
    num_tokens = int(seq_lens.sum())

    def round_up(n: int) -> int:
        return -(-n // pad_to_multiple) * pad_to_multiple

    # Token t of sequence s's response: n-th response token overall -> (s, t).
    response_seq = torch.repeat_interleave(torch.arange(n_seq), response_lens)  # (N,)
    resp_starts = torch.cumsum(response_lens, 0) - response_lens  # (2B,)
    response_pos = torch.arange(int(response_lens.sum())) - resp_starts[response_seq]  # (N,)
    predict_index = None  # "one to the left" (PairBatch.logit_index), except in the shared layout

    if layout == "packed":
        # Assign sequences to rows in order (next-fit): row_of[s], offset[s] inside that row.
        cap = num_tokens if not max_row_tokens else max(int(max_row_tokens), int(seq_lens.max()))
        row_of, offset, fill = [], [], [0]
        for n in seq_lens.tolist():
            if fill[-1] + n > cap:
                fill.append(0)
            row_of.append(len(fill) - 1)
            offset.append(fill[-1])
            fill[-1] += n
        R, T = len(fill), round_up(max(fill))
        input_ids = torch.full((R, T), pad_id, dtype=torch.long)
        position_ids = torch.arange(T).repeat(R, 1)  # tail padding counts from 0: its own "sequence" for flash-attn
        for s_, seq in enumerate(seqs):
            r, o = row_of[s_], offset[s_]
            input_ids[r, o : o + len(seq)] = torch.tensor(seq, dtype=torch.long)
            position_ids[r, o : o + len(seq)] = torch.arange(len(seq))
        for r, f in enumerate(fill):
            position_ids[r, f:] = torch.arange(T - f)
        starts = torch.tensor(row_of, dtype=torch.long) * T + torch.tensor(offset, dtype=torch.long)  # (2B,) flat
        cu_seqlens = (
            torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(seq_lens, 0)]).to(torch.int32) if R == 1 else None
        )
        target_index = starts[response_seq] + prompt_lens[response_seq] + response_pos  # (N,)
        attention_mask = None
    elif layout == "shared":
        # row b: prompt, chosen, rejected; the rejected positions continue from the prompt's end
        pl, cl, rl = prompt_lens[:B], response_lens[:B], response_lens[B:]
        row_lens = pl + cl + rl
        T = round_up(int(row_lens.max()))
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        for b, r in enumerate(rows):
            P, C, R = int(pl[b]), int(cl[b]), int(rl[b])
            input_ids[b, : P + C + R] = torch.tensor(list(r["prompt_ids"]) + list(r["chosen_ids"])
                                                     + list(r["rejected_ids"]), dtype=torch.long)
            position_ids[b, : P + C] = torch.arange(P + C)
            position_ids[b, P + C : P + C + R] = torch.arange(P, P + R)
        pair = response_seq % B  # (N,)
        rejected = response_seq >= B
        target_index = pair * T + pl[pair] + rejected * cl[pair] + response_pos  # (N,)
        # the first rejected token is predicted by the prompt's last token (shared), every other one by its left
        # neighbour in the same part
        predict_index = torch.where(rejected & (response_pos == 0), pair * T + pl[pair] - 1, target_index - 1)
        num_tokens = int(row_lens.sum())  # the prompt once per pair: what the forward really computes
        attention_mask, cu_seqlens = None, None
    else:
        T = round_up(int(seq_lens.max()))
        input_ids = torch.full((n_seq, T), pad_id, dtype=torch.long)
        for s, seq in enumerate(seqs):
            input_ids[s, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask = (torch.arange(T)[None, :] < seq_lens[:, None]).long()  # (2B, T)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (2B, T)
        cu_seqlens = None
        target_index = response_seq * T + prompt_lens[response_seq] + response_pos  # (N,)

    return PairBatch(
        layout=layout,
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        seq_lens=seq_lens,
        cu_seqlens=cu_seqlens,
        prompt_lens=prompt_lens,
        response_lens=response_lens,
        target_index=target_index,
        response_seq=response_seq,
        response_pos=response_pos,
        num_pairs=B,
        num_tokens=num_tokens,
        num_pad_tokens=input_ids.numel() - num_tokens,
        predict_index=predict_index,
    )
