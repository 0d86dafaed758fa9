"""Evaluation by generation on the embedded verifiable task: the checker scores what the model writes.

    python -m midpo.demo.evaluate MODEL_DIR PROMPTS.jsonl [--n 200] [--sampled]

Held-out prompts (`<run_dir>/synth/eval_prompts.jsonl`, drawn from a disjoint seed) are templated
with the model's own chat template, answered greedily (and optionally by sampling), and scored with
`midpo.demo.task.check_answer` (exact) and `partial_credit`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from midpo.demo.task import check_answer, partial_credit

log = logging.getLogger(__name__)


def read_prompts(path: str | Path, n: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if n is not None and len(rows) >= n:
                break
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 48, batch_size: int = 64,
                     do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                     row_seeds: list[int] | None = None) -> list[str]:
    """Answers in prompt order. Left padding so every row's generation starts at the same column. `row_seeds`
    (one per prompt) samples each prompt from its own seed (`demo.sampling`): the answers do not depend on the
    batch a prompt shares, so they are the same on any number of processes; `seed` is then unused."""
    from transformers import LogitsProcessorList

    from midpo.demo.sampling import RowSeededGumbel

    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[str] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False, disable=len(prompts) <= batch_size):
        chunk = prompts[i : i + batch_size]
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for p in chunk]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(input_ids)
        for r, x in enumerate(ids):
            input_ids[r, width - len(x):] = torch.tensor(x)
            attn[r, width - len(x):] = 1
        processors = None
        if row_seeds is not None:  # greedy over per-row Gumbel-perturbed scores = a per-row sample
            processors = LogitsProcessorList([RowSeededGumbel(row_seeds[i : i + batch_size], temperature)])
        elif do_sample:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        sample = do_sample and row_seeds is None
        seqs = model.generate(
            input_ids=input_ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
            do_sample=sample, temperature=temperature if sample else None, top_p=None, top_k=None,
            logits_processor=processors, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        for r in range(len(chunk)):
            out.append(tokenizer.decode(seqs[r, width:], skip_special_tokens=True).strip())
    return out


def interval95(values: list[float]) -> float:
    """Half-width of a normal 95% interval of the mean (binomial for 0/1 scores)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return 1.96 * math.sqrt(var / n)


def paired_difference(before: list[float], after: list[float]) -> dict:
    """Paired comparison of two scorings of the SAME prompts: mean of (after - before) and the
    half-width of its normal 95% interval, plus the discordant counts (McNemar's b, c for 0/1 scores).

    Pairing removes the per-prompt difficulty both models share, so this interval is (much) narrower
    than combining two independent intervals; "beats" means the interval's lower end is above 0."""
    if len(before) != len(after):
        raise ValueError(f"paired_difference: {len(before)} vs {len(after)} scores (not the same prompts?)")
    diffs = [a - b for b, a in zip(before, after)]
    n = len(diffs)
    mean = sum(diffs) / n if n else float("nan")
    half = interval95(diffs)
    if half != half:  # n < 2
        half = float("inf")
    return {"n": n, "diff": mean, "ci95": half, "lower": mean - half, "upper": mean + half,
            "gained": sum(1 for d in diffs if d > 0), "lost": sum(1 for d in diffs if d < 0),
            "significant": bool(n >= 2 and mean - half > 0)}


def answer_token_budget(tokenizer, rows: list[dict], slack: int = 8, cap: int = 256) -> int:
    """max_new_tokens that fits every correct answer (the prompts file carries them) plus some slack:
    a right answer is never cut, and a model that does not stop wastes at most `slack` steps."""
    answers = [r["answer"] for r in rows if "answer" in r]
    if not answers:
        return 48
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return min(cap, longest + 1 + slack)  # + EOS


def evaluate_model(model_dir: str | Path, prompts_path: str | Path, *, n: int = 200, sampled: bool = False,
                   temperature: float = 0.7, seed: int = 0, max_new_tokens: int | None = None) -> dict:
    """{"greedy/accuracy", "greedy/partial", "greedy/ci95", "greedy/scores" (per prompt), and
    "sampled/..." when asked, "n"}. Sampling is seeded: two models scored with the same seed see the
    same prompts in the same order (pair them with `paired_difference`)."""
    from midpo.config import ModelConfig
    from midpo.runtime.models import load_model, load_tokenizer

    model = load_model(model_dir, ModelConfig(attn_implementation="sdpa"), train=False)
    tok = load_tokenizer(model_dir)
    rows = read_prompts(prompts_path, n)
    prompts = [r["prompt"] for r in rows]
    if max_new_tokens is None:
        max_new_tokens = answer_token_budget(tok, rows)
    result: dict = {"n": len(rows), "max_new_tokens": max_new_tokens}
    modes = [("greedy", False)] + ([("sampled", True)] if sampled else [])
    for name, do_sample in modes:
        answers = generate_answers(model, tok, prompts, do_sample=do_sample, temperature=temperature, seed=seed,
                                   max_new_tokens=max_new_tokens)
        exact = [check_answer(r, a) for r, a in zip(rows, answers)]
        result[f"{name}/accuracy"] = sum(exact) / len(exact)
        result[f"{name}/ci95"] = interval95(exact)
        result[f"{name}/scores"] = exact  # per prompt, in file order: for paired comparisons
        result[f"{name}/partial"] = sum(partial_credit(r, a) for r, a in zip(rows, answers)) / len(rows)
        by_task: dict[str, list[float]] = {}
        for r, e in zip(rows, exact):
            by_task.setdefault(str(r.get("task", "all")), []).append(e)
        result[f"{name}/by_task"] = {k: sum(v) / len(v) for k, v in sorted(by_task.items())}
        result[f"{name}/examples"] = [{"prompt": r["prompt"], "answer": a, "correct": bool(e)}
                                      for r, a, e in list(zip(rows, answers, exact))[:3]]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("prompts")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--sampled", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(evaluate_model(args.model_dir, args.prompts, n=args.n, sampled=args.sampled), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
