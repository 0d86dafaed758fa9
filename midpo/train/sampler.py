"""Deterministic, resumable pair sampler shared by all ranks.

Every rank computes the same permutation of row indices per epoch (seeded by `(seed, epoch)`), so
no index lists travel between processes. One optimizer step consumes one *global batch* of
`micro * accum * world` rows; micro-step `k` of rank `r` takes slice `(k * world + r)` of it.
With that layout a 1-process run with accumulation A*W sees exactly the rows of a W-process run
with accumulation A, so their losses can be compared step for step.

The tail of an epoch that does not fill a global batch is dropped (every rank then runs the same
number of micro-steps and collectives); the dropped count is reported so it is visible in logs.
The state (`epoch`, `offset`, `seed`) goes into every checkpoint: resume continues mid-epoch at
the exact next row (OpenRLHF PR #1350: resume skipped samples when the epoch was not a multiple
of the global batch).

Token budget (`token_budget` > 0, train.micro_batch_tokens): a rank's rows of the step are the same
`micro * accum` rows, cut in order into micro-batches of at most `token_budget` tokens
(core.budget.fill_to_budget). Every rank computes every rank's cuts from the lengths (no
collective), and a rank with fewer micro-batches than the most splits its costliest ones in halves
until all have the same count: collectives stay in lockstep.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from midpo.core.budget import budget_cost, fill_to_budget


@dataclass
class SamplerState:
    epoch: int = 0
    offset: int = 0  # rows of this epoch's permutation already consumed
    seed: int = 0


class PairSampler:
    def __init__(self, num_rows: int, *, micro_batch_size: int, grad_accum: int, world_size: int, rank: int,
                 seed: int = 0, shuffle: bool = True, token_budget: int = 0,
                 lengths: list[tuple[int, int, int]] | None = None, layout: str = "padded"):
        if token_budget and (lengths is None or len(lengths) != num_rows):
            raise ValueError("a token budget needs the (prompt, chosen, rejected) lengths of every row")
        self.token_budget, self.lengths, self.layout = int(token_budget), lengths, layout
        self.num_rows = num_rows
        self.micro = micro_batch_size
        self.accum = grad_accum
        self.world = world_size
        self.rank = rank
        self.shuffle = shuffle
        self.global_batch = micro_batch_size * grad_accum * world_size
        if num_rows < self.global_batch:
            raise ValueError(
                f"the split has {num_rows} rows, fewer than one global batch "
                f"(micro {micro_batch_size} x accumulation {grad_accum} x world {world_size} = {self.global_batch}); "
                "lower train.micro_batch_size or train.grad_accum, or use fewer processes"
            )
        self.state = SamplerState(seed=seed)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        """Rows at the end of each epoch's permutation that no step uses (different rows every epoch)."""
        return self.num_rows % self.global_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.state.seed, epoch])
                self._perm = rng.permutation(self.num_rows)
            else:
                self._perm = np.arange(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def global_step_rows(self) -> np.ndarray:
        """All rows of the next optimizer step (every rank), without advancing."""
        st = self.state
        if st.offset + self.global_batch > self.num_rows:  # tail: move to the next epoch
            st.epoch, st.offset = st.epoch + 1, 0
        return self._permutation(st.epoch)[st.offset: st.offset + self.global_batch]

    def next_step(self) -> list[np.ndarray]:
        """This rank's micro-batches (row indices) for the next optimizer step; advances the state."""
        rows = self.global_step_rows()
        self.state.offset += self.global_batch
        mine = [self.rank_rows(rows, r) for r in range(self.world)] if self.token_budget else None
        if mine is None:
            return [rows[(k * self.world + self.rank) * self.micro: (k * self.world + self.rank + 1) * self.micro]
                    for k in range(self.accum)]
        cuts = [self._cut(r) for r in mine]
        steps = max(len(c) for c in cuts)
        return self._split_to(mine[self.rank], cuts[self.rank], steps)

    def rank_rows(self, rows: np.ndarray, rank: int) -> np.ndarray:
        """Rank `rank`'s rows of a global batch (the fixed-count micro-batches' rows, concatenated)."""
        return np.concatenate([rows[(k * self.world + rank) * self.micro: (k * self.world + rank + 1) * self.micro]
                               for k in range(self.accum)])

    def _cut(self, rows: np.ndarray) -> list[list[int]]:
        return fill_to_budget([self.lengths[int(i)] for i in rows], self.token_budget, self.layout)

    def _split_to(self, rows: np.ndarray, groups: list[list[int]], steps: int) -> list[np.ndarray]:
        """`groups` (positions into `rows`) split until there are `steps` of them: the costliest group of two or
        more pairs is halved, in place (order kept), deterministically."""
        groups = [list(g) for g in groups]
        while len(groups) < steps:
            splittable = [i for i, g in enumerate(groups) if len(g) > 1]
            i = max(splittable, key=lambda j: (budget_cost([self.lengths[int(rows[x])] for x in groups[j]],
                                                           self.layout), -j))
            g = groups[i]
            groups[i: i + 1] = [g[: len(g) // 2], g[len(g) // 2:]]
        return [rows[g] for g in groups]

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, d: dict) -> None:
        self.state = SamplerState(**{k: int(v) for k, v in d.items()})
        self._perm_epoch = -1
