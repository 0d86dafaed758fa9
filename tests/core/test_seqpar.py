"""Sequence parallelism's pure parts (core.seqpar, PairBatch.dense_mask, the group layout, the refusals), each
against an independent formula; the distributed equality runs in tests/train/test_train.py (sp_check)."""

from __future__ import annotations

import types

import pytest
import torch
from train_helpers import make_rows

from midpo.config import Config
from midpo.core.batching import collate_pairs
from midpo.core.seqpar import SeqShard, gather_in_order, owners, shard_inputs, spans


def test_spans_cover_exactly_with_the_given_count():
    for n, calls in [(0, 3), (1, 3), (7, 3), (9, 3), (5, 1), (1024, 2)]:
        s = spans(n, calls)
        assert len(s) == calls
        assert s[0][0] == 0 and s[-1][1] == n and all(a[1] == b[0] for a, b in zip(s, s[1:]))
        sizes = [e - b for b, e in s]
        assert max(sizes) - min(sizes) <= 1


def test_owners_and_local_index_by_a_loop():
    R, T, k = 3, 12, 4
    idx = torch.randperm(R * T)[:20]
    owner, local = owners(idx, T, k)
    for f, o, loc in zip(idx.tolist(), owner.tolist(), local.tolist()):
        row, col = divmod(f, T)
        assert o == col // (T // k)
        assert loc == row * (T // k) + col % (T // k)
    with pytest.raises(ValueError, match="pad_to_multiple=5"):
        owners(idx, T, 5)


def test_shard_inputs_cut_columns_and_keep_masks_whole():
    b = collate_pairs(make_rows(3, 0), layout="packed", pad_id=0, pad_to_multiple=2)
    kw = b.model_inputs("sdpa", dense=True)
    T = b.input_ids.shape[1]
    for r in range(2):
        got = shard_inputs(kw, SeqShard(r, 2, None))
        assert torch.equal(got["input_ids"], b.input_ids[:, r * T // 2:(r + 1) * T // 2])
        assert torch.equal(got["position_ids"], b.position_ids[:, r * T // 2:(r + 1) * T // 2])
        assert got["attention_mask"] is kw["attention_mask"] and kw["attention_mask"].shape[-2:] == (T, T)


def test_gather_in_order_restores_target_order():
    """Two ranks simulated in one process: each scores its positions; a fake gather concatenates in rank order."""
    T, k = 10, 2
    logit_index = torch.tensor([3, 7, 1, 12, 18, 5, 14, 9])
    values = torch.arange(8, dtype=torch.float32) * 1.5
    owner, _ = owners(logit_index, T, k)
    pieces = [values[owner == r] for r in range(k)]
    fake = lambda local, counts: torch.cat(pieces)  # noqa: E731
    assert torch.equal(gather_in_order(pieces[0], owner, SeqShard(0, k, fake)), values)


@pytest.mark.parametrize("window", [None, 3])
def test_padded_dense_mask_is_causal_over_real_keys(window):
    b = collate_pairs(make_rows(3, 1), layout="padded", pad_id=0)
    m = b.dense_mask(window=window)[:, 0]
    am, pos = b.attention_mask, b.position_ids
    R, T = am.shape
    for r in range(R):
        for q in range(T):
            for kk in range(T):
                want = kk <= q and bool(am[r, kk]) and (window is None or int(pos[r, q] - pos[r, kk]) < window)
                assert bool(m[r, q, kk]) == want


def test_dense_inputs_refuse_flash_attention():
    b = collate_pairs(make_rows(2, 0), layout="packed", pad_id=0)
    with pytest.raises(ValueError, match="flash-attn"):
        b.model_inputs("flash_attention_2", dense=True)


def test_group_layout_and_global_batch():
    from midpo.runtime.seqpar import layout
    from midpo.train.resume import global_batch

    assert [layout(4, 2, r) for r in range(4)] == [(0, 0, 2), (1, 0, 2), (0, 1, 2), (1, 1, 2)]
    with pytest.raises(ValueError, match="must divide"):
        layout(3, 2, 0)
    cfg = Config()
    cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.sequence_parallel = 2, 3, 2
    assert global_batch(cfg, 8) == 2 * 3 * 4  # data-parallel ranks = processes / k


def _needs(**kw):
    base = dict(prior_network=False, policy_full_vocab=False, ref_full_vocab=False, ref_hidden_states=False)
    return types.SimpleNamespace(name="x", needs=types.SimpleNamespace(**{**base, **kw}))


def test_refusals_name_the_key():
    from midpo.train.trainer import TrainError, check_sequence_parallel

    cfg = Config()
    cfg.train.sequence_parallel = 2
    check_sequence_parallel(cfg, _needs(), online=False)  # plain DPO: served
    check_sequence_parallel(cfg, _needs(ref_full_vocab=True), online=False)  # no online reference: nothing asked
    for needs, what in [(_needs(prior_network=True), "loss.prior=learned"),
                        (_needs(policy_full_vocab=True), "full-vocab"),
                        (_needs(ref_hidden_states=True), "hidden states")]:
        with pytest.raises(TrainError, match=what):
            check_sequence_parallel(cfg, needs, online=True)
    cfg.train.compile = True
    with pytest.raises(TrainError, match="train.compile"):
        check_sequence_parallel(cfg, _needs(), online=False)


def test_install_refuses_heads_the_group_does_not_divide_and_flash():
    from transformers import LlamaConfig, LlamaForCausalLM

    from midpo.runtime.seqpar import SeqGroups, install

    def model(heads, kv, attn="sdpa"):
        c = LlamaConfig(vocab_size=16, hidden_size=24, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=heads, num_key_value_heads=kv)
        c._attn_implementation = "sdpa"
        m = LlamaForCausalLM(c)
        m.config._attn_implementation = attn  # as a run resolving to flash-attn would have it
        return m

    sp = SeqGroups(size=2, rank=0, group=None, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match=r"key/value heads \(1\)"):
        install(model(4, 1), sp)
    with pytest.raises(ValueError, match="sdpa"):
        install(model(4, 2, "flash_attention_2"), sp)
    m = model(4, 2)
    install(m, sp)
    assert m.config._attn_implementation == "midpo_ulysses"
    assert sum(hasattr(x, "_midpo_sp") for x in m.modules()) == 1  # the one attention module
    assert not any("_midpo_sp" in k for k in m.state_dict())


def test_shard_forward_refuses_extras():
    from midpo.core.logprobs import response_logps

    b = collate_pairs(make_rows(2, 0), layout="packed", pad_id=0, pad_to_multiple=2)
    with pytest.raises(ValueError, match="log-probs only"):
        response_logps(None, b, shard=SeqShard(0, 2, None), return_logits=True)


def test_dense_inputs_drop_the_mask_only_for_one_causal_sequence_per_row():
    rows = make_rows(3, 2)
    padded = collate_pairs(rows, layout="padded", pad_id=0)
    alone = collate_pairs(rows, layout="packed", pad_id=0, max_row_tokens=1)  # every sequence its own row
    packed = collate_pairs(rows, layout="packed", pad_id=0)  # one row of 6 sequences
    shared = collate_pairs(rows, layout="shared", pad_id=0)
    assert padded.causal_rows and alone.causal_rows and not packed.causal_rows and not shared.causal_rows
    for b in (padded, alone):
        assert "attention_mask" not in b.model_inputs("sdpa", dense=True)
        assert "attention_mask" in b.model_inputs("sdpa", dense=True, windows={"sliding_attention": 4})
    for b in (packed, shared):
        assert b.model_inputs("sdpa", dense=True)["attention_mask"].shape[-1] == b.input_ids.shape[1]
