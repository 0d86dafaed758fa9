"""The generalized loss itself (midpo.core.losses.mi_dpo_loss), against formulas written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import batch

from midpo.core.logprobs import ResponseLogps
from midpo.core.losses import METRIC_NAMES, implicit_reward_loss, mi_dpo_loss, reduce_metrics


def test_plain_and_cdpo_label_smoothing():
    """m = b[(S pi_w - S z_w) - (S pi_l - S z_l)];  eps = 0: -logsig(m);
    cDPO: -(1 - eps) logsig(m) - eps logsig(-m). Values and gradients."""
    pol, zc, zr = batch()
    m = 0.3 * (((pol.chosen - zc) * pol.chosen_mask).sum(-1) - ((pol.rejected - zr) * pol.rejected_mask).sum(-1))
    for eps in (0.0, 0.2):
        out = mi_dpo_loss(pol, zc, zr, beta=0.3, label_smoothing=eps)
        want = -(1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)
        torch.testing.assert_close(out.losses, want, rtol=0, atol=1e-12)
        ga = torch.autograd.grad(out.losses.sum(), [pol.chosen, pol.rejected], retain_graph=True)
        gb = torch.autograd.grad(want.sum(), [pol.chosen, pol.rejected], retain_graph=True)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.margins, m.detach())
    torch.testing.assert_close(out.chosen_rewards - out.rejected_rewards, out.margins)
    with pytest.raises(ValueError):
        mi_dpo_loss(pol, zc, zr, beta=0.3, label_smoothing=0.5)


def test_per_token_and_per_sequence_prior_agree_and_padding_is_ignored():
    pol, zc, zr = batch(1)
    a = mi_dpo_loss(pol, zc, zr, beta=0.1).losses
    b = mi_dpo_loss(pol, (zc * pol.chosen_mask).sum(-1), (zr * pol.rejected_mask).sum(-1), beta=0.1).losses
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    junk = torch.where(pol.chosen_mask, zc, torch.full_like(zc, 123.0))  # garbage on padding
    torch.testing.assert_close(mi_dpo_loss(pol, junk, zr, beta=0.1).losses, a, rtol=0, atol=1e-12)


def test_policy_equal_prior_gives_ln2_and_sft_term():
    pol, _, _ = batch(2)
    out = mi_dpo_loss(pol, pol.chosen.detach(), pol.rejected.detach(), beta=0.1, sft_weight=0.5)
    nll = -(pol.chosen * pol.chosen_mask).sum(-1) / pol.chosen_mask.sum(-1)
    torch.testing.assert_close(out.losses, math.log(2.0) + 0.5 * nll, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.extra["sft"], 0.5 * nll.detach())


def test_fp32_math_for_low_precision_inputs():
    pol, zc, zr = batch(3)
    half = ResponseLogps(
        pol.chosen.detach().bfloat16(), pol.chosen_mask, pol.rejected.detach().bfloat16(), pol.rejected_mask
    )
    assert mi_dpo_loss(half, zc.bfloat16(), zr.bfloat16(), beta=0.1).losses.dtype == torch.float32


def test_metrics_are_sums_with_counts_and_reduce_exactly():
    """Two micro-batches of sizes 3 and 2 reduce to the mean over all 5 pairs (not a mean of means)."""
    p1, z1c, z1r = batch(4)
    p2, z2c, z2r = batch(5, lens_c=(2, 5), lens_r=(1, 3))
    o1, o2 = mi_dpo_loss(p1, z1c, z1r, beta=0.1), mi_dpo_loss(p2, z2c, z2r, beta=0.1)
    m1 = o1.metrics()
    assert set(METRIC_NAMES) <= set(m1)
    torch.testing.assert_close(
        m1["rewards/chosen"], torch.tensor([float(o1.chosen_rewards.sum()), 3.0], dtype=torch.float64)
    )
    red = reduce_metrics([m1, o2.metrics()])
    cat = lambda f: torch.cat([f(o1), f(o2)])  # noqa: E731
    assert red["loss"] == pytest.approx(float(cat(lambda o: o.losses.detach()).mean()), abs=1e-12)
    assert red["rewards/margins"] == pytest.approx(float(cat(lambda o: o.margins).mean()), abs=1e-12)
    acc = (cat(lambda o: o.chosen_rewards) > cat(lambda o: o.rejected_rewards)).double().mean()
    assert red["rewards/accuracies"] == pytest.approx(float(acc), abs=1e-12)
    assert red["logps/rejected"] == pytest.approx(float(cat(lambda o: o.policy_rejected_logps).mean()), abs=1e-12)


def test_log_ratio_form_and_constant_part_of_log_zeta():
    """implicit_reward_loss(pi - z) == mi_dpo_loss(z); a per-side constant k of log zeta shifts the sigmoid's
    argument by -b (k_w - k_l) and leaves the rewards, margins and accuracies alone:
    loss = -logsig(b[(S pi_w - S z_w) - (S pi_l - S z_l)] - b (k_w - k_l))."""
    pol, zc, zr = batch(6)
    a = mi_dpo_loss(pol, zc, zr, beta=0.3)
    b = implicit_reward_loss(pol, pol.chosen - zc, pol.rejected - zr, beta=0.3)
    torch.testing.assert_close(b.losses, a.losses, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.chosen_rewards, a.chosen_rewards, rtol=0, atol=1e-12)
    k = (0.7, 0.2)
    for out in (mi_dpo_loss(pol, zc, zr, beta=0.3, log_prior_const=k),
                implicit_reward_loss(pol, pol.chosen - zc, pol.rejected - zr, beta=0.3, log_prior_const=k)):
        torch.testing.assert_close(out.losses, -F.logsigmoid(a.margins - 0.3 * 0.5), rtol=0, atol=1e-12)
        torch.testing.assert_close(out.margins, a.margins, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.chosen_rewards, a.chosen_rewards, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.rejected_rewards, a.rejected_rewards, rtol=0, atol=1e-12)
