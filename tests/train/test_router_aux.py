"""A MoE policy's routers' load-balancing loss in the policy's loss (train.router_aux_loss_coef): the value equals
transformers' own `load_balancing_loss_func` (Switch Transformer) over the forward's real tokens in every layout;
the routers' gradient from the step's loss is the DPO loss's plus coef x the aux loss's; coefficient 0 removes it
(the same gradient as the DPO loss alone, nothing logged); a dense model refuses a coefficient."""

from __future__ import annotations

import pytest
import torch
from families import build_family

from midpo.config import LossConfig
from midpo.core.batching import collate_pairs
from midpo.core.logprobs import ResponseLogps, response_logps
from midpo.core.priors import build_prior
from midpo.runtime.engine import PolicyLogps
from midpo.train.step import ROUTER_METRIC, MicroBatch, Objective, forward_loss, policy_loss
from midpo.train.trainer import TrainError, router_aux_coef

ROWS = [{"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 2], "rejected_ids": [11, 2]},
        {"prompt_ids": [5, 6], "chosen_ids": [9, 10, 12, 13, 2], "rejected_ids": [11, 12, 2]}]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = build_family("qwen2-moe", tmp_path_factory.mktemp("moe") / "m")
    return AutoModelForCausalLM.from_pretrained(str(path))


@pytest.mark.parametrize("layout", ["packed", "padded", "shared"])
def test_router_aux_equals_transformers_load_balancing_loss(moe, layout):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    batch = collate_pairs(ROWS, layout=layout, pad_id=0)
    got = response_logps(moe, batch, router_aux=True).router_aux
    with torch.no_grad():
        kw = batch.model_inputs("sdpa")
        mask2d = batch.token_mask.long()
        out = moe.model(**kw, output_router_logits=True)
    cfg = moe.config
    want = load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, mask2d)
    torch.testing.assert_close(got.detach(), want.float(), atol=1e-6, rtol=1e-6)


def _router_grads(moe, coef: float):
    """Gradients of every router weight from one micro-step's policy loss, with coefficient `coef`; the metrics."""
    policy = PolicyLogps(moe, router_aux=coef > 0).train()
    batch = collate_pairs(ROWS, layout="packed", pad_id=0)
    with torch.no_grad():  # a fixed reference a little off the policy, so the DPO loss has a gradient
        ref = response_logps(moe, batch)
    ref = ResponseLogps(ref.chosen - 0.3 * ref.chosen_mask, ref.chosen_mask, ref.rejected, ref.rejected_mask)
    cfg = LossConfig(prior="dpo", beta=0.1)
    obj = Objective(build_prior(cfg), cfg, router_aux_coef=coef)
    moe.zero_grad(set_to_none=True)
    pol, out, _ = forward_loss(policy, obj, MicroBatch(batch, ref, None, None, ["a", "b"]))
    loss, metrics = policy_loss(obj, pol, out)
    loss.backward()
    return {n: p.grad.clone() for n, p in moe.named_parameters() if "gate.weight" in n and "shared" not in n}, metrics


def test_router_weights_get_the_aux_loss_gradient_and_coef_0_removes_it(moe):
    base, m0 = _router_grads(moe, 0.0)
    assert ROUTER_METRIC not in m0 and base
    coef = 0.5
    with_aux, m1 = _router_grads(moe, coef)
    # the aux loss's own gradient, from transformers' function on a plain forward of the same batch
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    batch = collate_pairs(ROWS, layout="packed", pad_id=0)
    moe.zero_grad(set_to_none=True)
    out = moe.model(**batch.model_inputs("sdpa"), output_router_logits=True)
    aux = load_balancing_loss_func(out.router_logits, moe.config.num_experts, moe.config.num_experts_per_tok,
                                   batch.token_mask.long())
    aux.backward()
    for name, g in base.items():
        aux_grad = dict(moe.named_parameters())[name].grad
        assert aux_grad.abs().max() > 0
        torch.testing.assert_close(with_aux[name], g + coef * aux_grad, atol=1e-6, rtol=1e-5)
    assert m1[ROUTER_METRIC][0] == pytest.approx(float(aux.detach()), rel=1e-5)


def test_coefficient_resolution(moe):
    assert router_aux_coef(None, moe.config) == moe.config.router_aux_loss_coef
    assert router_aux_coef(0.0, moe.config) == 0.0
    assert router_aux_coef(0.3, moe.config) == 0.3
    from transformers import LlamaConfig

    assert router_aux_coef(None, LlamaConfig()) == 0.0
    with pytest.raises(TrainError, match="no mixture-of-experts router"):
        router_aux_coef(0.1, LlamaConfig())
