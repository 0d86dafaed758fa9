"""The links inside the loss (issue #21): compute_loss = prior (r_w, r_l) then the links of the `loss` settings.

- sigmoid (the default) through compute_loss is today's loss for every prior: the formula the loss had before
  the links, written here, bit for bit (values and gradients) for every prior without a constant part of log
  zeta; SimPO (gamma enters as r_w - gamma/b before beta scales it, instead of after) within 2 fp32 ulps;
- every link through compute_loss under three priors (dpo; simpo, whose constant part enters r_w; centropy,
  whose log zeta holds the policy) equals its formula written here in float64 on the prior's log-ratios, values
  and gradients; TRL's rewards (constant part left out) whatever the link;
- loss.terms: the weighted sum, each term logged as loss/<link> (with loss/sft), the metric names the trainer logs;
- loss.label_smoothing: cDPO's eps for sigmoid, eps of robust and exo_pair, refused elsewhere; the registry's
  errors under the config's keys; the config's own shape checks; YAML round trip;
- bco_pair: delta is an input (the running mean kept by the train layer), refused when missing, logged;
- lndpo x ipo == TRL's (length-normalized) IPO; fp32 stability of every link through the loss at log-ratios
  of +-1e4.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from midpo.config import LossConfig, load_config, render_config
from midpo.core.links import LINK_NAMES
from midpo.core.logprobs import ResponseLogps
from midpo.core.losses import METRIC_NAMES, Term, link_terms, loss_metric_names
from midpo.core.priors import PRIOR_NAMES, PriorInputs, SidePair, SparsePOPrior, build_prior, compute_loss
from midpo.errors import ConfigError

B, LC, LR, V, NL, H = 5, 7, 6, 11, 3, 8
LENS_C = torch.tensor([7, 3, 5, 1, 4])
LENS_R = torch.tensor([2, 6, 4, 5, 6])


def make(seed: int, dtype=torch.float64) -> dict:
    """Random per-token log-probs (policy leaves with grad), logits, hidden states, weights, masks."""
    g = torch.Generator().manual_seed(seed)
    d = {}
    for s, L, lens in (("c", LC, LENS_C), ("r", LR, LENS_R)):
        mask = torch.arange(L)[None] < lens[:, None]
        d[f"m_{s}"] = mask
        for who in ("p", "r"):
            logits = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
            tgt = torch.randint(0, V, (B, L), generator=g)
            tok = torch.log_softmax(logits, -1).gather(-1, tgt[..., None])[..., 0]
            d[f"{who}t_{s}"] = torch.where(mask, tok, 0.0).to(dtype)
            d[f"{who}l_{s}"] = logits.to(dtype)
        d[f"pt_{s}"].requires_grad_()
        d[f"pl_{s}"].requires_grad_()
        d[f"h_{s}"] = torch.randn(B, L, NL, H, generator=g, dtype=dtype)
        d[f"w_{s}"] = (0.7 + 0.6 * torch.rand(B, L, generator=g, dtype=torch.float64)).to(dtype)
        d[f"z_{s}"] = torch.where(mask, -3 * torch.rand(B, L, generator=g, dtype=torch.float64), 0.0).to(dtype)
    return d


def inputs_of(d: dict) -> PriorInputs:
    pol = ResponseLogps(d["pt_c"], d["m_c"], d["pt_r"], d["m_r"], chosen_logits=d["pl_c"], rejected_logits=d["pl_r"])
    ref = ResponseLogps(d["rt_c"], d["m_c"], d["rt_r"], d["m_r"], chosen_logits=d["rl_c"], rejected_logits=d["rl_r"],
                        chosen_hidden=d["h_c"], rejected_hidden=d["h_r"])
    return PriorInputs(policy=pol, ref=ref, token_weights=SidePair(d["w_c"], d["w_r"]),
                       prior_logps=SidePair(d["z_c"], d["z_r"]))


OPTS = {"centropy": {"c": 0.8}, "rdpo": {"r": 0.3}, "sparsepo": {"mask_dropout": 0.0, "l1_norm_param_u": 0.01}}


def prior_for(name: str, cfg: LossConfig, dtype=torch.float64):
    if name == "sparsepo":
        torch.manual_seed(0)
        return SparsePOPrior(cfg, hidden_size=H, num_layers=NL).to(dtype).eval()
    return build_prior(cfg)


def S(x, m):
    return (x * m).sum(-1)


def todays_loss(prior, inp: PriorInputs, beta: float, eps: float, sft_weight: float) -> torch.Tensor:
    """The loss before the links (midpo.core.losses at a99f514), written out: per-side sums of the prior's output,
    m = b h_w - b h_l, shifted by -b (k_w - k_l); -(1 - eps) logsig(m) - eps logsig(-m); + NLL + extra terms."""
    z = prior(inp)
    p = inp.policy
    dt = torch.promote_types(torch.promote_types(torch.float32, p.chosen.dtype), z.chosen.dtype)

    def ssum(x, m):
        return x.to(dt) if x.dim() == 1 else (x.to(dt) * m).sum(-1)

    pc, pr = ssum(p.chosen, p.chosen_mask), ssum(p.rejected, p.rejected_mask)
    hc, hr = ssum(z.chosen, p.chosen_mask), ssum(z.rejected, p.rejected_mask)
    if not z.log_ratio:
        hc, hr = pc - hc, pr - hr
    margin = beta * hc - beta * hr
    k_w, k_l = z.constant
    arg = margin - beta * (k_w - k_l) if (k_w or k_l) else margin
    loss = -F.logsigmoid(arg)
    if eps:
        loss = (1.0 - eps) * loss - eps * F.logsigmoid(-arg)
    if sft_weight:
        loss = loss + sft_weight * (-pc / p.chosen_mask.sum(-1).clamp(min=1).to(dt))
    for v in z.extra_losses.values():
        loss = loss + v.to(dt)
    return loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", PRIOR_NAMES)
def test_sigmoid_through_compute_loss_is_todays_loss_for_every_prior(name, dtype):
    for eps, sft in ((0.0, 0.0), (0.2, 0.5)):
        d = make(1, dtype)
        cfg = LossConfig(prior=name, options=OPTS.get(name, {}), label_smoothing=eps, sft_weight=sft)
        prior = prior_for(name, cfg, dtype)
        got = compute_loss(prior, inputs_of(d), cfg).losses
        want = todays_loss(prior, inputs_of(d), prior.beta, eps, sft)
        assert got.dtype == want.dtype == torch.promote_types(torch.float32, dtype)
        wrt = [d["pt_c"], d["pt_r"], d["pl_c"], d["pl_r"]]
        g_got = torch.autograd.grad(got.sum(), wrt, allow_unused=True)
        g_want = torch.autograd.grad(want.sum(), wrt, allow_unused=True)
        if name == "simpo":  # the one prior with a constant part: one rounding moved (module docstring)
            ulp = torch.finfo(got.dtype).eps
            torch.testing.assert_close(got, want, rtol=2 * ulp, atol=2 * ulp * float(want.detach().abs().max()))
            for a, b in zip(g_got, g_want):
                torch.testing.assert_close(a, b, rtol=4 * ulp, atol=4 * ulp)
            continue
        assert torch.equal(got, want), (name, eps, float((got - want).abs().max()))
        for a, b in zip(g_got, g_want):
            assert (a is None and b is None) or torch.equal(a, b)


# --- every link on the priors' log-ratios ------------------------------------------------------------------


def log_ratios_of(name: str, d: dict, beta: float, opts: dict):
    """(r_w, r_l) of the prior, written from docs/algorithms.md (constant part included)."""
    mc, mr = d["m_c"].double(), d["m_r"].double()
    if name == "dpo":
        return S(d["pt_c"] - d["rt_c"], mc), S(d["pt_r"] - d["rt_r"], mr)
    if name == "simpo":
        return S(d["pt_c"], mc) / mc.sum(-1) - opts["gamma_beta_ratio"], S(d["pt_r"], mr) / mr.sum(-1)
    if name == "centropy":
        c = opts["c"]
        return c * S(d["pt_c"], mc) - S(d["rt_c"], mc), c * S(d["pt_r"], mr) - S(d["rt_r"], mr)
    raise AssertionError(name)


def link_formula(link: str, rw, rl, b: float, o: dict):
    h = rw - rl
    ls = F.logsigmoid
    if link == "sigmoid":
        return -ls(b * h)
    if link == "ipo":
        return (h - 1 / (2 * b)) ** 2
    if link == "hinge":
        return torch.relu(o.get("delta", 1.0) - b * h)
    if link == "robust":
        e = o["eps"]
        return ((1 - e) * -ls(b * h) - e * -ls(-b * h)) / (1 - 2 * e)
    if link == "exo_pair":
        e = o.get("eps", 1e-3)
        qw, ql = torch.sigmoid(b * h), torch.sigmoid(-b * h)
        return qw * (torch.log(qw) - math.log(1 - e)) + ql * (torch.log(ql) - math.log(e))
    if link == "nca_pair":
        return -ls(b * rw) - 0.5 * ls(-b * rw) - 0.5 * ls(-b * rl)
    if link == "bco_pair":
        return -ls(b * rw - o["delta"]) - ls(-(b * rl - o["delta"]))
    if link == "sppo_hard":
        return (rw - 0.5 / b) ** 2 + (rl + 0.5 / b) ** 2
    if link == "apo_zero":
        return 1 - torch.sigmoid(b * rw) + torch.sigmoid(b * rl)
    if link == "apo_down":
        return torch.sigmoid(b * rw) + 1 - torch.sigmoid(b * h)
    raise AssertionError(link)


LINK_OPTS = {"hinge": {"delta": 0.4}, "robust": {"eps": 0.1}, "exo_pair": {"eps": 0.05}, "bco_pair": {"delta": 0.3}}
PRIORS3 = {"dpo": ({}, 0.1), "simpo": ({"gamma_beta_ratio": 0.5}, 2.0), "centropy": ({"c": 0.8}, 0.1)}


@pytest.mark.parametrize("prior", list(PRIORS3))
@pytest.mark.parametrize("link", LINK_NAMES)
def test_every_link_through_compute_loss_is_its_formula(prior, link):
    opts, beta = PRIORS3[prior]
    d = make(2)
    cfg = LossConfig(prior=prior, beta=beta, options=opts, link=link, link_options=LINK_OPTS.get(link, {}))
    out = compute_loss(build_prior(cfg), inputs_of(d), cfg)
    rw, rl = log_ratios_of(prior, d, beta, opts)
    want = link_formula(link, rw, rl, beta, LINK_OPTS.get(link, {}))
    torch.testing.assert_close(out.losses, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(out.losses.sum(), [d["pt_c"], d["pt_r"]], retain_graph=True)
    g_want = torch.autograd.grad(want.sum(), [d["pt_c"], d["pt_r"]])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert max(float(g.abs().max()) for g in g_got) > 1e-6  # not a trivially flat case
    # TRL's rewards, whatever the link: beta * log-ratio, a constant part (SimPO's gamma) left out
    k_w = opts.get("gamma_beta_ratio", 0.0)
    torch.testing.assert_close(out.chosen_rewards, beta * (rw + k_w).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, beta * rl.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.margins, beta * (rw + k_w - rl).detach(), rtol=1e-12, atol=1e-12)
    assert set(out.metrics()) == set(METRIC_NAMES)  # one link: TRL's metrics only


def test_fp32_every_link_through_the_loss_is_finite_at_extreme_log_ratios():
    """Per-sequence reference sums that put r = logp - logp_ref at +-1e4 (margins up to 2e4), fp32."""
    ext = torch.tensor([1e4, -1e4, 0.0, 1e4, -1e4, 0.0, 1e4, -1e4, 0.0])
    rw, rl = ext, ext.roll(3).roll(1)
    n = len(ext)
    pol = torch.full((n, 1), -1.0, requires_grad=True)
    mask = torch.ones(n, 1, dtype=torch.bool)
    inp = PriorInputs(policy=ResponseLogps(pol, mask, pol, mask), ref_seq=SidePair(-1.0 - rw, -1.0 - rl))
    for link in LINK_NAMES:
        for beta in (0.1, 1.0):
            cfg = LossConfig(link=link, beta=beta, link_options=LINK_OPTS.get(link, {}))
            out = compute_loss(build_prior(cfg), inp, cfg)
            (g,) = torch.autograd.grad(out.losses.sum(), [pol])
            assert out.losses.dtype == torch.float32
            assert torch.isfinite(out.losses).all() and torch.isfinite(g).all(), link


# --- combinations, metrics ----------------------------------------------------------------------------------


def test_terms_are_the_weighted_sum_and_each_is_logged():
    d = make(3)
    terms = [{"link": "sigmoid", "weight": 1}, {"link": "bco_pair", "weight": 0.5, "options": {"delta": 0.2}},
             {"link": "ipo", "weight": 0.25}]
    cfg = LossConfig(terms=terms, sft_weight=0.3)
    out = compute_loss(build_prior(cfg), inputs_of(d), cfg)
    rw, rl = log_ratios_of("dpo", d, 0.1, {})
    parts = {"sigmoid": 1.0 * link_formula("sigmoid", rw, rl, 0.1, {}),
             "bco_pair": 0.5 * link_formula("bco_pair", rw, rl, 0.1, {"delta": 0.2}),
             "ipo": 0.25 * link_formula("ipo", rw, rl, 0.1, {})}
    nll = -S(d["pt_c"], d["m_c"].double()) / LENS_C.double()
    torch.testing.assert_close(out.losses, sum(parts.values()) + 0.3 * nll, rtol=1e-12, atol=1e-12)
    m = out.metrics()
    for k, v in parts.items():
        torch.testing.assert_close(m[f"loss/{k}"], torch.stack([v.sum().detach(), torch.tensor(B + 0.0).double()]))
    torch.testing.assert_close(sum(m[f"loss/{k}"][0] for k in [*parts, "sft"]), m["loss"][0], rtol=1e-12, atol=1e-12)
    assert list(m) == loss_metric_names(link_terms(cfg), sft_weight=0.3)  # what the trainer logs, in order
    assert loss_metric_names(link_terms(cfg), sft_weight=0.3)[len(METRIC_NAMES):] == [
        "loss/sigmoid", "loss/bco_pair", "loss/ipo", "loss/sft"]


def test_bco_pair_delta_is_an_input_and_is_logged():
    d = make(4)
    cfg = LossConfig(link="bco_pair")
    prior = build_prior(cfg)
    assert link_terms(cfg) == (Term("bco_pair", 1.0, {}),) and link_terms(cfg)[0].running_delta
    with pytest.raises(ValueError, match="running mean.*delta="):
        compute_loss(prior, inputs_of(d), cfg)
    out = compute_loss(prior, inputs_of(d), cfg, delta=-0.7)
    rw, rl = log_ratios_of("dpo", d, 0.1, {})
    torch.testing.assert_close(out.losses, link_formula("bco_pair", rw, rl, 0.1, {"delta": -0.7}), rtol=1e-12,
                               atol=1e-12)
    assert out.delta == -0.7 and float(out.metrics()["bco/delta"][0]) == pytest.approx(-0.7 * B)
    assert loss_metric_names(link_terms(cfg))[-1] == "bco/delta"
    fixed = LossConfig(link="bco_pair", link_options={"delta": 0.0})  # TRL >= 0.29's bco_pair: no running mean
    assert not link_terms(fixed)[0].running_delta
    out0 = compute_loss(prior, inputs_of(d), fixed)
    assert out0.delta is None and "bco/delta" not in out0.metrics()
    torch.testing.assert_close(out0.losses, link_formula("bco_pair", rw, rl, 0.1, {"delta": 0.0}))


def test_lndpo_under_ipo_is_trls_length_normalized_ipo():
    """TRL's IPO divides each response's log-ratio by its length: ((lr_w/|w| - lr_l/|l|) - 1/(2 tau))^2; from
    per-token or per-sequence reference log-probs alike."""
    d = make(5)
    cfg = LossConfig(prior="lndpo", link="ipo", beta=0.5)
    mc, mr = d["m_c"].double(), d["m_r"].double()
    h = S(d["pt_c"] - d["rt_c"], mc) / mc.sum(-1) - S(d["pt_r"] - d["rt_r"], mr) / mr.sum(-1)
    want = (h - 1 / (2 * 0.5)) ** 2
    prior = build_prior(cfg)
    tok = compute_loss(prior, inputs_of(d), cfg)
    torch.testing.assert_close(tok.losses, want, rtol=1e-12, atol=1e-12)
    seq = PriorInputs(policy=inputs_of(d).policy, ref_seq=SidePair(S(d["rt_c"], mc), S(d["rt_r"], mr)))
    torch.testing.assert_close(compute_loss(prior, seq, cfg).losses, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tok.chosen_rewards, 0.5 * (S(d["pt_c"] - d["rt_c"], mc) / mc.sum(-1)).detach())


# --- settings: label smoothing, the registry's errors, the config's shape ------------------------------------


def test_label_smoothing_is_eps_where_the_link_has_one():
    assert link_terms(LossConfig()) == (Term("sigmoid", 1.0, {}),)
    assert link_terms(LossConfig(label_smoothing=0.1)) == (Term("sigmoid", 1.0, {"eps": 0.1}),)
    assert link_terms(LossConfig(link="robust", label_smoothing=0.1)) == (Term("robust", 1.0, {"eps": 0.1}),)
    assert link_terms(LossConfig(link="exo_pair", label_smoothing=0.2)) == (Term("exo_pair", 1.0, {"eps": 0.2}),)
    assert link_terms(LossConfig(link="exo_pair")) == (Term("exo_pair", 1.0, {}),)  # its own default, 1e-3
    mixed = LossConfig(terms=[{"link": "sigmoid"}, {"link": "apo_zero", "weight": 2}], label_smoothing=0.1)
    assert link_terms(mixed) == (Term("sigmoid", 1.0, {"eps": 0.1}), Term("apo_zero", 2.0, {}))
    # cDPO through the default link is today's label smoothing (test_sigmoid_through_compute_loss_... checks values)
    with pytest.raises(ConfigError, match=r"label_smoothing=0.1 is the label-noise rate eps of the sigmoid, robust, "
                                          r"exo_pair links; ipo has none: remove loss.label_smoothing"):
        link_terms(LossConfig(link="ipo", label_smoothing=0.1))
    with pytest.raises(ConfigError, match=r"loss.label_smoothing and loss.link_options.eps both set eps of link "
                                          r"'robust': keep one"):
        link_terms(LossConfig(link="robust", link_options={"eps": 0.2}, label_smoothing=0.1))


def test_bad_links_and_hyperparameters_are_refused_with_the_registrys_messages():
    cases = [
        (dict(link="kto"), r"^loss.link: unknown link 'kto'; valid links: " + ", ".join(LINK_NAMES) + "$"),
        (dict(link="robust"), r"^loss.link_options: link 'robust' needs eps \(no default\): the label-flip rate"),
        (dict(link="ipo", link_options={"tau": 0.1}),
         r"^loss.link_options: link 'ipo': unknown parameters \['tau'\]; valid parameters: none$"),
        (dict(link="hinge", link_options={"margin": 1}),
         r"unknown parameters \['margin'\]; valid parameters: delta$"),
        (dict(link="exo_pair", link_options={"eps": 1.0}), r"loss.link_options: link 'exo_pair': eps must lie in"),
        (dict(terms=[{"link": "sigmoid"}, {"link": "nope"}]), r"^loss.terms\[1\]: unknown link 'nope'; valid links"),
        (dict(terms=[{"link": "ipo"}, {"link": "ipo", "weight": 2}]), r"loss.terms\[1\]: link 'ipo' appears twice"),
        (dict(terms=[{"link": "robust", "options": {"eps": 0.7}}]), r"^loss.terms\[0\].options: link 'robust': eps"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match):
            link_terms(LossConfig(**kwargs))
    with pytest.raises(ConfigError, match="valid links"):  # compute_loss resolves (and checks) them too
        d = make(6)
        compute_loss(build_prior(LossConfig()), inputs_of(d), LossConfig(link="kto"))


def test_config_checks_the_shape_of_the_link_settings():
    for kwargs, match in (
        (dict(link="ipo", terms=[{"link": "sigmoid"}]), "set either loss.terms or loss.link"),
        (dict(link_options={"eps": 0.1}, terms=[{"link": "sigmoid"}]), "set either loss.terms or loss.link"),
        (dict(terms=[{"link": "sigmoid", "wieght": 1}]), r"loss.terms\[0\] must be a mapping \{link: NAME"),
        (dict(terms=[{"weight": 1}]), r"loss.terms\[0\] must be a mapping"),
        (dict(terms=[{"link": "ipo", "weight": 0}]), r"loss.terms\[0\].weight must be a finite number > 0"),
        (dict(terms=[{"link": "ipo", "weight": float("inf")}]), r"weight must be a finite number > 0"),
        (dict(terms=[{"link": "ipo", "options": [1]}]), r"loss.terms\[0\].options must be a mapping"),
    ):
        with pytest.raises(ConfigError, match=match):
            LossConfig(**kwargs)


def test_link_settings_from_yaml_and_back():
    cfg = load_config("tiny", ["loss.terms=[{link: sigmoid, weight: 1}, {link: bco_pair, weight: 0.5}]",
                               "loss.label_smoothing=0.1"])
    assert link_terms(cfg.loss) == (Term("sigmoid", 1.0, {"eps": 0.1}), Term("bco_pair", 0.5, {}))
    cfg2 = load_config("tiny", ["loss.link=hinge", "loss.link_options.delta=0.5"])
    assert link_terms(cfg2.loss) == (Term("hinge", 1.0, {"delta": 0.5}),)
    for c in (cfg, cfg2):
        text = render_config(c)
        assert "loss.terms" not in text and "terms:" in text and "link_options:" in text
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "r.yaml"
            p.write_text(text)
            assert load_config(p) == c
    with pytest.raises(ConfigError, match=r"loss.terms\[0\]: expected a mapping"):
        load_config("tiny", ["loss.terms=[sigmoid]"])
