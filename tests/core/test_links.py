"""midpo.core.links: every link against its published formula written here independently (scalar
arithmetic in 50-digit decimals from the standard library, one pair at a time, so the reference has
no rounding or overflow to speak of), values and gradients (autograd vs central finite differences
of that formula), on random inputs that include extreme margins; fp32 stability at log-ratios of
+-1e4; the weighted combination; the registry's errors; and `sigmoid` == midpo.core.losses.mi_dpo_loss
(so moving DPO onto the link cannot change it).

Notation: c = chosen log-ratio r_w, r = rejected log-ratio r_l, b = beta, x = b (c - r).
"""

from __future__ import annotations

import ast
import itertools
import math
from decimal import Context, Decimal, localcontext
from pathlib import Path

import pytest
import torch
from loss_helpers import batch

from midpo.core import links
from midpo.core.links import LINK_NAMES, LINKS, combine, get_link, link_loss
from midpo.core.losses import mi_dpo_loss

# --- the published formulas, in exact-enough decimal arithmetic ----------------------------------

DEC = Context(prec=50)  # every reference evaluation runs in this context (see ref_losses / ref_grads)


def log_sig(x):
    return -(1 + (-x).exp()).ln()  # log(1 / (1 + e^-x)); decimals do not overflow at |x| = 2e4


def sig(x):
    return 1 / (1 + (-x).exp())


def kl2(q_logs, p):
    """KL(q || p) over two outcomes, q given by its logs."""
    return sum(lq.exp() * (lq - pi.ln()) for lq, pi in zip(q_logs, p))


def f_sigmoid(c, r, b, eps=0):
    # Bradley-Terry cross-entropy against the smoothed label (1 - eps, eps).
    x = b * (c - r)
    return -((1 - eps) * log_sig(x) + eps * log_sig(-x))


def f_ipo(c, r, b):
    tau = b
    return ((c - r) - 1 / (2 * tau)) ** 2


def f_hinge(c, r, b, delta=1):
    return max(0, delta - b * (c - r))


def f_robust(c, r, b, eps):
    def dpo(u, v):  # DPO loss with u preferred to v
        return -log_sig(b * (u - v))

    return ((1 - eps) * dpo(c, r) - eps * dpo(r, c)) / (1 - 2 * eps)


def f_exo_pair(c, r, b, eps=Decimal(1e-3)):
    # q = softmax over the two responses of b * logratio, in log space; target (1 - eps, eps)
    lse = max(b * c, b * r) + (1 + (-abs(b * c - b * r)).exp()).ln()
    return kl2((b * c - lse, b * r - lse), (1 - eps, eps))


def f_nca_pair(c, r, b):
    return -log_sig(b * c) - (log_sig(-b * c) + log_sig(-b * r)) / 2


def f_bco_pair(c, r, b, delta):
    return -log_sig(b * c - delta) - log_sig(delta - b * r)


def f_sppo_hard(c, r, b):
    eta = 1 / b
    p_w, p_l = 1, 0  # hard win probabilities
    half = Decimal("0.5")
    return (c - eta * (p_w - half)) ** 2 + (r - eta * (p_l - half)) ** 2


def f_apo_zero(c, r, b):
    return 1 - sig(b * c) + sig(b * r)


def f_apo_down(c, r, b):
    return sig(b * c) + 1 - sig(b * (c - r))


REF = {
    "sigmoid": f_sigmoid,
    "ipo": f_ipo,
    "hinge": f_hinge,
    "robust": f_robust,
    "exo_pair": f_exo_pair,
    "nca_pair": f_nca_pair,
    "bco_pair": f_bco_pair,
    "sppo_hard": f_sppo_hard,
    "apo_zero": f_apo_zero,
    "apo_down": f_apo_down,
}

