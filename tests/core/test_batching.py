"""collate_pairs: layouts, index tensors, masks, padding counts."""

from __future__ import annotations

import pytest
import torch

from midpo.core.batching import collate_pairs

PAD = 0
ROWS = [
    {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
    {"prompt_ids": [1, 4], "chosen_ids": [3, 2], "rejected_ids": [10, 11, 12, 2]},
]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_index_tensors_locate_every_response_token(layout):
    b = collate_pairs(ROWS, layout=layout, pad_id=PAD, pad_to_multiple=8)
    seqs = [r["chosen_ids"] for r in ROWS] + [r["rejected_ids"] for r in ROWS]
    flat = b.input_ids.reshape(-1)
    for s, resp in enumerate(seqs):
        sel = b.response_seq == s
        assert flat[b.target_index[sel]].tolist() == resp
        assert b.response_pos[sel].tolist() == list(range(len(resp)))
    # The predicting position is the token just before, in the same sequence: the last prompt token for t = 0.
    first = b.logit_index[b.response_pos == 0]
    assert flat[first].tolist() == [6, 4, 6, 4]
    assert b.num_pairs == 2 and b.num_tokens == 6 + 4 + 5 + 6
    assert b.input_ids.shape[1] % 8 == 0
    assert b.num_pad_tokens == b.input_ids.numel() - b.num_tokens
    assert b.seq_lens.tolist() == [6, 4, 5, 6]


def test_shared_layout_rows_positions_indices_and_mask():
    b = collate_pairs(ROWS, layout="shared", pad_id=PAD, pad_to_multiple=5)
    assert b.input_ids.shape == (2, 10)  # rows of 3+3+2 and 2+2+4 tokens, padded to a multiple of 5
    assert b.input_ids[0, :8].tolist() == [1, 5, 6, 7, 8, 2, 9, 2] and b.input_ids[0, 8:].tolist() == [PAD] * 2
    # rejected positions continue from the prompt's end, as in their own sequence
    assert b.position_ids[0, :8].tolist() == [0, 1, 2, 3, 4, 5, 3, 4]
    assert b.position_ids[1, :8].tolist() == [0, 1, 2, 3, 2, 3, 4, 5]
    flat = b.input_ids.reshape(-1)
    seqs = [r["chosen_ids"] for r in ROWS] + [r["rejected_ids"] for r in ROWS]
    for s, resp in enumerate(seqs):
        sel = b.response_seq == s
        assert flat[b.target_index[sel]].tolist() == resp
    # every response token is predicted by its predecessor in its own sequence: for t = 0 the last prompt token
    first = b.logit_index[b.response_pos == 0]
    assert flat[first].tolist() == [6, 4, 6, 4]
    later = b.response_pos > 0
    assert torch.equal(b.logit_index[later], b.target_index[later] - 1)
    assert b.num_tokens == 8 + 8 and b.num_pad_tokens == 20 - 16
    m = b.shared_prompt_mask()[:, 0]  # (2, 10, 10)
    assert m[0, 6, :3].all() and not m[0, 6, 3:6].any() and m[0, 6, 6]  # rejected: prompt + itself, no chosen
    assert m[0, 5, :6].all() and not m[0, 5, 6:].any()  # chosen EOS: prompt + chosen, causal
    assert m[0, 9, 8:10].all() and not m[0, 9, :8].any()  # padding sees only padding
    assert torch.equal(m, m & torch.ones(10, 10, dtype=torch.bool).tril())


def test_packed_layout_positions_and_block_mask():
    b = collate_pairs(ROWS, layout="packed", pad_id=PAD, pad_to_multiple=8)
    assert b.input_ids.shape == (1, 24) and b.attention_mask is None
    assert b.cu_seqlens.tolist() == [0, 6, 10, 15, 21]
    assert b.position_ids[0].tolist() == [*range(6), *range(4), *range(5), *range(6), *range(3)]
    m = b.block_causal_mask()[0, 0]  # (T, T)
    seg = torch.tensor([0] * 6 + [1] * 4 + [2] * 5 + [3] * 6 + [4] * 3)
    want = (seg[:, None] == seg[None, :]) & (torch.arange(24)[None, :] <= torch.arange(24)[:, None])
    assert torch.equal(m, want)
    add = b.block_causal_mask(torch.float32)[0, 0]
    assert torch.equal(add == 0, want) and add.min() == torch.finfo(torch.float32).min
    assert "attention_mask" not in b.model_inputs("flash_attention_2")
    assert b.model_inputs("sdpa")["attention_mask"].dtype == torch.bool


def test_padded_layout_rows_and_mask():
    b = collate_pairs(ROWS, layout="padded", pad_id=PAD)
    assert b.input_ids.shape == (4, 6) and b.cu_seqlens is None
    assert b.input_ids[3].tolist() == [1, 4, 10, 11, 12, 2]
    assert b.input_ids[1].tolist() == [1, 4, 3, 2, PAD, PAD]
    assert b.attention_mask.sum(-1).tolist() == [6, 4, 5, 6]
    assert b.num_pad_tokens == 24 - 21
    assert b.to("cpu").input_ids.data_ptr() == b.input_ids.data_ptr()


def test_rejects_bad_rows():
    with pytest.raises(ValueError, match="row 1: empty prompt_ids"):
        collate_pairs([ROWS[0], {**ROWS[1], "prompt_ids": []}], pad_id=PAD)
    with pytest.raises(ValueError, match="layout"):
        collate_pairs(ROWS, layout="ragged", pad_id=PAD)


def test_packed_rows_respect_the_budget_and_keep_every_token():
    b = collate_pairs(ROWS, layout="packed", pad_id=PAD, max_row_tokens=11)
    lens = b.seq_lens.tolist()  # [6, 4, 5, 6]: rows {6, 4} {5, 6}
    assert b.input_ids.shape == (2, 11) and b.cu_seqlens is None
    seg = b.segment_ids
    assert seg[0].tolist() == [0] * 6 + [1] * 4 + [4] and seg[1].tolist() == [2] * 5 + [3] * 6
    assert b.position_ids[0].tolist() == list(range(6)) + list(range(4)) + [0]
    # every response token is found where collate put it: compare with the one-row pack's tokens
    one = collate_pairs(ROWS, layout="packed", pad_id=PAD)
    assert torch.equal(b.input_ids.view(-1)[b.target_index], one.input_ids.view(-1)[one.target_index])
    m = b.block_causal_mask()  # (R, 1, T, T)
    assert m.shape == (2, 1, 11, 11) and not m[0, 0, 6, 5] and m[0, 0, 5, 0] and m[1, 0, 10, 5]
    assert sum(lens) == b.num_tokens and b.num_pad_tokens == 1


@pytest.mark.parametrize("layout", ["packed", "padded", "shared"])
def test_attention_context_counts_the_mask_among_real_tokens(layout):
    """PairBatch.attention_context (MFU's attention work) == the (query, key) pairs its attention mask allows
    between real tokens, counted from the mask itself."""
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt_ids": [1] + torch.randint(3, 50, (p,), generator=g).tolist(),
             "chosen_ids": torch.randint(3, 50, (c,), generator=g).tolist() + [2],
             "rejected_ids": torch.randint(3, 50, (r,), generator=g).tolist() + [2]}
            for p, c, r in [(4, 6, 3), (9, 2, 5), (0, 5, 1)]]
    b = collate_pairs(rows, layout=layout, pad_id=PAD, pad_to_multiple=8)
    if layout == "padded":
        real = b.attention_mask.bool()  # (2B, T)
        mask = real[:, None, :] & torch.ones(real.shape[1], real.shape[1], dtype=torch.bool).tril()
    else:
        mask = (b.shared_prompt_mask() if layout == "shared" else b.block_causal_mask())[:, 0]
        real = torch.zeros(b.input_ids.numel(), dtype=torch.bool)
        real[torch.cat([b.target_index, b.logit_index])] = True  # every real token is a target or predicts one
        for s in range(b.seq_lens.numel()):  # ... except prompt tokens before the last: add them from the layout
            sel = b.response_seq == s
            start = int(b.target_index[sel][0] - b.prompt_lens[s])
            real[start:start + int(b.prompt_lens[s])] = True
        real = real.view(b.input_ids.shape)
    allowed = mask & real[:, :, None] & real[:, None, :]
    assert int(real.sum()) == b.num_tokens
    assert b.attention_context == int(allowed.sum())
