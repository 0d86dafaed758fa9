"""Each prior + the generalized loss == the ORIGINAL loss, written here from docs/algorithms.md.

The generalized loss is  -logsig(b * [(S_pi(w) - S_zeta(w)) - (S_pi(l) - S_zeta(l))]),
S_x(y) = sum_t x_t(y) over the response mask. Substituting each prior:

  dpo/dice  zeta = ref                           -> b*(lr_w - lr_l)
  centropy  zeta = (1-c) pi + ref                -> b*[(c S_pi(w) - S_ref(w)) - (c S_pi(l) - S_ref(l))]
  simpo     zeta = (1-1/|y|) S_pi + g/b [y=w]    -> b S_pi(w)/|w| - g - b S_pi(l)/|l|
  lndpo     zeta = (1-1/|y|) S_pi + S_ref/|y|    -> b*(lr_w/|w| - lr_l/|l|)
  rdpo      zeta = ref - (r/b)|y|                -> b*(lr_w - lr_l) + r(|w| - |l|)
  tdpo1     zeta = ref - KL                      -> b*(lr_w - lr_l + KL_w - KL_l)
  tdpo2     zeta_w = ref - k sg(KL_w), zeta_l = ref - k KL_l -> b*(lr_w - lr_l + k(sg KL_w - KL_l))
  tisdpo    zeta = sum (1-w) pi + w ref          -> b*(sum w lr (w) - sum w lr (l))
  sparsepo  zeta = pi - m_u lr + m_d tokKL       -> b*(u - d) (+ L1)

Random float64 inputs with uneven lengths; values AND gradients (policy logits, policy per-token
log-probs, SparsePO mask-network parameters) agree to 1e-9.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from midpo.config import LossConfig
from midpo.core.logprobs import ResponseLogps, topk_logprobs
from midpo.core.priors import (
    PRIOR_NAMES,
    PRIORS,
    PriorInputs,
    SidePair,
    SparsePOPrior,
    TopK,
    build_prior,
    check_needs,
    compute_loss,
)

B, LC, LR, V, NL, H = 4, 7, 5, 11, 3, 8
LENS_C = torch.tensor([7, 3, 5, 1])
LENS_R = torch.tensor([2, 5, 4, 5])
REPO = Path(__file__).resolve().parents[2]


def logsig(x):
    return F.logsigmoid(x)


def make(seed: int = 0, *, same: bool = False, lens_c=LENS_C, lens_r=LENS_R):
    g = torch.Generator().manual_seed(seed)
    d = {}
    for side, L, lens in (("c", LC, lens_c), ("r", LR, lens_r)):
        d[f"mask_{side}"] = torch.arange(L)[None, :] < lens[:, None]  # (B, L)
        d[f"pl_{side}"] = torch.randn(B, L, V, generator=g, dtype=torch.float64).requires_grad_()
        d[f"rl_{side}"] = (
            d[f"pl_{side}"].detach().clone() if same else torch.randn(B, L, V, generator=g, dtype=torch.float64)
        )
        d[f"tgt_{side}"] = torch.randint(0, V, (B, L), generator=g)
        d[f"hid_{side}"] = torch.randn(B, L, NL, H, generator=g, dtype=torch.float64)
        d[f"w_{side}"] = 0.7 + 0.6 * torch.rand(B, L, generator=g, dtype=torch.float64)
        # Per-token log-probs written directly: log_softmax + gather, 0 on padding.
        for who in ("p", "r"):
            lg = d[f"{who}l_{side}"]
            tok = torch.log_softmax(lg, -1).gather(-1, d[f"tgt_{side}"][..., None])[..., 0]
            d[f"{who}t_{side}"] = torch.where(d[f"mask_{side}"], tok, torch.zeros_like(tok))
    return d


def inputs_of(d, with_weights=True) -> PriorInputs:
    pol = ResponseLogps(
        d["pt_c"], d["mask_c"], d["pt_r"], d["mask_r"], chosen_logits=d["pl_c"], rejected_logits=d["pl_r"]
    )
    ref = ResponseLogps(
        d["rt_c"].detach(),
        d["mask_c"],
        d["rt_r"].detach(),
        d["mask_r"],
        chosen_logits=d["rl_c"],
        rejected_logits=d["rl_r"],
        chosen_hidden=d["hid_c"],
        rejected_hidden=d["hid_r"],
    )
    tw = SidePair(d["w_c"], d["w_r"]) if with_weights else None
    return PriorInputs(policy=pol, ref=ref, token_weights=tw)


def S(x, m):
    return (x * m).sum(-1)


def kl_ref_pol(ref_logits, pol_logits, mask):
    """Naive KL_t(pi_ref || pi_theta) summed over the response: sum_t sum_v p_ref (log p_ref - log p_theta)."""
    lp, lq = torch.log_softmax(ref_logits, -1), torch.log_softmax(pol_logits, -1)
    return ((lp.exp() * (lp - lq)).sum(-1) * mask).sum(-1)


def mask_net_ref(prior_net, hid):
    """SparsePO's mask from the network's parameters, written out: LN, per-layer head, ReLU, mixer, ReLU."""
    mu = hid.mean(-1, keepdim=True)
    var = hid.var(-1, unbiased=False, keepdim=True)
    x = (hid - mu) / torch.sqrt(var + prior_net.norm.eps) * prior_net.norm.weight + prior_net.norm.bias
    per = torch.relu((x * prior_net.weight).sum(-1) + prior_net.bias)  # (B, L, n)
    return torch.relu((per * prior_net.mixer).sum(-1))  # (B, L)


def original_loss(alg: str, d, opts: dict, beta: float, prior=None):
    mc, mr = d["mask_c"].double(), d["mask_r"].double()
    lr_w = S(d["pt_c"] - d["rt_c"], mc)
    lr_l = S(d["pt_r"] - d["rt_r"], mr)
    nw, nl = mc.sum(-1), mr.sum(-1)
    if alg in ("dpo", "dice"):
        return -logsig(beta * (lr_w - lr_l))
    if alg == "centropy":
        c = opts["c"]
        return -logsig(beta * ((c * S(d["pt_c"], mc) - S(d["rt_c"], mc)) - (c * S(d["pt_r"], mr) - S(d["rt_r"], mr))))
    if alg == "simpo":
        gamma = opts["gamma_beta_ratio"] * beta
        return -logsig(beta / nw * S(d["pt_c"], mc) - beta / nl * S(d["pt_r"], mr) - gamma)
    if alg == "lndpo":
        return -logsig(beta * (lr_w / nw - lr_l / nl))
    if alg == "rdpo":
        return -logsig(beta * lr_w - beta * lr_l + opts["r"] * (nw - nl))
    kl_w = kl_ref_pol(d["rl_c"], d["pl_c"], mc)
    kl_l = kl_ref_pol(d["rl_r"], d["pl_r"], mr)
    if alg == "tdpo1":
        return -logsig(beta * (lr_w - lr_l + kl_w - kl_l))
    if alg == "tdpo2":
        return -logsig(beta * (lr_w - lr_l + opts["alpha"] * (kl_w.detach() - kl_l)))
    if alg == "tisdpo":
        return -logsig(beta * (S(d["w_c"] * (d["pt_c"] - d["rt_c"]), mc) - S(d["w_r"] * (d["pt_r"] - d["rt_r"]), mr)))
    if alg.startswith("sparsepo"):
        net_d = prior.mask_d if prior.mask_d is not None else prior.mask_u
        mu_w, mu_l = mask_net_ref(prior.mask_u, d["hid_c"]) * mc, mask_net_ref(prior.mask_u, d["hid_r"]) * mr
        md_w, md_l = mask_net_ref(net_d, d["hid_c"]) * mc, mask_net_ref(net_d, d["hid_r"]) * mr
        lp_c, lq_c = torch.log_softmax(d["rl_c"], -1), torch.log_softmax(d["pl_c"], -1)
        lp_r, lq_r = torch.log_softmax(d["rl_r"], -1), torch.log_softmax(d["pl_r"], -1)
        tokkl_c = -(lp_c.exp() * (lp_c - lq_c)).sum(-1)
        tokkl_r = -(lp_r.exp() * (lp_r - lq_r)).sum(-1)
        u = S(mu_w * (d["pt_c"] - d["rt_c"]), mc) - S(mu_l * (d["pt_r"] - d["rt_r"]), mr)
        dd = S(md_w * tokkl_c, mc) - S(md_l * tokkl_r, mr)
        half = 0.5 if not opts["rw_kl_independent"] else 1.0
        l1 = half * opts["l1_norm_param_u"] * (mu_w.abs().sum(-1) + mu_l.abs().sum(-1))
        l1 = l1 + half * opts["l1_norm_param_d"] * (md_w.abs().sum(-1) + md_l.abs().sum(-1))
        return -logsig(beta * (u - dd)) + l1
    raise AssertionError(alg)


SP = {"mask_dropout": 0.0, "l1_norm_param_u": 0.01, "l1_norm_param_d": 0.02}
CASES = {
    # case: (prior name, options, beta)
    "dpo": ("dpo", {}, 0.1),
    "dice": ("dice", {}, 0.1),
    "centropy": ("centropy", {"c": 0.8}, 0.1),
    "simpo": ("simpo", {"gamma_beta_ratio": 0.5}, 2.0),
    "lndpo": ("lndpo", {}, 0.1),
    "rdpo": ("rdpo", {"r": 0.5}, 0.1),
    "tdpo1": ("tdpo", {"tdpo2": False}, 0.1),
    "tdpo2": ("tdpo", {"alpha": 0.5}, 0.1),
    "tisdpo": ("tisdpo", {}, 0.1),
    "sparsepo": ("sparsepo", {**SP, "rw_kl_independent": True}, 0.1),
    "sparsepo_shared": ("sparsepo", {**SP, "rw_kl_independent": False}, 0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generalized_loss_equals_original(case):
    """loss(prior) == original loss (module docstring); same values and gradients at 1e-9."""
    name, opts, beta = CASES[case]
    d = make(1)
    cfg = LossConfig(prior=name, beta=beta, options=opts)
    if name == "sparsepo":
        torch.manual_seed(0)  # the mask network's init must not depend on what earlier tests drew
        prior = SparsePOPrior(cfg, hidden_size=H, num_layers=NL).double().eval()
        # Spread the mask weights so the ReLUs keep some tokens and zero others.
        torch.nn.init.normal_(prior.mask_u.mixer, 0.0, 1.0)
        opts_full = {**prior.options}
    else:
        prior = build_prior(cfg)
        opts_full = {**PRIORS[name].OPTIONS, **opts}
    assert prior.beta == beta

    got = compute_loss(prior, inputs_of(d), cfg).losses  # (B,)
    want = original_loss(case, d, opts_full, beta, prior)  # (B,)
    assert got.dtype == torch.float64 and got.shape == (B,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)

    wrt = [d["pl_c"], d["pl_r"], d["pt_c"], d["pt_r"], *prior.parameters()]
    g_got = torch.autograd.grad(got.sum(), wrt, allow_unused=True, retain_graph=True)
    g_want = torch.autograd.grad(want.sum(), wrt, allow_unused=True)
    nonzero = 0
    for a, b in zip(g_got, g_want):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
        nonzero += int(b.abs().max() > 0)
    assert nonzero >= 4  # the gradients compared are not all trivially zero
    if name == "sparsepo":
        assert any(g is not None and g.abs().max() > 0 for g in g_got[4:])  # the mask network learns


@pytest.mark.parametrize("name", ["dpo", "tdpo", "rdpo"])
def test_ln2_when_policy_equals_reference(name):
    """pi == pi_ref (equal lengths for R-DPO): lr = 0, KL = 0 -> margin 0 -> loss = ln 2."""
    eq = torch.tensor([4, 2, 5, 3])
    d = make(2, same=True, lens_c=eq, lens_r=eq)
    cfg = LossConfig(prior=name, options={"r": 0.3} if name == "rdpo" else {})
    out = compute_loss(build_prior(cfg), inputs_of(d), cfg)
    torch.testing.assert_close(out.losses, torch.full((B,), math.log(2.0), dtype=torch.float64), rtol=0, atol=1e-12)


def test_tdpo2_stops_gradient_through_winner_kl_only():
    """With per-token log-probs as separate leaves, the policy logits reach the loss only through the KL:
    TDPO2 -> zero gradient on the winner's logits, non-zero on the loser's; TDPO1 -> both non-zero."""
    d = make(3)
    d["pt_c"] = d["pt_c"].detach().requires_grad_()
    d["pt_r"] = d["pt_r"].detach().requires_grad_()
    grads = {}
    for tdpo2 in (True, False):
        cfg = LossConfig(prior="tdpo", options={"tdpo2": tdpo2})
        loss = compute_loss(build_prior(cfg), inputs_of(d), cfg).losses.sum()
        grads[tdpo2] = torch.autograd.grad(loss, [d["pl_c"], d["pl_r"]], allow_unused=True)
    gw, gl = grads[True]
    assert gw is None or gw.abs().max() == 0
    assert gl.abs().max() > 1e-6
    assert grads[False][0].abs().max() > 1e-6 and grads[False][1].abs().max() > 1e-6


def test_tisdpo_with_unit_weights_is_dpo():
    d = make(4)
    d["w_c"], d["w_r"] = torch.ones_like(d["w_c"]), torch.ones_like(d["w_r"])
    tis = compute_loss(build_prior(LossConfig(prior="tisdpo")), inputs_of(d), LossConfig(prior="tisdpo")).losses
    dpo = compute_loss(build_prior(LossConfig(prior="dpo")), inputs_of(d), LossConfig(prior="dpo")).losses
    torch.testing.assert_close(tis, dpo, rtol=0, atol=1e-12)
    # eos_weight=0 drops each response's last token from the weighted sum.
    cfg = LossConfig(prior="tisdpo", options={"eos_weight": 0.0})
    got = compute_loss(build_prior(cfg), inputs_of(d), cfg).losses
    mc, mr = d["mask_c"].double(), d["mask_r"].double()
    lastc = F.one_hot(LENS_C - 1, LC).double()
    lastr = F.one_hot(LENS_R - 1, LR).double()
    want = -F.logsigmoid(
        0.1 * (S((1 - lastc) * (d["pt_c"] - d["rt_c"]), mc) - S((1 - lastr) * (d["pt_r"] - d["rt_r"]), mr))
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_simpo_averages_with_eos_while_dpo_sums():
    """Every token log-prob = -1: SimPO reward margin = 2*(-1) - 2*(-1) = 0 and loss = -logsig(0 - gamma) with
    gamma = 1, for any lengths; DPO (ref = 0) margin = 0.1*(-|w| + |l|): the lengths (EOS included) enter the sum."""
    d = make(5)
    for s in ("c", "r"):
        d[f"pt_{s}"] = torch.where(d[f"mask_{s}"], -1.0, 0.0).double()
        d[f"rt_{s}"] = torch.zeros_like(d[f"pt_{s}"])
    simpo = compute_loss(build_prior(LossConfig(prior="simpo")), inputs_of(d), LossConfig(prior="simpo"))
    torch.testing.assert_close(simpo.margins, torch.zeros(B, dtype=torch.float64))
    torch.testing.assert_close(simpo.losses, torch.full((B,), math.log1p(math.e), dtype=torch.float64))
    dpo = compute_loss(build_prior(LossConfig(prior="dpo")), inputs_of(d), LossConfig(prior="dpo"))
    torch.testing.assert_close(dpo.margins, 0.1 * (-LENS_C + LENS_R).double())


def test_simpo_rewards_are_beta_mean_logp_without_gamma():
    """TRL's CPO trainer (loss_type=simpo) and SimPO's own trainer log rewards = b * mean log-prob; gamma is in
    the loss only. So rewards/chosen = b S_pi(w)/|w|, rewards/margins = rewards/chosen - rewards/rejected,
    rewards/accuracies = mean[margin > 0] (not margin > gamma), loss = -logsig(margin - gamma)."""
    d = make(9)
    beta, gamma = 2.0, 1.0  # gamma_beta_ratio 0.5
    mc, mr = d["mask_c"].double(), d["mask_r"].double()
    # Winner means a little above the loser's: reward margins in (0, gamma) for some pairs.
    d["pt_c"] = torch.where(d["mask_c"], -1.0 + 0.2 * torch.arange(B)[:, None] / B, 0.0).double()
    d["pt_r"] = torch.where(d["mask_r"], -1.1 + 0.5 * torch.arange(B).flip(0)[:, None] / B, 0.0).double()
    cfg = LossConfig(prior="simpo", beta=beta, options={"gamma_beta_ratio": gamma / beta})
    out = compute_loss(build_prior(cfg), inputs_of(d), cfg)
    r_w, r_l = beta * S(d["pt_c"], mc) / mc.sum(-1), beta * S(d["pt_r"], mr) / mr.sum(-1)
    assert ((r_w - r_l > 0) & (r_w - r_l < gamma)).any() and (r_w - r_l < 0).any()  # the cases that tell
    m = out.metrics()
    torch.testing.assert_close(out.chosen_rewards, r_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, r_l, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.margins, r_w - r_l, rtol=0, atol=1e-12)
    assert float(m["rewards/accuracies"][0] / m["rewards/accuracies"][1]) == float((r_w > r_l).double().mean())
    assert float(m["rewards/margins"][0] / m["rewards/margins"][1]) == pytest.approx(float((r_w - r_l).mean()))
    torch.testing.assert_close(out.losses, -logsig(r_w - r_l - gamma), rtol=0, atol=1e-12)


# fp32 tolerances of the loss on ~500-token responses (log-probs in [-2, 0]) against the published formula in
# fp64: SimPO's margin is a difference of token means (~ -1): a few fp32 ulps of beta * mean -> 2e-6 (measured
# <= 4.1e-7 over 10 seeds; the old (1 - 1/n) S - S form: 7.5e-5 to 1.1e-4). cEntropy's formula itself subtracts
# sums: beta * (c S_pi - S_ref) with |S| ~ 500, one fp32 rounding at that size is 0.1 * 500 * 1.2e-7 = 6e-6;
# per-token terms keep it below -> 5e-6 (measured <= 2.0e-6; the old S_pi - ((1 - c) S_pi + S_ref): 8.9e-6 to 1.4e-5).
FP32_TOL = {"simpo": 2e-6, "centropy": 5e-6}


@pytest.mark.parametrize("name", list(FP32_TOL))
def test_fp32_loss_matches_the_published_formula_on_long_responses(name):
    """SimPO and cEntropy compute logp - log zeta directly (PriorOutput.log_ratio): the fp32 loss on ~500-token
    responses is as close to the fp64 formula as fp32 allows (FP32_TOL above)."""
    g = torch.Generator().manual_seed(11)
    n, L = 64, 560
    masks = [torch.arange(L)[None] < torch.randint(480, L + 1, (n, 1), generator=g) for _ in range(2)]
    pol_c, pol_r, ref_c, ref_r = (torch.where(m, -2 * torch.rand(n, L, generator=g), 0.0)
                                  for m in (masks[0], masks[1], masks[0], masks[1]))  # fp32, ~ -1 per token
    mc, mr = (m.double() for m in masks)
    x = {k: v.double() for k, v in dict(pc=pol_c, pr=pol_r, rc=ref_c, rr=ref_r).items()}  # the same values in fp64
    if name == "simpo":
        beta, opts = 2.0, {"gamma_beta_ratio": 0.5}
        m = beta * S(x["pc"], mc) / mc.sum(-1) - beta * S(x["pr"], mr) / mr.sum(-1) - 0.5 * beta
    else:
        beta, opts = 0.1, {"c": 0.8}
        m = beta * ((0.8 * S(x["pc"], mc) - S(x["rc"], mc)) - (0.8 * S(x["pr"], mr) - S(x["rr"], mr)))
    cfg = LossConfig(prior=name, beta=beta, options=opts)
    inp = PriorInputs(policy=ResponseLogps(pol_c, masks[0], pol_r, masks[1]),
                      ref=ResponseLogps(ref_c, masks[0], ref_r, masks[1]))
    got = compute_loss(build_prior(cfg), inp, cfg).losses
    assert got.dtype == torch.float32
    err = float((got.double() - (-logsig(m))).abs().max())
    assert err <= FP32_TOL[name], f"{name}: fp32 loss off the fp64 formula by {err:.2e}"


def test_dpo_from_sequence_sums_equals_per_token():
    d = make(6)
    tok = inputs_of(d)
    seq = PriorInputs(policy=tok.policy, ref_seq=SidePair(S(d["rt_c"], d["mask_c"]), S(d["rt_r"], d["mask_r"])))
    prior = build_prior(LossConfig())
    assert check_needs(prior, seq.available()) is None
    torch.testing.assert_close(
        compute_loss(prior, seq, LossConfig()).losses, compute_loss(prior, tok, LossConfig()).losses
    )


def test_tdpo_topk_cache_full_k_is_exact_and_small_k_is_a_lower_bound():
    d = make(7)
    full = inputs_of(d)
    cfg = LossConfig(prior="tdpo", options={"tdpo2": False})
    prior = build_prior(cfg)
    want = compute_loss(prior, full, cfg).losses
    for k, exact in ((V, True), (3, False)):
        tk = {s: TopK(*topk_logprobs(d[f"rl_{s}"], k)) for s in ("c", "r")}
        ref = ResponseLogps(d["rt_c"].detach(), d["mask_c"], d["rt_r"].detach(), d["mask_r"])
        inp = PriorInputs(policy=full.policy, ref=ref, ref_topk=SidePair(tk["c"], tk["r"]))
        got = compute_loss(prior, inp, cfg)
        if exact:
            torch.testing.assert_close(got.losses, want, rtol=0, atol=1e-9)
        else:
            # Approximate KL <= true KL per side: check the chosen reward, beta*(lr_w + KL_w).
            kl_w = kl_ref_pol(d["rl_c"], d["pl_c"], d["mask_c"].double())
            lr_w = S(d["pt_c"] - d["rt_c"], d["mask_c"].double())
            assert torch.all(got.chosen_rewards <= 0.1 * (lr_w + kl_w).detach() + 1e-12)
            assert not torch.allclose(got.losses, want)


def test_check_needs_refuses_with_the_fix():
    with pytest.raises(ValueError, match=r"tdpo needs the reference's full-vocab.*online_reference=true.*ref\.topk=K"):
        check_needs("tdpo", {"ref_token_logps", "policy_full_vocab"})
    check_needs("tdpo", {"ref_token_logps", "ref_topk", "policy_full_vocab"})
    with pytest.raises(ValueError, match="hidden states"):
        check_needs("sparsepo", {"ref_token_logps", "ref_topk", "policy_full_vocab"})
    with pytest.raises(ValueError, match="token weights"):
        check_needs("tisdpo", {"ref_token_logps"})
    with pytest.raises(ValueError, match="midpo ref"):
        check_needs("dpo", set())
    check_needs("simpo", set())
    check_needs("dpo", {"ref_seq_logps"})
    with pytest.raises(ValueError, match="prior_net"):
        check_needs("learned", {"ref_token_logps"})
    with pytest.raises(ValueError, match="valid priors: dpo, dice"):
        check_needs("nope", set())
    # compute_loss refuses too, from what the inputs actually hold.
    d = make(8)
    inp = PriorInputs(policy=ResponseLogps(d["pt_c"], d["mask_c"], d["pt_r"], d["mask_r"]))
    with pytest.raises(ValueError, match="reference"):
        compute_loss(build_prior(LossConfig()), inp, LossConfig())


def test_registry_and_options():
    assert PRIOR_NAMES == ("dpo", "dice", "centropy", "simpo", "lndpo", "rdpo", "tdpo", "tisdpo", "sparsepo",
                           "learned")
    assert build_prior(LossConfig(prior="simpo")).beta == 2.0  # official default when beta is unset
    assert build_prior(LossConfig(prior="tdpo")).options == {"alpha": 0.5, "tdpo2": True, "chunk_size": 1024}
    assert PRIORS["dice"].NEEDS.reference == "previous_round_policy"
    assert PRIORS["tdpo"].NEEDS.needs_full_vocab_reference and PRIORS["simpo"].NEEDS.labels
    with pytest.raises(ValueError, match=r"unknown loss.options \['gama'\]; valid options: gamma_beta_ratio"):
        build_prior(LossConfig(prior="simpo", options={"gama": 1}))
    with pytest.raises(ValueError, match="loss.options.r"):
        build_prior(LossConfig(prior="rdpo"))
    learned = build_prior(LossConfig(prior="learned"))
    assert learned.needs.prior_network and learned.beta == 0.1


def test_importing_losses_and_priors_does_not_import_deepspeed():
    code = "import midpo.core.losses, midpo.core.priors, sys; assert 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
