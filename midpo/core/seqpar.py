"""Ulysses sequence parallelism, the pure part: which positions a rank of a sequence-parallel (SP) group holds,
and where each response token's log-prob is computed.

A group of `size` ranks holds the SAME PairBatch (token ids, masks, index tensors: small). Rank r runs the decoder
on columns [r T/size, (r+1) T/size) of every row (T padded to a multiple of size by the collate); around attention
an all-to-all (runtime.seqpar) turns the sequence slice of all heads into all positions of a slice of the heads, so
attention sees the whole row with the same 4-D mask as without SP. Targets are read from the WHOLE input_ids
(shift before split: the target of a shard's last position is the next shard's first token), so a rank scores
exactly the response tokens whose predicting position it holds, and the per-token values are gathered over the
group in batch order (`SeqShard.gather`, injected: this module has no torch.distributed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqShard:
    """This rank's place in its SP group, and the group's gather (runtime.seqpar.group_gather): local values
    (n_rank, *rest) + every rank's count -> (sum of counts, *rest) in rank order; its backward returns the slice
    of this rank (every rank of a group computes the same loss from the same gathered values)."""

    rank: int
    size: int
    gather: Callable[[torch.Tensor, list[int]], torch.Tensor]


def shard_width(T: int, size: int) -> int:
    """Columns per rank of a row of T columns; T must be a multiple of size (collate_pairs' pad_to_multiple)."""
    if T % size:
        raise ValueError(f"a row of {T} columns cannot be split over {size} sequence-parallel ranks: collate with "
                         f"pad_to_multiple={size}")
    return T // size


def shard_inputs(kw: dict, shard: SeqShard) -> dict:
    """Decoder keyword arguments (PairBatch.model_inputs(dense=True)) -> this rank's: input_ids and position_ids
    cut to its columns; the 4-D mask(s) stay whole (attention runs on every position after the all-to-all)."""
    T = kw["input_ids"].shape[1]
    w = shard_width(T, shard.size)
    cols = slice(shard.rank * w, (shard.rank + 1) * w)
    out = dict(kw)
    out["input_ids"] = kw["input_ids"][:, cols]
    out["position_ids"] = kw["position_ids"][:, cols]
    return out


def owners(flat_index: torch.Tensor, T: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into (R, T) -> (the rank holding each, its flat index into that rank's (R, T/size) slice)."""
    w = shard_width(T, size)
    row, col = flat_index // T, flat_index % T
    owner = col // w
    return owner, row * w + col - owner * w


def local_count(logit_index: torch.Tensor, T: int, shard: SeqShard) -> int:
    """How many response tokens this rank scores (its predicting positions)."""
    owner, _ = owners(logit_index, T, shard.size)
    return int((owner == shard.rank).sum())


def spans(n: int, calls: int) -> list[tuple[int, int]]:
    """`n` positions cut into exactly `calls` contiguous spans of near-equal size (some may be empty): under ZeRO-3
    every rank must call the output head the same number of times even when its shard holds no response token."""
    calls = max(1, int(calls))
    bounds = [n * i // calls for i in range(calls + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def gather_in_order(local: torch.Tensor, owner: torch.Tensor, shard: SeqShard) -> torch.Tensor:
    """This rank's values (its positions, ascending) -> every position's value in the original order, through the
    group's gather (autograd: the gradient of the whole reaches this rank's slice)."""
    counts = torch.bincount(owner, minlength=shard.size).tolist()
    flat = shard.gather(local, counts)  # rank-major, ascending index within a rank
    order = torch.argsort(owner, stable=True)  # position -> its slot in `flat` is argsort(order)
    return flat.index_select(0, torch.argsort(order))
