"""Per-token response log-probs of every model family (tests/support/families.py) equal a plain HF forward's
log_softmax gather, one unpadded sequence at a time, in every batch layout: tied embeddings, vocabularies padded
past the tokenizer (Qwen, Phi-3), Gemma 2's final-logit soft-capping (HF's own logits carry it) and its
alternating sliding windows, Mistral's sliding window, Phi-3's fused qkv, the MoE's routed experts.
Tolerance: 2e-5 absolute (fp32; the layouts only reorder the same sums)."""

from __future__ import annotations

import random

import pytest
import torch
from families import FAMILIES, NAMES, build_family, sentence

from midpo.core.batching import collate_pairs
from midpo.core.logprobs import response_logps

ATOL = 2e-5


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in NAMES:
        path = build_family(name, root / name)
        out[name] = (AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path)))
    return out


def templated_rows(tok, fam, n=3, seed=0):
    """Pairs as prep makes them: the prompt with the generation prompt, each response the rest of the full
    conversation. Long enough (> 16 tokens) to cross the tiny sliding windows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = [{"role": "user", "content": sentence(rng, 8, 14)}]
        p = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = {}
        for side in ("chosen", "rejected"):
            full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": sentence(rng, 6, 12)}],
                                           tokenize=False)
            ids[side] = tok(full, add_special_tokens=False)["input_ids"]
        pid = tok(p, add_special_tokens=False)["input_ids"]
        rows.append({"prompt_ids": pid, **{f"{s}_ids": ids[s][len(pid):] for s in ids}})
        assert all(ids[s][: len(pid)] == pid for s in ids)
    return rows


def hf_logps(model, prompt, response):
    """The independent reference: HF's own logits (soft-capped by HF for Gemma 2) of one unpadded sequence."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(input_ids=ids, use_cache=False).logits[0].double().log_softmax(-1)  # (T, V)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[pos, torch.tensor(response)]


@pytest.mark.parametrize("layout", ["packed", "padded", "shared"])
@pytest.mark.parametrize("name", NAMES)
def test_family_logps_equal_hf_forward(families, name, layout):
    model, tok = families[name]
    rows = templated_rows(tok, FAMILIES[name])
    pad = model.config.pad_token_id
    batch = collate_pairs(rows, layout=layout, pad_id=pad)
    with torch.no_grad():
        got = response_logps(model, batch, chunk_size=7)
    for side in ("chosen", "rejected"):
        for b, r in enumerate(rows):
            want = hf_logps(model, r["prompt_ids"], r[f"{side}_ids"])
            n = len(want)
            torch.testing.assert_close(getattr(got, side)[b, :n].double(), want, atol=ATOL, rtol=0,
                                       msg=f"{name} {layout} {side} row {b}")
