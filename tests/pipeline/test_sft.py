"""The SFT warm start's helpers: warmup + cosine schedule, token-mean NLL on response tokens only."""

from __future__ import annotations

import pytest
import torch

from pipeline.sft import _lr_at, collate_sft, sft_loss


def test_lr_warms_up_then_decays_to_zero() -> None:
    assert _lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert _lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert _lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert _lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert _lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)


class _Oracle(torch.nn.Module):
    """Puts all mass on the next token of a fixed sequence: NLL ~ 0 wherever labels are scored."""

    def __init__(self, seq: list[int], vocab: int = 16) -> None:
        super().__init__()
        self.seq, self.vocab = seq, vocab

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        logits = torch.full((b, t, self.vocab), -1e4)
        for i in range(t - 1):
            logits[:, i, self.seq[i + 1]] = 1e4
        return type("Out", (), {"logits": logits})()


def test_sft_loss_scores_only_response_tokens() -> None:
    row = {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2]}
    ids, attn, labels = collate_sft([row], pad_id=3)
    assert sft_loss(_Oracle([1, 5, 6, 7, 2]), ids, attn, labels).item() == pytest.approx(0.0, abs=1e-3)
    # wrong only on the prompt: still ~0 (prompt masked); wrong on a response token: large
    assert sft_loss(_Oracle([1, 9, 9, 7, 2]), ids, attn, labels).item() == pytest.approx(0.0, abs=1e-3)
    assert sft_loss(_Oracle([1, 5, 6, 9, 2]), ids, attn, labels).item() > 100
