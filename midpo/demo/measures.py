"""Per-answer measurements of a trained policy against its reference and its prior (issue #23's experiment).

    scores = score_answers(policy, tokenizer, prompts, answers, reference=ref, prior=zeta, bos_id=...)

For each (prompt, answer), templated as in generation (the chat template's generation prompt, then the answer's
tokens and EOS, which the answer's log-prob scores as training does):
- ``logp``: sum_t log pi(y_t | x, y<t); ``ref_logp`` the same under the reference;
- ``kl_ref``: sum_t KL(pi(.|x,y<t) || pi_ref(.|x,y<t)) over the full vocabulary;
- ``kl_prior``: sum_t KL(pi(.|x,y<t) || zeta(.|y<t)), zeta an unconditioned prior read on ``[BOS] + y``
  (MI-DPO's `prior_net` default layout);
- ``tokens``: |y| + 1 (EOS).
On answers sampled from pi, mean kl_ref / tokens estimates KL(pi || pi_ref) per token (an exact sum over the
vocabulary at each visited position, so the only noise is which answers were sampled).
"""

from __future__ import annotations

import torch


def position_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """(m, V), (m, V) logits -> (m,) KL(softmax p || softmax q) per row, in float64."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def answer_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation prompt, answer ids + EOS)."""
    p = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    return list(p), tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _response_logits(model, ids: list[int], n_resp: int) -> torch.Tensor:
    """(n_resp, V) logits at the positions that predict the last ``n_resp`` tokens of ``ids``."""
    out = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]  # (T, V)
    return out[len(ids) - 1 - n_resp: len(ids) - 1].float()


@torch.no_grad()
def score_answers(policy, tokenizer, prompts: list[str], answers: list[str], *, reference=None, prior=None,
                  bos_id: int | None = None) -> list[dict]:
    """One dict per answer: logp, tokens, and (given the models) ref_logp, kl_ref, kl_prior."""
    if prior is not None and bos_id is None:
        raise ValueError("score_answers: an unconditioned prior needs bos_id (its context token)")
    out = []
    for prompt, answer in zip(prompts, answers):
        p_ids, r_ids = answer_ids(tokenizer, prompt, answer)
        ids, n, tgt = p_ids + r_ids, len(r_ids), torch.tensor(r_ids)
        pl = _response_logits(policy, ids, n)
        row = {"tokens": n, "logp": float(torch.log_softmax(pl.double(), -1).gather(-1, tgt[:, None]).sum())}
        if reference is not None:
            rl = _response_logits(reference, ids, n)
            row["ref_logp"] = float(torch.log_softmax(rl.double(), -1).gather(-1, tgt[:, None]).sum())
            row["kl_ref"] = float(position_kl(pl, rl).sum())
        if prior is not None:
            zl = _response_logits(prior, [bos_id] + r_ids, n)
            row["kl_prior"] = float(position_kl(pl, zl).sum())
        out.append(row)
    return out


def per_token(rows: list[dict], key: str) -> float:
    """Mean over answers of key / tokens (per-token value of each answer, then averaged)."""
    vals = [r[key] / r["tokens"] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def reward_accuracy(chosen: list[dict], rejected: list[dict]) -> float:
    """Fraction of pairs whose chosen answer has the larger log pi - log pi_ref (DPO's implicit reward, the same
    yardstick for every prior); ties count as wrong."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"reward_accuracy: {len(chosen)} chosen vs {len(rejected)} rejected scores")
    wins = sum((c["logp"] - c["ref_logp"]) > (r["logp"] - r["ref_logp"]) for c, r in zip(chosen, rejected))
    return wins / len(chosen)
