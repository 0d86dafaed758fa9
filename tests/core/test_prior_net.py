"""MI-DPO proper: the learnable prior network (midpo.train.prior_engine.PriorNetwork), in one process on a
plain-PyTorch stand-in of its engine (tests/support/prior_helpers.TorchEngine).

Independent references: DPO through the DPO prior (step-0 equality, bit-exact), KL / log-probs from a
plain full-sequence forward with a full-vocab log_softmax (no chunking, no packing), a LlamaForCausalLM
built from a k-layer config and loaded with the reference's first-k-layer weights (truncation).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from prior_helpers import BETA, BOS, PAD, V, independent, llama, mean, rows, torch_prior, train_step

from midpo.config import LossConfig, PriorNetConfig
from midpo.core.batching import collate_pairs
from midpo.core.logprobs import response_logps
from midpo.core.prior_net import prior_batch, prior_from_model, truncate_layers
from midpo.core.priors import PriorInputs, SidePair, build_prior, check_needs, compute_loss


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is ~10x faster than contended two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    ref = llama(0, layers=2, scale=8.0)
    policy = llama(1, layers=2, scale=8.0)
    policy.requires_grad_(True)  # the policy forward needs grad for the prior's forward to see a training step
    return {"ref": ref, "policy": policy}


# ---------------------------------------------------------------------------------------------
# step 0: MI-DPO with a prompt-conditioned prior == reference copy is exactly DPO


@pytest.mark.parametrize("layout", ["packed", "padded", "shared"])
def test_step0_equals_dpo_loss_and_gradients(models, layout):
    ref = models["ref"]
    policy = copy.deepcopy(models["policy"])  # != reference, so the rewards (and gradients) are not trivial
    batch = collate_pairs(rows(4, seed=3), layout=layout, pad_id=PAD)
    cfg = LossConfig(prior="dpo", beta=BETA)

    pol = response_logps(policy, batch, return_logits=True)
    with torch.no_grad():
        ref_lp = response_logps(ref, batch)
    dpo = compute_loss(build_prior(cfg), PriorInputs(policy=pol, ref=ref_lp), cfg)
    dpo.losses.mean().backward()
    g_dpo = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)

    prior = prior_from_model(ref)
    hook = torch_prior(prior, PriorNetConfig(condition_on_prompt=True, lr=1e-2), beta=BETA, pad_id=PAD)
    lcfg = LossConfig(prior="learned", beta=BETA)
    learned = build_prior(lcfg)
    pol = response_logps(policy, batch, return_logits=True)
    zeta, prior_loss = hook.forward(batch, pol, update=hook.update_due(1))  # the prior's objective (update at step 1)
    hook.engine.backward(prior_loss)
    mi = compute_loss(learned, PriorInputs(policy=pol, prior_logps=zeta), lcfg)
    mi.losses.mean().backward()
    g_mi = {n: p.grad.clone() for n, p in policy.named_parameters()}

    assert torch.equal(mi.losses, dpo.losses)
    assert float(dpo.losses.detach().mean() - math.log(2)) != 0.0  # rewards differ from 0: a non-trivial comparison
    for n in g_dpo:
        assert torch.equal(g_mi[n], g_dpo[n]), n
    assert sum(float(g.abs().sum()) for g in g_dpo.values()) > 0

    # The prior really moves after step 1, and the next MI-DPO loss then differs from DPO's.
    before = [p.detach().clone() for p in prior.parameters()]
    hook.engine.step()
    hook.end_step(1, updated=True)
    assert any(not torch.equal(a, p) for a, p in zip(before, prior.parameters()))
    with torch.no_grad():
        pol = response_logps(policy, batch)
        mi2 = compute_loss(learned, PriorInputs(policy=pol, prior_logps=hook.forward(batch, pol, update=False)[0]),
                           lcfg)
    assert not torch.allclose(mi2.losses, dpo.losses.detach())


# ---------------------------------------------------------------------------------------------
# marginal objective


def test_marginal_drives_kl_down_and_prior_stays_normalized(models):
    policy = models["policy"]
    prior = prior_from_model(models["ref"], num_layers=1)  # unconditioned, first layer of the reference
    hook = torch_prior(prior, PriorNetConfig(objective="marginal", lr=1e-2), beta=BETA, pad_id=PAD)
    rs = rows(6, seed=5)
    batch = collate_pairs(rs, layout="packed", pad_id=PAD)

    ind0 = independent(policy, prior, rs)
    m1 = train_step(hook, policy, batch, 1)
    # The prior's metrics against the independent full-vocab computation (before the first update).
    n_tok = int(batch.response_lens.sum())
    assert m1["prior/kl_policy"][1] == n_tok
    assert float(m1["prior/kl_policy"][0]) == pytest.approx(float(ind0["kl"].sum()), rel=1e-5)
    assert float(m1["prior/nll"][0]) == pytest.approx(-float((ind0["zw"] + ind0["zl"]).sum()), rel=1e-5)
    mi = torch.cat([ind0["pw"] - ind0["zw"], ind0["pl"] - ind0["zl"]]).mean()
    assert mean(m1, "mi/estimate") == pytest.approx(float(mi), rel=1e-5)
    assert mean(m1, "prior/loss") == pytest.approx(float(ind0["kl"].mean()), rel=1e-5)  # per-pair sum, mean
    assert mean(m1, "prior/lr") == pytest.approx(1e-2)
    assert 0 < mean(m1, "prior/entropy") < math.log(V)

    for step in range(2, 31):
        train_step(hook, policy, batch, step)
    assert hook.updates == 30
    ind = independent(policy, prior, rs)
    kl0, kl30 = float(ind0["kl"].sum()), float(ind["kl"].sum())
    assert kl30 < kl0 / 4, (kl0, kl30)

    # Normalized LM: at sampled contexts, zeta(v | context) from the prior's own forward path sums to 1 over v.
    for r in rs[:2]:
        prefix = r["chosen_ids"][:2]
        cands = [{"prompt_ids": [BOS, 7], "chosen_ids": prefix + [v], "rejected_ids": prefix + [v]} for v in range(V)]
        pb = hook.batch(collate_pairs(cands, layout="padded", pad_id=PAD))  # padded: 2V short rows
        with torch.no_grad():
            logp = hook.engine(pb, ())[0]
        last = torch.cumsum(pb.response_lens[:V], 0) - 1  # the candidate token of each chosen sequence
        total = torch.logsumexp(logp[last].double(), 0)
        assert abs(float(total)) < 1e-5


# ---------------------------------------------------------------------------------------------
# joint objective: the anchor prevents the collapse


def _joint_run(models, anchor: str, weight: float, beta: float = BETA, steps: int = 30) -> dict:
    policy = models["policy"]
    prior = prior_from_model(models["ref"], num_layers=1)
    init = prior_from_model(models["ref"], num_layers=1)
    cfg = PriorNetConfig(objective="joint", anchor=anchor, anchor_weight=weight, lr=1e-2)
    hook = torch_prior(prior, cfg, beta=beta, pad_id=PAD, init_model=init if anchor == "kl_init" else None)
    rs = rows(6, seed=7)
    batch = collate_pairs(rs, layout="packed", pad_id=PAD)
    z0 = independent(policy, prior, rs)
    for step in range(1, steps + 1):
        train_step(hook, policy, batch, step)
    z = independent(policy, prior, rs)
    return {"dzw": z["zw"] - z0["zw"], "dzl": z["zl"] - z0["zl"], "gap": z["zw"] - z["zl"],
            "dgap": (z["zw"] - z["zl"]) - (z0["zw"] - z0["zl"])}


@pytest.fixture(scope="module")
def joint_runs(models) -> dict:
    """J alone (anchor_weight 0), J + anchor, and the anchor alone (beta = 1e-9: J's gradient ~ 0)."""
    return {
        "free": _joint_run(models, "nll", 0.0),
        "nll": _joint_run(models, "nll", 1.0),
        "nll_only": _joint_run(models, "nll", 1.0, beta=1e-9),
        "kl": _joint_run(models, "kl_init", 1.0),
        "kl_only": _joint_run(models, "kl_init", 1.0, beta=1e-9),
    }


def test_joint_without_anchor_collapses(joint_runs):
    """J alone pulls each winner token's log zeta down and each loser token's up (a * sigmoid(-m) per
    token) with no counter-force: the prior moves its mass from y_w to y_l without limit."""
    free = joint_runs["free"]
    assert float(free["dzw"].max()) < -10.0, free
    assert float(free["dgap"].max()) < -20.0, free


def test_joint_nll_anchor_prevents_collapse(joint_runs):
    """NLL anchor, lambda = 1 > a = 0.1. Per token (context-wise view), the winner's net pull is
    lambda - a*sigmoid(-m) >= lambda - a > 0 and the loser's lambda + a*sigmoid(-m) <= lambda + a: both
    rise, J changes each rate by at most a/lambda = 10% relative to the anchor alone. Bound: the gap
    differs from the anchor-only run's by at most (a/lambda) * (|dzw| + |dzl|) of that run (per pair),
    and the winner's log zeta never falls. The unanchored run violates the same bound."""
    anch, only, free = joint_runs["nll"], joint_runs["nll_only"], joint_runs["free"]
    assert float(anch["dzw"].min()) >= 0.0, anch
    bound = (BETA / 1.0) * (only["dzw"].abs() + only["dzl"].abs())
    assert bool(((anch["gap"] - only["gap"]).abs() <= bound).all()), (anch["gap"] - only["gap"], bound)
    assert not bool(((free["gap"] - only["gap"]).abs() <= bound).any())


def test_joint_kl_init_anchor_limits_the_collapse(joint_runs):
    """KL(init || zeta) anchor, lambda = 1: context-wise, a winner token survives iff
    lambda * zeta_init(y_t) > a * sigmoid(-m). Near-uniform init tokens (zeta_init << a/lambda) lose
    mass until the margin has grown enough to shrink sigmoid(-m): the collapse is limited, not
    prevented (use anchor=nll, or anchor_weight >= a / min zeta_init, to prevent it). Asserted: the
    anchor alone keeps the gap (within 2 nats), and with J the gap falls less than half as far as
    without the anchor."""
    anch, only, free = joint_runs["kl"], joint_runs["kl_only"], joint_runs["free"]
    assert float(only["dgap"].abs().max()) < 2.0, only
    assert float(anch["dgap"].mean()) > 0.5 * float(free["dgap"].mean()), (anch["dgap"], free["dgap"])
    assert float(anch["dgap"].mean()) < -1.0  # the limited collapse is real: the documented caveat holds


# ---------------------------------------------------------------------------------------------
# layer truncation, schedule, checkpoint round trip, the learned prior's contract


@pytest.mark.parametrize("tied", [False, True])
def test_first_k_layers_init(tied):
    from transformers import LlamaForCausalLM

    ref = llama(11, layers=3, tied=tied)
    prior = prior_from_model(ref, num_layers=2)
    assert len(prior.model.layers) == 2 and prior.config.num_hidden_layers == 2
    assert len(ref.model.layers) == 3 and ref.config.num_hidden_layers == 3  # the reference is untouched
    rsd, psd = ref.state_dict(), prior.state_dict()
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(psd[k], rsd[k]), k
        assert psd[k].data_ptr() != rsd[k].data_ptr()  # a copy: training the prior leaves the reference alone
    assert set(psd) == {k for k in rsd if not k.startswith("model.layers.2.")}
    # Independent construction: a 2-layer model from config, loaded with the reference's first-2-layer weights.
    c2 = copy.deepcopy(ref.config)
    c2.num_hidden_layers = 2
    if getattr(c2, "layer_types", None):
        c2.layer_types = c2.layer_types[:2]
    other = LlamaForCausalLM(c2)
    other.load_state_dict({k: v for k, v in rsd.items() if k in other.state_dict()}, strict=True)
    ids = torch.tensor([[BOS, 5, 9, 44, 3]])
    with torch.no_grad():
        assert torch.equal(prior(input_ids=ids).logits, other(input_ids=ids).logits)
    with pytest.raises(ValueError, match="num_layers"):
        truncate_layers(copy.deepcopy(ref), 4)


def test_schedule_update_every_start_step_warmup(models):
    policy = models["policy"]
    prior = prior_from_model(models["ref"], num_layers=1)
    cfg = PriorNetConfig(lr=1e-2, update_every=2, start_step=1, warmup_steps=2)
    hook = torch_prior(prior, cfg, beta=BETA, pad_id=PAD)
    batch = collate_pairs(rows(2, seed=9), layout="packed", pad_id=PAD)
    changed, lrs = [], []
    for step in range(1, 7):
        before = [p.detach().clone() for p in prior.parameters()]
        m = train_step(hook, policy, batch, step)
        changed.append(any(not torch.equal(a, p) for a, p in zip(before, prior.parameters())))
        lrs.append(mean(m, "prior/lr") if "prior/lr" in m else None)
    assert changed == [False, True, False, True, False, True]  # steps 2, 4, 6
    # the trainer asks the policy forward for logits exactly on the marginal objective's update steps
    assert [hook.logits_due(s) for s in range(1, 7)] == [False, True, False, True, False, True]
    joint = torch_prior(prior_from_model(models["ref"], num_layers=1), PriorNetConfig(objective="joint", anchor="nll"),
                       beta=BETA, pad_id=PAD)
    assert not any(joint.logits_due(s) for s in range(1, 7))
    assert lrs == [None, pytest.approx(5e-3), None, pytest.approx(1e-2), None, pytest.approx(1e-2)]
    assert hook.state_dict() == {"step": 6, "updates": 3}
    # eval (grad disabled): log zeta only, no update, no metrics
    before = [p.detach().clone() for p in prior.parameters()]
    with torch.no_grad():
        pol = response_logps(policy, batch, return_logits=True)
        _, loss = hook.forward(batch, pol, update=True)
    assert loss is None
    assert all(torch.equal(a, p) for a, p in zip(before, prior.parameters()))
    assert hook.end_step(6, updated=None) == {}


def test_checkpoint_round_trip_reproduces_training(models, tmp_path):
    policy = models["policy"]
    batch = collate_pairs(rows(3, seed=13), layout="padded", pad_id=PAD)
    cfg = PriorNetConfig(objective="marginal", lr=1e-2, warmup_steps=3)

    def hook():
        return torch_prior(prior_from_model(models["ref"], num_layers=1), cfg, beta=BETA, pad_id=PAD)

    a = hook()
    for s in (1, 2):
        train_step(a, policy, batch, s)
    saved = copy.deepcopy({"engine": a.engine.state_dict(), "prior": a.state_dict()})  # what a checkpoint holds
    tail_a = [train_step(a, policy, batch, s) for s in (3, 4)]
    b = hook()
    b.engine.load_state_dict(saved["engine"])
    b.load_state_dict(saved["prior"])
    assert b.state_dict() == {"step": 2, "updates": 2}
    tail_b = [train_step(b, policy, batch, s) for s in (3, 4)]
    for ma, mb in zip(tail_a, tail_b):
        assert set(ma) == set(mb)
        for k in ma:
            assert torch.equal(ma[k], mb[k]), k  # lr included: the warmup schedule resumed too
    for pa, pb in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(pa, pb)


def test_learned_prior_contract(models):
    learned = build_prior(LossConfig(prior="learned"))
    assert learned.beta == 0.1 and learned.needs.prior_network and not learned.needs.needs_reference
    with pytest.raises(ValueError, match="prior_net"):
        check_needs("learned", {"ref_token_logps"})
    check_needs("learned", {"prior_network"})
    batch = collate_pairs(rows(2, seed=1), layout="packed", pad_id=PAD)
    with torch.no_grad():
        pol = response_logps(models["policy"], batch)
    inp = PriorInputs(policy=pol)
    assert "prior_network" not in inp.available()
    with pytest.raises(ValueError, match="prior_net"):
        learned(inp)
    z = SidePair(pol.chosen * 0.5, pol.rejected * 0.5)
    out = learned(PriorInputs(policy=pol, prior_logps=z))
    assert torch.equal(out.chosen, z.chosen) and not out.chosen.requires_grad
    with pytest.raises(ValueError, match="not aligned"):
        learned(PriorInputs(policy=pol, prior_logps=SidePair(pol.chosen[:, :1], pol.rejected)))


def _autograd_terms(head, softcap, h, targets, tgts):
    """The prior's per-chunk terms as plain autograd ops (what a checkpointed chunk differentiated)."""
    logits = head(h).float()  # (m, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    lse = torch.logsumexp(logits, -1)
    logp = logits.gather(-1, targets[:, None])[:, 0] - lse
    logq = logits - lse[:, None]
    ent = -(logq.exp() * logq).sum(-1)
    kls = []
    for x in tgts:
        lp = torch.log_softmax(x.float(), -1)
        kls.append((lp.exp() * (lp - logq)).sum(-1))
    return (logp, ent, *kls)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("objective", ["marginal", "logp_and_kl"])
def test_fused_head_terms_equal_autograd(softcap, objective):
    """prior_net._HeadTerms (values without a graph, closed-form logits gradient, head recomputed in backward;
    the marginal objective's path) == autograd through the same ops (the checkpointed path it replaced):
    values bit-equal, gradients of the hidden states and of the head weight within 1e-6 relative.
    marginal: a weighted sum of KL(policy || zeta); logp_and_kl: log zeta and a second target's KL together
    (the general case the function supports). CPU fp32 (the suite has no GPU)."""
    from midpo.core.prior_net import _HeadTerms

    g = torch.Generator().manual_seed(0)
    m, H = 23, 16
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    h0 = torch.randn(m, H, generator=g)
    targets = torch.randint(0, V, (m,), generator=g)
    tgts = tuple(torch.randn(m, V, generator=g) * 4 for _ in range(1 if objective == "marginal" else 2))
    w = [torch.randn(m, generator=g) for _ in range(3)]

    def run(fn):
        head.zero_grad(set_to_none=True)
        h = h0.clone().requires_grad_(True)
        logp, ent, *kls = fn(head, softcap, h, targets, *tgts)
        loss = (w[0] * kls[0]).sum() if objective == "marginal" else (w[1] * logp).sum() + (w[2] * kls[1]).sum()
        loss.backward()
        return (logp, ent, *kls), h.grad, head.weight.grad

    (v_ref, gh_ref, gw_ref) = run(lambda hd, sc, h, t, *x: _autograd_terms(hd, sc, h, t, x))
    assert float(gw_ref.abs().max()) > 0 and float(gh_ref.abs().max()) > 0
    fused = {}
    for keep in (False, True):  # recompute head(h) in backward / keep softmax(logits) and the targets' p
        fused[keep] = v, gh, gw = run(
            lambda hd, sc, h, t, *x, keep=keep: _HeadTerms.apply(hd(h), hd, sc, h.detach(), t, keep, *x))
        for a, b in zip(v, v_ref):
            assert torch.equal(a.detach(), b.detach())
        assert not v[1].requires_grad  # entropy: a metric, no gradient
        tol = 1e-6
        torch.testing.assert_close(gh, gh_ref, rtol=tol, atol=tol * float(gh_ref.abs().max()))
        torch.testing.assert_close(gw, gw_ref, rtol=tol, atol=tol * float(gw_ref.abs().max()))
    assert torch.equal(fused[True][1], fused[False][1]) and torch.equal(fused[True][2], fused[False][2])


def test_prior_values_do_not_depend_on_the_row_budget(models):
    """The hook packs the unconditioned batch into rows of at most batching.row_tokens_for(prior) tokens
    (quadratic dense-mask attention otherwise): log zeta, entropy and KL equal the one-row layout's."""
    from midpo.core.batching import row_tokens_for
    from midpo.core.prior_net import PriorLM, flat_getter

    prior = PriorLM(prior_from_model(models["ref"], num_layers=1))
    batch = collate_pairs(rows(8, seed=4), layout="packed", pad_id=PAD)
    with torch.no_grad():
        pol = response_logps(models["policy"], batch, return_flat_logits=True)
        outs = []
        for cap in (None, 12):
            pb = prior_batch(batch, condition_on_prompt=False, bos_id=BOS, pad_id=PAD, max_row_tokens=cap)
            outs.append(prior(pb, (flat_getter(pol.logits),)))
    assert pb.input_ids.shape[0] > 1  # really several rows
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert row_tokens_for(prior) == 512  # sdpa: the trainer's packed-row budget


def test_unconditioned_layout_is_bos_plus_response():
    rs = rows(3, seed=2)
    for layout in ("packed", "padded", "shared"):
        b = collate_pairs(rs, layout=layout, pad_id=PAD)
        pb = prior_batch(b, condition_on_prompt=False, bos_id=BOS, pad_id=PAD)
        want = collate_pairs([{**r, "prompt_ids": [BOS]} for r in rs], layout=layout, pad_id=PAD)
        assert torch.equal(pb.input_ids, want.input_ids) and torch.equal(pb.response_seq, b.response_seq)
        assert torch.equal(pb.response_pos, b.response_pos)
        assert prior_batch(b, condition_on_prompt=True, bos_id=None, pad_id=PAD) is b
        with pytest.raises(ValueError, match="bos_token_id"):
            prior_batch(b, condition_on_prompt=False, bos_id=None, pad_id=PAD)


def test_prior_chunks_are_equalized_over_ranks():
    """Under ZeRO-3 every head call is a collective: given the largest rank's per-side token counts, each side
    is cut into exactly ceil(max / chunk) chunks (some may be empty), covering its tokens once, in order,
    never straddling chosen/rejected; the prior's values do not depend on the cut."""
    from midpo.core.prior_net import PriorLM, _ranges, _side_token_counts

    batch = collate_pairs(rows(3, seed=5), layout="packed", pad_id=PAD)
    nc, nr = _side_token_counts(batch)
    for mx in ((nc, nr), (nc + 9, nr + 17), (3 * nc, 1)):
        r = _ranges(batch, 4, (max(mx[0], nc), max(mx[1], nr)))
        kc, kr = -(-max(mx[0], nc) // 4), -(-max(mx[1], nr) // 4)
        assert len(r) == kc + kr
        assert r[:kc][0][0] == 0 and r[kc - 1][1] == nc and r[kc][0] == nc and r[-1][1] == nc + nr
        assert all(a[1] == b[0] for a, b in zip(r, r[1:]))  # contiguous, in order
        assert all(0 <= e - s <= 4 for s, e in r)  # never above chunk_size: memory stays bounded
    model = llama(0)
    a = PriorLM(model, chunk_size=4)(prior_batch(batch, condition_on_prompt=True, bos_id=1, pad_id=PAD))
    b = PriorLM(model, chunk_size=1024)(prior_batch(batch, condition_on_prompt=True, bos_id=1, pad_id=PAD))
    for x, y in zip(a, b):
        # a few fp32 ulps: the GEMM kernel's blocking depends on the row count (4 vs all) and on the CPU
        # (seen: 1.9e-6 on values near 5, i.e. 4 ulps, on one machine type and 0 on another)
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
