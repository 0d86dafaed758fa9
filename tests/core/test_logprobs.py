"""Per-token response log-probs: chunked == naive, packed == padded == one sequence at a time,
and packed sequences cannot see each other (tiny Llama, sdpa, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from midpo.core.batching import collate_pairs
from midpo.core.logprobs import (
    ResponseLogps,
    per_token_kl,
    response_logps,
    selective_log_softmax,
    sequence_logps_naive,
    split_flat,
    topk_logprobs,
)

V, PAD, EOS = 160, 0, 2


def tiny_llama(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def make_rows(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(3, V, (k,), generator=g).tolist()

    lens = [(4, 6, 3), (7, 2, 5), (3, 5, 1)][:n]
    return [
        {"prompt_ids": [1] + ids(p), "chosen_ids": ids(c) + [EOS], "rejected_ids": ids(r) + [EOS]} for p, c, r in lens
    ]


def naive_side(model, rows, side):
    return [sequence_logps_naive(model, r["prompt_ids"], r[f"{side}_ids"]) for r in rows]


def test_chunked_helpers_equal_naive():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 33, generator=g)
    other = torch.randn(5, 7, 33, generator=g)
    idx = torch.randint(0, 33, (5, 7), generator=g)
    lsm = torch.log_softmax(logits, -1)
    for cs in (1, 3, 1024):
        torch.testing.assert_close(selective_log_softmax(logits, idx, cs), lsm.gather(-1, idx[..., None])[..., 0])
        naive_kl = (lsm.exp() * (lsm - torch.log_softmax(other, -1))).sum(-1)
        torch.testing.assert_close(per_token_kl(logits, other, cs), naive_kl)
        vals, ind, tail = topk_logprobs(logits, 4, cs)
        want_v, want_i = lsm.topk(4, -1)
        torch.testing.assert_close(vals, want_v)
        assert torch.equal(ind, want_i)
        torch.testing.assert_close(tail, torch.log(1 - want_v.exp().sum(-1)))
    assert selective_log_softmax(logits.bfloat16(), idx).dtype == torch.float32


@pytest.mark.parametrize("layout,row_tokens", [("packed", None), ("packed", 1), ("packed", 24), ("padded", None),
                                               ("shared", None)])
def test_response_logps_equals_single_sequence_forward(model, layout, row_tokens):
    """row_tokens: packed into one row (None), one sequence per row (1), or several rows of <= 24 tokens."""
    rows = make_rows()
    b = collate_pairs(rows, layout=layout, pad_id=PAD, pad_to_multiple=8, max_row_tokens=row_tokens)
    if row_tokens == 24:
        assert 1 < b.input_ids.shape[0] < 2 * len(rows)  # really several multi-sequence rows
    with torch.no_grad():
        out = response_logps(model, b, chunk_size=5)  # chunks straddle sequences
        want_c, want_r = naive_side(model, rows, "chosen"), naive_side(model, rows, "rejected")
    for i in range(len(rows)):
        n_c, n_r = len(rows[i]["chosen_ids"]), len(rows[i]["rejected_ids"])
        assert out.chosen_mask[i].sum() == n_c and out.rejected_mask[i].sum() == n_r
        torch.testing.assert_close(out.chosen[i, :n_c], want_c[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.rejected[i, :n_r], want_r[i], rtol=0, atol=1e-5)
        assert torch.all(out.chosen[i, n_c:] == 0) and torch.all(out.rejected[i, n_r:] == 0)


@pytest.mark.parametrize("row_tokens", [None, 24])
def test_packed_equals_padded_values_and_gradients(model, row_tokens):
    """Also across the head's two paths: packed runs it in checkpointed chunks of 4 positions, padded as one
    chunk (all positions fit; no checkpoint, no recompute)."""
    rows = make_rows(1)
    res = {}
    for layout in ("packed", "padded"):
        model.zero_grad()
        batch = collate_pairs(rows, layout=layout, pad_id=PAD, max_row_tokens=row_tokens if layout == "packed" else None)
        out = response_logps(model, batch, chunk_size=4 if layout == "packed" else 1024)
        wc = torch.randn(out.chosen.shape, generator=torch.Generator().manual_seed(2))
        loss = (out.chosen * wc).sum() - out.rejected.sum()
        loss.backward()
        res[layout] = (
            out.chosen.detach(),
            out.rejected.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters()},
        )
    (pc, pr, pg), (qc, qr, qg) = res["packed"], res["padded"]
    torch.testing.assert_close(pc, qc, rtol=0, atol=1e-5)
    torch.testing.assert_close(pr, qr, rtol=0, atol=1e-5)
    assert pg.keys() == qg.keys()
    for n in pg:
        torch.testing.assert_close(pg[n], qg[n], rtol=1e-4, atol=1e-5, msg=n)
    assert pg["lm_head.weight"].abs().max() > 0 and pg["model.layers.0.self_attn.q_proj.weight"].abs().max() > 0
    model.zero_grad()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_equals_padded_values_and_gradients(attn):
    """The shared-prompt layout (prompt once, both responses after it) gives the padded layout's per-token
    log-probs and parameter gradients: the prompt's gradient arrives once with both sides' contributions
    summed instead of through two copies. eager: the additive form of its mask."""
    model = tiny_llama(attn, seed=5)
    rows = make_rows(4)
    res = {}
    for layout in ("shared", "padded"):
        model.zero_grad()
        batch = collate_pairs(rows, layout=layout, pad_id=PAD, pad_to_multiple=8)
        out = response_logps(model, batch, chunk_size=4)
        wc = torch.randn(out.chosen.shape, generator=torch.Generator().manual_seed(2))
        ((out.chosen * wc).sum() - 2 * out.rejected.sum()).backward()
        res[layout] = (out.chosen.detach(), out.rejected.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                       batch)
    (sc, sr, sg, sb), (pc, pr, pg, pb) = res["shared"], res["padded"]
    torch.testing.assert_close(sc, pc, rtol=0, atol=1e-5)
    torch.testing.assert_close(sr, pr, rtol=0, atol=1e-5)
    for n in pg:
        torch.testing.assert_close(sg[n], pg[n], rtol=1e-4, atol=1e-5, msg=n)
    assert pg["model.layers.0.self_attn.q_proj.weight"].abs().max() > 0
    # the saving: each prompt is in the forward once
    assert pb.num_tokens - sb.num_tokens == sum(len(r["prompt_ids"]) for r in rows)


def test_shared_prompt_rejected_cannot_see_chosen(model):
    """Perturb pair 0's chosen response: its rejected log-probs (after the chosen tokens in the same row) do
    not move, and neither does anything of pair 1; without the shared mask (plain causal) they would."""
    rows = make_rows(6)
    bumped = [dict(r) for r in rows]
    bumped[0]["chosen_ids"] = [(t + 17) % (V - 3) + 3 for t in rows[0]["chosen_ids"][:-1]] + [EOS]
    with torch.no_grad():
        a = response_logps(model, collate_pairs(rows, layout="shared", pad_id=PAD))
        b = response_logps(model, collate_pairs(bumped, layout="shared", pad_id=PAD))
    assert not torch.allclose(a.chosen[0], b.chosen[0])
    torch.testing.assert_close(a.rejected, b.rejected, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.chosen[1:], b.chosen[1:], rtol=0, atol=1e-6)
    # control: a plain causal mask over the same rows lets the rejected tokens see the chosen ones
    batch = collate_pairs(rows, layout="shared", pad_id=PAD)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits  # causal only
    lp = torch.log_softmax(logits.float().reshape(-1, V), -1)[batch.logit_index]
    leaky = ResponseLogps.from_flat(lp.gather(-1, batch.input_ids.reshape(-1)[batch.target_index][:, None])[:, 0],
                                    batch)
    assert (leaky.rejected - a.rejected).abs().max() > 1e-3
    torch.testing.assert_close(leaky.chosen, a.chosen, rtol=0, atol=1e-5)  # chosen sees only the prompt anyway


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_return_topk_equals_topk_of_the_full_logits_chunk_by_chunk(model, softcap):
    """return_topk (the reference cache's top-k): the same values, ids and tail mass as topk_logprobs over the
    full (N, V) logits, the same log-probs as the plain path, and the head never sees more than one chunk."""
    model.config.final_logit_softcapping = softcap
    try:
        batch = collate_pairs(make_rows(7), layout="packed", pad_id=PAD)
        seen = []
        hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
        with torch.no_grad():
            got = response_logps(model, batch, chunk_size=5, return_topk=4)
            hook.remove()
            full = response_logps(model, batch, return_flat_logits=True)
            plain = response_logps(model, batch, chunk_size=5)
        n = int(batch.response_lens.sum())
        assert max(seen) <= 5 and sum(seen) == n
        vals, ids, tail = topk_logprobs(full.logits, 4)
        torch.testing.assert_close(got.topk_values, vals, rtol=0, atol=1e-5)
        assert torch.equal(got.topk_ids, ids)
        torch.testing.assert_close(got.tail_logmass, tail, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.chosen, plain.chosen, rtol=0, atol=0)
        torch.testing.assert_close(got.rejected, plain.rejected, rtol=0, atol=0)
        with pytest.raises(ValueError, match="no_grad"):
            response_logps(model, batch, return_topk=4)  # grad enabled: refused
    finally:
        model.config.final_logit_softcapping = None


def test_shared_prompt_refuses_flash_attention():
    batch = collate_pairs(make_rows(), layout="shared", pad_id=PAD)
    with pytest.raises(ValueError, match="flash-attn"):
        batch.model_inputs("flash_attention_2")


@pytest.mark.parametrize("row_tokens", [None, 24])
def test_packed_sequences_cannot_see_each_other(model, row_tokens):
    """Perturb the first sequence of the pack (chosen of pair 0): every other sequence's log-probs stay
    the same with the block mask, and change without it when a KV cache is built (see the control)."""
    rows = make_rows(2)
    bumped = [dict(r) for r in rows]
    bumped[0]["chosen_ids"] = [(t + 17) % (V - 3) + 3 for t in rows[0]["chosen_ids"][:-1]] + [EOS]
    with torch.no_grad():
        a = response_logps(model, collate_pairs(rows, layout="packed", pad_id=PAD, max_row_tokens=row_tokens))
        b = response_logps(model, collate_pairs(bumped, layout="packed", pad_id=PAD, max_row_tokens=row_tokens))
    assert not torch.allclose(a.chosen[0], b.chosen[0])
    torch.testing.assert_close(a.chosen[1:], b.chosen[1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(a.rejected, b.rejected, rtol=0, atol=1e-6)

    # Control: transformers 5.24 infers packing from position_ids only when no KV cache is built
    # (use_cache=False). With a cache (use_cache=True) position_ids alone leak across sequences,
    # while the block mask from model_inputs still isolates them.
    def forward(rs, with_mask):
        batch = collate_pairs(rs, layout="packed", pad_id=PAD)
        kw = (
            batch.model_inputs("sdpa")
            if with_mask
            else {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
        )
        with torch.no_grad():
            logits = model(**kw, use_cache=True).logits[0]  # (T, V)
        lp = torch.log_softmax(logits.float(), -1)[batch.logit_index]  # (N, V)
        flat = lp.gather(-1, batch.input_ids[0, batch.target_index][:, None])[:, 0]
        return ResponseLogps.from_flat(flat, batch)

    la, lb = forward(rows, False), forward(bumped, False)
    assert (la.rejected - lb.rejected).abs().max() > 1e-3
    assert (la.rejected - a.rejected).abs().max() > 1e-3  # and it is wrong even unperturbed
    ma, mb = forward(rows, True), forward(bumped, True)
    torch.testing.assert_close(ma.rejected, mb.rejected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ma.rejected, a.rejected, rtol=0, atol=1e-5)


def test_eager_packed_uses_additive_mask():
    eager = tiny_llama("eager")
    rows = make_rows(3, n=2)
    with torch.no_grad():
        out = response_logps(eager, collate_pairs(rows, layout="packed", pad_id=PAD))
        for i, r in enumerate(rows):
            want = sequence_logps_naive(eager, r["prompt_ids"], r["rejected_ids"])
            torch.testing.assert_close(out.rejected[i, : want.numel()], want, rtol=0, atol=1e-5)


def test_logits_and_hidden_extras(model):
    rows = make_rows(4, n=2)
    b = collate_pairs(rows, layout="packed", pad_id=PAD)
    with torch.no_grad():
        out = response_logps(model, b, return_logits=True, return_hidden=True)
        ref_logits = model(input_ids=torch.tensor([rows[1]["prompt_ids"] + rows[1]["rejected_ids"]])).logits[0]
    n_p, n_r = len(rows[1]["prompt_ids"]), len(rows[1]["rejected_ids"])
    torch.testing.assert_close(out.rejected_logits[1, :n_r], ref_logits[n_p - 1 : n_p - 1 + n_r], rtol=0, atol=1e-5)
    assert out.chosen_hidden.shape == (2, out.chosen.shape[1], 2, 64)
    ids0 = torch.tensor(rows[0]["chosen_ids"])
    torch.testing.assert_close(
        selective_log_softmax(out.chosen_logits[0, : ids0.numel()], ids0), out.chosen[0, : ids0.numel()]
    )


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_logits_path_equals_chunked_path_values_and_gradients(softcap):
    """return_logits / return_flat_logits run the head ONCE over all positions and take the log-probs from
    slices of those logits: the same values and gradients as the chunked path (chunks of 4, recomputed in
    backward); the flat logits are the per-side ones, detached, in target order. softcap: the Gemma-style
    final_logit_softcapping, forced onto the tiny Llama's config (both paths read it from there). CPU fp32."""
    model = tiny_llama(seed=3)
    model.config.final_logit_softcapping = softcap
    batch = collate_pairs(make_rows(5), layout="packed", pad_id=PAD)
    wc = torch.randn(batch.num_pairs, int(batch.response_lens[: batch.num_pairs].max()),
                     generator=torch.Generator().manual_seed(4))
    tol = 1e-6
    res = {}
    for name, kw in (("chunked", {}), ("logits", {"return_logits": True}), ("flat", {"return_flat_logits": True})):
        model.zero_grad(set_to_none=True)
        out = response_logps(model, batch, chunk_size=4, **kw)
        ((out.chosen * wc).sum() - out.rejected.sum()).backward()
        res[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (base, g0) = res["chunked"]
    assert base.logits is None and base.chosen_logits is None
    for name in ("logits", "flat"):
        out, g = res[name]
        torch.testing.assert_close(out.chosen, base.chosen, rtol=0, atol=tol)
        torch.testing.assert_close(out.rejected, base.rejected, rtol=0, atol=tol)
        for n in g0:
            torch.testing.assert_close(g[n], g0[n], rtol=10 * tol, atol=tol * max(1.0, float(g0[n].abs().max())),
                                       msg=f"{name}: {n}")
        assert out.logits.shape == (int(batch.response_lens.sum()), V) and not out.logits.requires_grad
        # log-probs recomputed from the returned logits: they are the logits the log-probs came from
        targets = batch.input_ids.reshape(-1)[batch.target_index]
        flat = torch.log_softmax(out.logits.double(), -1).gather(-1, targets[:, None])[:, 0]
        torch.testing.assert_close(ResponseLogps.from_flat(flat, batch).chosen.float(), base.chosen, rtol=0,
                                   atol=max(tol, 1e-5))
    out = res["logits"][0]
    assert out.chosen_logits.requires_grad and res["flat"][0].chosen_logits is None
    (c, _), (r, _) = split_flat(out.logits, batch)
    assert torch.equal(c, out.chosen_logits.detach()) and torch.equal(r, out.rejected_logits.detach())
    if softcap:
        assert float(out.logits.abs().max()) <= softcap


def test_from_lists_left_aligns():
    r = ResponseLogps.from_lists([[-1.0, -2.0], [-3.0]], [[-4.0], [-5.0, -6.0, -7.0]])
    assert r.chosen.tolist() == [[-1.0, -2.0], [-3.0, 0.0]]
    assert r.rejected_mask.tolist() == [[True, False, False], [True, True, True]]
    assert r.rejected_sum.tolist() == [-4.0, -18.0] and r.chosen_len.tolist() == [2, 1]


def equal_length_batch():
    """Three pairs of 10-token sequences (prompts of 3, 5, 7): padded rows without padding."""
    g = torch.Generator().manual_seed(1)
    rows = [{"prompt_ids": [1] + torch.randint(3, V, (p - 1,), generator=g).tolist(),
             "chosen_ids": torch.randint(3, V, (9 - p,), generator=g).tolist() + [EOS],
             "rejected_ids": torch.randint(3, V, (9 - p,), generator=g).tolist() + [EOS]} for p in (3, 5, 7)]
    return collate_pairs(rows, layout="padded", pad_id=PAD)


def test_train_flops_equal_torch_flop_counter():
    """metrics.train_flops (MFU's numerator) == torch's FlopCounterMode on response_logps' forward, x3 for
    forward+backward: body matmuls on every token, the head only on response positions, attention matmuls.
    Equal-length sequences (no padding) and eager attention, which multiplies the full T x T square: the
    causal half is PairBatch.attention_context's job (tested against the masks in test_batching)."""
    from torch.utils.flop_counter import FlopCounterMode

    from midpo.core.flops import flop_params, train_flops

    m = tiny_llama(attn="eager")
    b = equal_length_batch()
    rows_n, T = b.input_ids.shape
    assert b.num_pad_tokens == 0
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        response_logps(m, b)
    body, head = flop_params(m)
    assert head == V * 64 and body == sum(p.numel() for p in m.parameters()) - 2 * V * 64
    cfg = m.config
    # the 6N convention counts the RMSNorm weights like matmul weights (2 FLOPs per token each); torch counts
    # matmuls only: leave them out here so that the comparison is exact
    norms = sum(p.numel() for n, p in m.named_parameters() if "norm" in n)
    expected = train_flops(body - norms, head, cfg.num_hidden_layers, cfg.hidden_size, b.num_tokens, b.target_index.numel(),
                           attention_context=rows_n * T * T)
    assert expected == pytest.approx(3 * fc.get_total_flops(), rel=1e-9)


@pytest.mark.parametrize("lora", [False, True])
def test_train_flops_equal_torch_flop_counter_forward_backward(lora):
    """train_flops against torch's FlopCounterMode over the real forward AND backward: full fine-tuning is 3x the
    forward; under LoRA (PEFT, r=4 on every linear layer, the norms trained as modules_to_save) the frozen base
    weights take no weight-gradient matmul (2x) while the adapters and attention take all three. The embedding
    output is made to require grad so that layer 0 computes its input gradients like every other layer."""
    from torch.utils.flop_counter import FlopCounterMode

    from midpo.core.flops import flop_params, frozen_flop_params, train_flops

    m = tiny_llama(attn="eager")
    if lora:
        from peft import LoraConfig, get_peft_model

        get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["norm"]))
    m.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.detach().requires_grad_())
    b = equal_length_batch()
    rows_n, T = b.input_ids.shape
    with FlopCounterMode(display=False) as fc:
        r = response_logps(m, b)
        (r.chosen_sum.sum() + r.rejected_sum.sum()).backward()
    body, head = flop_params(m)
    frozen_body, frozen_head = frozen_flop_params(m)
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    if lora:  # the base is frozen but for the adapters and the trained norm copies; the tied head is frozen too
        assert frozen_head == head and frozen_body > 0
        assert all("lora_" in n or "modules_to_save" in n for n in trained)
    else:
        assert (frozen_body, frozen_head) == (0, 0)
    cfg = m.config
    # torch counts matmuls only: leave the (elementwise) RMSNorm weights out of both counts
    norms = sum(p.numel() for n, p in m.named_parameters() if "norm" in n and "original_module" not in n)
    frozen_norms = sum(p.numel() for n, p in m.named_parameters()
                       if "norm" in n and "original_module" not in n and not p.requires_grad)
    expected = train_flops(body - norms, head, cfg.num_hidden_layers, cfg.hidden_size, b.num_tokens,
                           b.target_index.numel(), attention_context=rows_n * T * T,
                           frozen_body=frozen_body - frozen_norms, frozen_head=frozen_head)
    assert expected == pytest.approx(fc.get_total_flops(), rel=1e-9)