# (link, hyperparameters) cases: every link, every hyperparameter at a default and a non-default value.
CASES = [
    ("sigmoid", {}),
    ("sigmoid", {"eps": 0.2}),
    ("ipo", {}),
    ("hinge", {}),
    ("hinge", {"delta": 0.3}),
    ("robust", {"eps": 0.1}),
    ("robust", {"eps": 0.0}),
    ("exo_pair", {}),
    ("exo_pair", {"eps": 0.25}),
    ("nca_pair", {}),
    ("bco_pair", {"delta": 0.0}),
    ("bco_pair", {"delta": -0.7}),
    ("sppo_hard", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}" for n, p in CASES]


def _dec(params):
    return {k: Decimal(v) for k, v in params.items()}  # exact: the binary floats the module receives


def ref_losses(name, c, r, beta, params):
    f, b, p = REF[name], Decimal(beta), _dec(params)
    with localcontext(DEC):
        vals = [f(Decimal(ci), Decimal(ri), b, **p) for ci, ri in zip(c.tolist(), r.tolist())]
    return torch.tensor([float(v) for v in vals], dtype=torch.float64)


def ref_grads(name, c, r, beta, params):
    """Central differences of the decimal formula (step 1e-20: truncation and rounding far below fp64)."""
    f, b, p = REF[name], Decimal(beta), _dec(params)
    h = Decimal("1e-20")
    gc, gr = [], []
    with localcontext(DEC):
        for ci, ri in zip(c.tolist(), r.tolist()):
            ci, ri = Decimal(ci), Decimal(ri)
            gc.append(float((f(ci + h, ri, b, **p) - f(ci - h, ri, b, **p)) / (2 * h)))
            gr.append(float((f(ci, ri + h, b, **p) - f(ci, ri - h, b, **p)) / (2 * h)))
    return torch.tensor(gc, dtype=torch.float64), torch.tensor(gr, dtype=torch.float64)


def random_pairs(seed, n=32):
    """Log-ratios on scales from 0.3 to 3000, so b * margin spans ordinary and extreme values."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.3, 3.0, 30.0, 300.0, 3000.0], dtype=torch.float64)
    pick = torch.randint(0, len(scale), (2, n), generator=g)
    c = torch.randn(n, generator=g, dtype=torch.float64) * scale[pick[0]]
    r = torch.randn(n, generator=g, dtype=torch.float64) * scale[pick[1]]
    return c, r


def grads(loss, c, r):
    return torch.autograd.grad(loss.sum(), [c, r])


# --- values and gradients ------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_link_matches_published_formula_values_and_gradients(name, params, beta):
    c, r = random_pairs(CASES.index((name, params)) + int(10 * beta))
    if name == "hinge":  # the kink has no gradient; keep finite differences off it
        keep = (params.get("delta", 1.0) - beta * (c - r)).abs() > 1e-6
        c, r = c[keep], r[keep]
    c.requires_grad_(), r.requires_grad_()
    out = link_loss(name, c, r, beta=beta, **params)
    assert out.shape == c.shape and out.dtype == torch.float64
    want = ref_losses(name, c.detach(), r.detach(), beta, params)
    torch.testing.assert_close(out.detach(), want, rtol=1e-12, atol=1e-12)
    gc, gr = grads(out, c, r)
    wc, wr = ref_grads(name, c.detach(), r.detach(), beta, params)
    torch.testing.assert_close(gc, wc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gr, wr, rtol=1e-10, atol=1e-12)


def test_low_precision_inputs_compute_in_fp32():
    c, r = random_pairs(7, n=8)
    for name, params in CASES:
        out = link_loss(name, c.bfloat16(), r.half(), beta=0.1, **params)
        assert out.dtype == torch.float32, name


# --- fp32 at +-1e4 -------------------------------------------------------------------------------

EXTREMES = list(itertools.product([1e4, -1e4, 0.0], repeat=2))


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_fp32_stable_at_extreme_logratios(name, params, beta):
    """fp32 log-ratios of +-1e4 (margins up to 2e4): finite loss and gradient, both equal to the
    float64 formula (which at these points is its limit or asymptote)."""
    c = torch.tensor([p[0] for p in EXTREMES], dtype=torch.float32, requires_grad=True)
    r = torch.tensor([p[1] for p in EXTREMES], dtype=torch.float32, requires_grad=True)
    out = link_loss(name, c, r, beta=beta, **params)
    gc, gr = grads(out, c, r)
    assert out.dtype == torch.float32
    for t in (out, gc, gr):
        assert torch.isfinite(t).all(), (name, t)
    c64, r64 = c.detach().double(), r.detach().double()
    torch.testing.assert_close(out.detach().double(), ref_losses(name, c64, r64, beta, params), rtol=1e-6, atol=1e-6)
    wc, wr = ref_grads(name, c64, r64, beta, params)
    torch.testing.assert_close(gc.double(), wc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gr.double(), wr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,params,c,r,limit",
    [
        ("sigmoid", {}, 1e4, -1e4, 0.0),  # winner far ahead: no loss
        ("sigmoid", {"eps": 0.2}, -1e4, 1e4, 0.8 * 2e4 * 0.1),  # asymptote (1 - eps) * |x|
        ("robust", {"eps": 0.1}, 1e4, -1e4, -0.1 * 2e4 * 0.1 / 0.8),  # asymptote -eps x / (1 - 2 eps)
        ("exo_pair", {"eps": 1e-3}, 1e4, -1e4, -math.log1p(-1e-3)),  # q -> (1, 0): KL = -log(1 - eps)
        ("exo_pair", {"eps": 1e-3}, -1e4, 1e4, -math.log(1e-3)),  # q -> (0, 1): KL = -log eps
        ("nca_pair", {}, 1e4, 1e4, 0.5 * 0.1 * (1e4 + 1e4)),  # asymptote b (r_w + r_l) / 2
        ("nca_pair", {}, -1e4, -1e4, 1e4 * 0.1),  # asymptote -b r_w
        ("bco_pair", {"delta": 0.5}, 1e4, -1e4, 0.0),
        ("apo_zero", {}, 1e4, -1e4, 0.0),
        ("apo_zero", {}, -1e4, 1e4, 2.0),
        ("apo_down", {}, -1e4, -1e4, 0.5),  # sigma(-inf) + 1 - sigma(0)
        ("apo_down", {}, 1e4, 1e4, 1.5),
        ("hinge", {}, -1e4, 1e4, 1.0 + 2e4 * 0.1),
    ],
)
def test_fp32_value_at_extremes_is_the_formulas_limit(name, params, c, r, limit):
    out = link_loss(name, torch.tensor([c]), torch.tensor([r]), beta=0.1, **params)
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(limit, rel=1e-6, abs=1e-6)


# --- DPO cannot change ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sigmoid_equals_mi_dpo_loss_bit_for_bit(eps, dtype):
    """The same per-token inputs through mi_dpo_loss and through (sum, prior-adjust, sigmoid):
    identical losses and gradients (not just close), plain and with label smoothing."""
    pol, zc, zr = batch(11)
    pol.chosen, pol.rejected = (
        pol.chosen.detach().to(dtype).requires_grad_(),
        pol.rejected.detach().to(dtype).requires_grad_(),
    )
    zc, zr = zc.to(dtype), zr.to(dtype)
    want = mi_dpo_loss(pol, zc, zr, beta=0.3, label_smoothing=eps).losses
    cm, rm = pol.chosen_mask, pol.rejected_mask
    c = (pol.chosen * cm).sum(-1) - (zc * cm).sum(-1)
    r = (pol.rejected * rm).sum(-1) - (zr * rm).sum(-1)
    got = link_loss("sigmoid", c, r, beta=0.3, eps=eps)
    assert torch.equal(got, want)
    for a, b in zip(grads(got, pol.chosen, pol.rejected), grads(want, pol.chosen, pol.rejected)):
        assert torch.equal(a, b)


# --- combination ---------------------------------------------------------------------------------


def test_combine_is_the_weighted_sum_and_reports_each_term():
    c, r = random_pairs(3, n=16)
    c.requires_grad_(), r.requires_grad_()
    terms = [("sigmoid", 0.8, {"eps": 0.1}), ("bco_pair", 0.2, {"delta": 0.3}), ("apo_zero", 1.0, None)]
    total, parts = combine(terms, c, r, beta=0.1)
    want = sum(w * ref_losses(n, c.detach(), r.detach(), 0.1, p or {}) for n, w, p in terms)
    torch.testing.assert_close(total.detach(), want, rtol=1e-12, atol=1e-12)
    assert list(parts) == ["sigmoid", "bco_pair", "apo_zero"]
    for n, w, p in terms:
        torch.testing.assert_close(parts[n], w * link_loss(n, c, r, beta=0.1, **(p or {})).detach())
        assert not parts[n].requires_grad
    torch.testing.assert_close(sum(parts.values()), total.detach())
    g_total = grads(total, c, r)
    g_want = grads(sum(w * link_loss(n, c, r, beta=0.1, **(p or {})) for n, w, p in terms), c, r)
    for a, b in zip(g_total, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_combine_refuses_bad_terms():
    c, r = random_pairs(4, n=4)
    with pytest.raises(ValueError, match="at least one"):
        combine([], c, r, beta=0.1)
    with pytest.raises(ValueError, match="appears twice"):
        combine([("ipo", 1.0, {}), ("ipo", 0.5, {})], c, r, beta=0.1)
    with pytest.raises(ValueError, match="weight must be finite"):
        combine([("ipo", float("nan"), {})], c, r, beta=0.1)
    with pytest.raises(ValueError, match=r"\(link name, weight, params\)"):
        combine([("ipo", 1.0)], c, r, beta=0.1)


# --- registry and argument errors ----------------------------------------------------------------


def test_registry_is_one_dict_with_one_list_of_names_and_errors_list_it():
    assert LINK_NAMES == tuple(LINKS) == tuple(REF)
    assert all(LINKS[n].name == n and LINKS[n].fn is getattr(links, n) for n in LINK_NAMES)
    c, r = random_pairs(5, n=4)
    for call in (
        lambda: get_link("dpo"),
        lambda: link_loss("kto", c, r, beta=0.1),
        lambda: combine([("x", 1, {})], c, r, beta=0.1),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert "valid links: " + ", ".join(LINK_NAMES) in str(e.value)


def test_options_come_from_the_signatures():
    assert LINKS["sigmoid"].options == {"eps": 0.0}
    assert LINKS["exo_pair"].options == {"eps": 1e-3}
    assert LINKS["hinge"].options == {"delta": 1.0}
    assert LINKS["robust"].options == {"eps": links.REQUIRED}
    assert LINKS["bco_pair"].options == {"delta": links.REQUIRED}
    assert LINKS["ipo"].options == {} and LINKS["sppo_hard"].options == {}


def test_bad_hyperparameters_are_refused_with_the_reason():
    c, r = random_pairs(6, n=4)
    with pytest.raises(ValueError, match=r"unknown parameters \['label_smoothing'\]; valid parameters: eps"):
        link_loss("sigmoid", c, r, beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="valid parameters: none"):
        link_loss("ipo", c, r, beta=0.1, tau=0.1)
    with pytest.raises(ValueError, match="needs delta .*running mean"):
        link_loss("bco_pair", c, r, beta=0.1)
    with pytest.raises(ValueError, match="needs eps"):
        link_loss("robust", c, r, beta=0.1)
    for name, eps in (("sigmoid", 0.5), ("robust", 0.5), ("robust", -0.1), ("exo_pair", 0.0), ("exo_pair", 1.0)):
        with pytest.raises(ValueError, match="eps must lie in"):
            link_loss(name, c, r, beta=0.1, eps=eps)
    for beta in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="beta must be"):
            link_loss("ipo", c, r, beta=beta)
    with pytest.raises(ValueError, match="per-pair"):
        link_loss("sigmoid", c[:, None], r[:, None], beta=0.1)
    with pytest.raises(ValueError, match="per-pair"):
        link_loss("sigmoid", c, r[:3], beta=0.1)
    with pytest.raises(ValueError, match="scalar or per pair"):
        link_loss("bco_pair", c, r, beta=0.1, delta=torch.zeros(3))


def test_bco_delta_per_pair_and_detached():
    c, r = random_pairs(8, n=5)
    c.requires_grad_()
    delta = torch.linspace(-1, 1, 5, dtype=torch.float64, requires_grad=True)
    out = link_loss("bco_pair", c, r, beta=0.5, delta=delta)
    with localcontext(DEC):
        want = [
            f_bco_pair(Decimal(ci), Decimal(ri), Decimal(0.5), Decimal(di))
            for ci, ri, di in zip(c.tolist(), r.tolist(), delta.tolist())
        ]
    torch.testing.assert_close(
        out.detach(), torch.tensor([float(w) for w in want], dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    (g,) = torch.autograd.grad(out.sum(), [delta], allow_unused=True)
    assert g is None  # the running mean is a constant of the step


def test_module_imports_nothing_from_midpo():
    tree = ast.parse(Path(links.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] == "midpo"], imported
