"""`model.attn_implementation` per family: `auto` picks what the family computes correctly (Gemma 2's attention
soft-capping: eager on CPU; HF refuses sdpa for it), a named implementation the family cannot run is refused,
and a family model loaded through midpo scores like HF's own default loading."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, build_family, tiny_config

from midpo.config import ConfigError, ModelConfig
from midpo.runtime.models import load_model, resolve_attn


class _Tok:  # tiny_config only asks a tokenizer for ids and its length
    def __init__(self, n):
        self.n = n

    def convert_tokens_to_ids(self, t):
        return 1

    def __len__(self):
        return self.n


@pytest.mark.parametrize("name", ["llama3", "qwen2.5", "qwen3", "mistral", "phi3", "qwen2-moe"])
def test_auto_is_sdpa_on_cpu_for_families_that_support_it(name):
    assert resolve_attn("auto", tiny_config(FAMILIES[name], _Tok(100))) == "sdpa"


def test_gemma2_softcapping_gets_eager_and_refuses_sdpa():
    cfg = tiny_config(FAMILIES["gemma2"], _Tok(100))
    assert resolve_attn("auto", cfg) == "eager"
    assert resolve_attn("eager", cfg) == "eager"
    with pytest.raises(ConfigError, match="Gemma2"):
        resolve_attn("sdpa", cfg)


def test_gemma2_loads_with_auto_and_scores_as_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    path = build_family("gemma2", tmp_path / "gemma2")
    ours = load_model(path, ModelConfig(dtype="fp32", attn_implementation="auto"))
    assert ours.config._attn_implementation == "eager"
    theirs = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = torch.randint(5, 200, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-6, rtol=0)
