"""Issue #23's per-answer measurements: the per-position KL against a loop over the vocabulary, answer log-probs
against transformers' own cross-entropy, and KL(pi || pi) = 0 / KL(pi || other) > 0 on the tiny default."""

from __future__ import annotations

import math

import pytest
import torch

from midpo.demo.measures import answer_ids, per_token, position_kl, reward_accuracy, score_answers


def test_position_kl_against_a_loop():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    for i in range(3):
        zp = sum(math.exp(v) for v in p[i].tolist())
        zq = sum(math.exp(v) for v in q[i].tolist())
        want = sum(math.exp(a) / zp * ((a - math.log(zp)) - (b - math.log(zq))) for a, b in zip(p[i].tolist(), q[i].tolist()))
        assert float(position_kl(p, q)[i]) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert torch.allclose(position_kl(p, p), torch.zeros(3, dtype=torch.float64))


@pytest.fixture(scope="module")
def models(tiny_default):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_default["model"]))
    pi = AutoModelForCausalLM.from_pretrained(str(tiny_default["model"])).eval()
    other = AutoModelForCausalLM.from_pretrained(str(tiny_default["model"])).eval()
    with torch.no_grad():
        for prm in other.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(1)))
    return tok, pi, other


def test_scores_against_transformers_cross_entropy(models):
    tok, pi, other = models
    prompts, answers = ["sort: 3 1 2", "reverse: fig kiwi"], ["1 2 3", "kiwi fig"]
    rows = score_answers(pi, tok, prompts, answers, reference=other, prior=pi, bos_id=tok.bos_token_id)
    for prompt, answer, row in zip(prompts, answers, rows):
        p_ids, r_ids = answer_ids(tok, prompt, answer)
        assert r_ids[-1] == tok.eos_token_id and row["tokens"] == len(r_ids)
        ids = torch.tensor([p_ids + r_ids])
        labels = ids.clone()
        labels[0, : len(p_ids)] = -100  # the prompt is not scored
        with torch.no_grad():
            for model, key in ((pi, "logp"), (other, "ref_logp")):
                mean_nll = float(model(input_ids=ids, labels=labels).loss)
                assert row[key] == pytest.approx(-mean_nll * len(r_ids), rel=1e-4)
        assert row["kl_ref"] > 0  # a perturbed model differs
        assert row["kl_prior"] > 0  # the "prior" sees [BOS] + answer, not the prompt: another context
    same = score_answers(pi, tok, prompts, answers, reference=pi)
    assert all(abs(r["kl_ref"]) < 1e-9 and r["logp"] == r["ref_logp"] for r in same)
    assert per_token(rows, "kl_ref") == pytest.approx(sum(r["kl_ref"] / r["tokens"] for r in rows) / 2)
    with pytest.raises(ValueError, match="bos_id"):
        score_answers(pi, tok, prompts, answers, prior=pi)


def test_reward_accuracy_counts_margins():
    c = [{"logp": -1.0, "ref_logp": -2.0}, {"logp": -5.0, "ref_logp": -2.0}, {"logp": -1.0, "ref_logp": -1.0}]
    r = [{"logp": -3.0, "ref_logp": -3.0}, {"logp": -1.0, "ref_logp": -2.0}, {"logp": -2.0, "ref_logp": -2.0}]
    # margins: +1 vs 0 (win), -3 vs +1 (loss), 0 vs 0 (tie: counted wrong)
    assert reward_accuracy(c, r) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        reward_accuracy(c, r[:2])
