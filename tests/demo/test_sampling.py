"""Row-seeded sampling (`demo.sampling`, used by `midpo iterate`'s rollout): an exact sample of softmax(logits/T)
per row, and a prompt's answers independent of the batch it shares (so 1 and N processes write the same)."""

from __future__ import annotations

import math

import pytest
import torch

from midpo.demo.sampling import RowSeededGumbel, row_seed


def test_greedy_over_row_noise_samples_the_softmax() -> None:
    """4000 rows over fixed logits: the argmax frequencies match softmax(logits / T), computed here by hand, within
    4 binomial standard deviations; T = 0.5 sharpens as it should."""
    logits = [2.0, 1.0, 0.5, -1.0, 0.0]
    n = 4000
    for temp in (1.0, 0.5):
        proc = RowSeededGumbel([row_seed("t", i) for i in range(n)], temperature=temp)
        picks = proc(None, torch.tensor([logits] * n)).argmax(-1)
        z = sum(math.exp(x / temp) for x in logits)
        for v, x in enumerate(logits):
            p = math.exp(x / temp) / z
            freq = (picks == v).float().mean().item()
            assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n), (temp, v, freq, p)


def test_a_rows_draws_follow_its_seed_not_its_batch() -> None:
    seeds = [row_seed("x", i) for i in range(6)]
    scores = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    full = RowSeededGumbel(seeds)(None, scores)
    part = RowSeededGumbel(seeds[3:5])(None, scores[3:5])
    torch.testing.assert_close(part, full[3:5], rtol=0, atol=0)
    again = RowSeededGumbel(seeds)
    again(None, scores)  # step 0
    assert not torch.equal(again(None, scores), full)  # step 1 draws fresh noise
    with pytest.raises(ValueError, match="3 rows in the batch but 6 row seeds"):
        RowSeededGumbel(seeds)(None, scores[:3])


def test_answers_are_the_same_in_any_batch(tiny_default) -> None:
    """A tiny random model samples 6 prompts x 3 answers in one batch, and again in reversed order and batches of
    4: each (prompt, k) answer is the same; answers to one prompt differ (it samples, not decodes greedily)."""
    from midpo.config import ModelConfig
    from midpo.demo.evaluate import generate_answers
    from midpo.runtime.models import load_model, load_tokenizer

    model = load_model(tiny_default["model"], ModelConfig())
    tok = load_tokenizer(tiny_default["model"])
    prompts = [f"sort: {i} {7 - i} {i * 3}" for i in range(6)]
    flat = [(i, k) for i in range(6) for k in range(3)]
    seeds = {ik: row_seed(0, "r1", *ik) for ik in flat}
    one = generate_answers(model, tok, [prompts[i] for i, _ in flat], max_new_tokens=8, batch_size=18,
                           do_sample=True, row_seeds=[seeds[ik] for ik in flat])
    rev = flat[::-1]
    other = generate_answers(model, tok, [prompts[i] for i, _ in rev], max_new_tokens=8, batch_size=4,
                             do_sample=True, row_seeds=[seeds[ik] for ik in rev])
    assert dict(zip(flat, one, strict=True)) == dict(zip(rev, other, strict=True))
    assert len(set(one)) > 6
