"""Sampling whose draws belong to a row, not to a batch: row r's token at step t is
argmax(logits / T + Gumbel noise), the noise drawn from a generator seeded by (row_seeds[r], t). The Gumbel-max
trick makes that an exact sample of softmax(logits / T); because no draw depends on the batch a row lands in,
a prompt's samples are the same on 1 or N processes, in any batch size or order (HF's own sampling draws one
multinomial for the whole batch from the global generator, so they are not).

    texts = generate_answers(..., row_seeds=[row_seed(seed, prompt_index, k) for ...])
"""

from __future__ import annotations

import hashlib

import torch


def row_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python runs, unlike hash())."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


class RowSeededGumbel:
    """A transformers logits processor for greedy `generate` (do_sample=False): adds each row's own Gumbel noise
    to its temperature-scaled scores, so the greedy pick is that row's sample. Rows are the generate batch's, in
    order; `row_seeds` has one seed per row."""

    def __init__(self, row_seeds: list[int], temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.row_seeds, self.temperature, self.step = list(row_seeds), float(temperature), 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.row_seeds):
            raise ValueError(f"{scores.shape[0]} rows in the batch but {len(self.row_seeds)} row seeds")
        noise = torch.stack([gumbel_noise(s, self.step, scores.shape[1]) for s in self.row_seeds])
        self.step += 1
        return scores.float() / self.temperature + noise.to(scores.device)


def gumbel_noise(seed: int, step: int, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise of one row at one step: -log(-log U), U uniform in (0, 1)."""
    g = torch.Generator().manual_seed(row_seed(seed, step) & (2**63 - 1))
    u = torch.rand(vocab, generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u))).float()
