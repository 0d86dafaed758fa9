"""Builders for the prior-network tests: tiny Llamas, random pairs, an independent full-vocab computation."""

from __future__ import annotations

import torch

from midpo.core.logprobs import response_logps

V, PAD, BOS, EOS = 200, 0, 1, 2


BETA = 0.1


def llama(seed: int, layers: int = 2, tied: bool = False, scale: float = 1.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=BOS,
                      eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=tied, attn_implementation="sdpa")
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(scale)  # scale > 1: peakier distributions than the default init
    return m


def rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi, eos):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(3, V, (k,), generator=g).tolist() + ([EOS] if eos else [])

    return [{"prompt_ids": [BOS] + seq(1, 4, False), "chosen_ids": seq(1, 7, True), "rejected_ids": seq(1, 7, True)}
            for _ in range(n)]


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()  # (T, V)


def independent(policy, prior, rs: list[dict]) -> dict:
    """Per pair: KL(pi || zeta) summed over both responses, log zeta and log pi of each response, from
    single-sequence forwards; the unconditioned prior reads [BOS] + response."""
    out = {"kl": [], "zw": [], "zl": [], "pw": [], "pl": []}
    for r in rs:
        kl = 0.0
        for side, z_key, p_key in (("chosen_ids", "zw", "pw"), ("rejected_ids", "zl", "pl")):
            y, P = r[side], len(r["prompt_ids"])
            lp = torch.log_softmax(full_logits(policy, r["prompt_ids"] + y)[P - 1 : -1], -1)  # (L, V)
            lq = torch.log_softmax(full_logits(prior, [BOS] + y)[:-1], -1)  # (L, V)
            kl += float((lp.exp() * (lp - lq)).sum())
            idx = torch.tensor(y)[:, None]
            out[z_key].append(float(lq.gather(-1, idx).sum()))
            out[p_key].append(float(lp.gather(-1, idx).sum()))
        out["kl"].append(kl)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def train_step(hook, policy, batch, step: int) -> dict:
    """One trainer step as pipeline/train.py runs it with a fixed (not updated) policy."""
    pol = response_logps(policy, batch, return_logits=True)
    extra = hook.before_loss(batch, pol)
    assert set(extra) == {"prior_logps"}
    return hook.after_step(step, batch, pol)


def mean(metrics: dict, name: str) -> float:
    s, c = metrics[name].tolist()
    return s / c

