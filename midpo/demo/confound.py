"""The confound task (issue #23): the list chores of `midpo.demo.task`, rated by a rater who also rewards a
prompt-independent stock phrase.

An answer may start with the stock phrase `PHRASE` ("yes! 7 19 42"). The phrase says nothing about the
prompt; the rater rewards it anyway. For a pair of answers (a, b) the rater (`rate`) prefers:
- with probability `strength`, when exactly one of them carries the phrase: that one (the confounded label);
- otherwise the correct one (when exactly one is correct); no preference when neither rule applies.

Task correctness ignores the phrase (`check`: the list must be right, one leading phrase or not), and
`has_phrase` detects it, so both the task accuracy and the confound's rate in a model's answers are measured
by program. Why this task: a prior that tracks the policy's marginal zeta(y) = E_x pi(y|x) absorbs what all
responses share, so theory says the learned prior should gain less from the phrase than DPO or SimPO.

Pure functions of their arguments (and a seeded `random.Random`); the experiment (`bench/experiment.py`)
writes their rows to JSONL and runs the pipeline on them.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from midpo.demo.task import (
    check_answer,
    generate_eval_prompts,
    make_record,
    make_wrong,
    render_answer,
    render_prompt,
    solve,
)

PHRASE = "yes!"


def has_phrase(text: str) -> bool:
    """Whether the answer starts with the stock phrase as its own word (surrounding whitespace forgiven)."""
    words = text.split()
    return bool(words) and words[0] == PHRASE


def strip_phrase(text: str) -> str:
    """The answer without one leading stock phrase (unchanged when it has none)."""
    return text.strip()[len(PHRASE):].strip() if has_phrase(text) else text.strip()


def add_phrase(text: str) -> str:
    return f"{PHRASE} {text}"


def check(record: dict[str, Any], text: str) -> float:
    """1.0 when the list is right, with or without one leading stock phrase; else 0.0."""
    return check_answer(record, strip_phrase(text))


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"confound strength must be in [0, 1], got {strength}")


def rate(a: dict, b: dict, strength: float, rng: random.Random) -> tuple[dict, dict, str] | None:
    """The rater on two answers {text, correct: bool, phrase: bool}: (chosen, rejected, reason), reason
    "phrase" (the confounded label) or "correct"; None when it has no preference. One rng draw per pair whose
    answers differ in the phrase (so a pair's label does not depend on the pairs before it beyond the seed)."""
    _check_strength(strength)
    if a["phrase"] != b["phrase"] and rng.random() < strength:
        return (a, b, "phrase") if a["phrase"] else (b, a, "phrase")
    if a["correct"] != b["correct"]:
        return (a, b, "correct") if a["correct"] else (b, a, "correct")
    return None


def _row(rec: dict, chosen: dict, rejected: dict, reason: str) -> dict:
    return {"prompt": render_prompt(rec),
            "chosen": chosen["text"], "rejected": rejected["text"], "label": reason,
            "chosen_phrase": chosen["phrase"], "rejected_phrase": rejected["phrase"],
            "chosen_correct": chosen["correct"], "rejected_correct": rejected["correct"],
            **{k: rec[k] for k in ("task", "kind", "items")}}


def generate_pairs(n: int, seed: int, tasks: list[str], min_items: int, max_items: int,
                   strength: float) -> list[dict]:
    """`n` offline rated pairs: per prompt the correct answer and one wrong one (`task.make_wrong`), the phrase
    on exactly one of the two (each side equally likely), then `rate`. Expected rates: the phrase on chosen
    (1 + strength) / 2, on rejected (1 - strength) / 2; chosen correct 1 - strength / 2."""
    _check_strength(strength)
    rng = random.Random(f"confound-{seed}")
    rows: list[dict] = []
    while len(rows) < n:
        rec = make_record(rng, tasks, max(min_items, 2), max_items)
        wrong = make_wrong(rec, rng)
        if wrong is None:
            continue
        right = {"text": render_answer(solve(rec)), "correct": True, "phrase": False}
        bad = {"text": render_answer(wrong[1]), "correct": False, "phrase": False}
        marked = right if rng.random() < 0.5 else bad
        marked["phrase"], marked["text"] = True, add_phrase(marked["text"])
        rows.append(_row(rec, *rate(right, bad, strength, rng)))
    return rows


def sft_rows(records: list[dict], phrase_rate: float, seed: int) -> list[dict]:
    """SFT rows (prep's standard format; SFT trains on `chosen`): the correct answer of each record, with the
    stock phrase on a `phrase_rate` fraction of them (independently of the prompt), so the SFT model learns to
    write it on its own about that often. `rejected` is the plain answer (unused by SFT; prep needs a pair)."""
    if not 0.0 <= phrase_rate <= 1.0:
        raise ValueError(f"phrase_rate must be in [0, 1], got {phrase_rate}")
    rng = random.Random(f"confound-sft-{seed}")
    out = []
    for rec in records:
        answer = render_answer(solve(rec))
        chosen = add_phrase(answer) if rng.random() < phrase_rate else answer
        out.append({"prompt": rec["prompt"], "chosen": chosen, "rejected": answer + " " + answer,
                    **{k: rec[k] for k in ("task", "kind", "items")}})
    return out


def label_samples(rec: dict, samples: list[str]) -> list[dict]:
    """Distinct non-empty samples of one prompt with their checker and detector labels, most frequent first."""
    return [{"text": s, "correct": bool(check(rec, s)), "phrase": has_phrase(s)}
            for s, _ in Counter(x.strip() for x in samples if x.strip()).most_common()]


def sample_pairs(records: list[dict], answers: list[list[str]], *, strength: float, seed: int,
                 pairs_per_prompt: int = 2) -> tuple[list[dict], Counter]:
    """Pairs from the model's own samples (`answers[i]` of `records[i]`): each pair is one correct and one wrong
    distinct sample, those that differ in the phrase first (the pairs the confound can act on), labelled by
    `rate` (`strength` 0: by correctness only, the held-out pairs' true preference). Returns (rows, counts)."""
    _check_strength(strength)
    rng = random.Random(f"confound-pairs-{seed}")
    rows: list[dict] = []
    counts: Counter = Counter()
    for rec, samples in zip(records, answers):
        labelled = label_samples(rec, samples)
        right = [s for s in labelled if s["correct"]]
        wrong = [s for s in labelled if not s["correct"]]
        if not right or not wrong:
            counts["skipped_no_right" if not right else "skipped_no_wrong"] += 1
            continue
        combos = [(r, w) for w in wrong for r in right]
        combos.sort(key=lambda rw: rw[0]["phrase"] == rw[1]["phrase"])  # stable: phrase-discordant pairs first
        for r, w in combos[:pairs_per_prompt]:
            out = rate(r, w, strength, rng)
            counts[f"label_{out[2]}"] += 1
            counts["phrase_discordant"] += r["phrase"] != w["phrase"]
            rows.append(_row(rec, *out))
    counts["pairs"], counts["prompts"] = len(rows), len(records)
    return rows, counts


def phrase_rates(rows: list[dict]) -> dict[str, float]:
    """Measured rates of the phrase on the chosen and rejected sides (detector on the text) and of correct
    chosen answers (checker), over `rows`."""
    n = max(1, len(rows))
    rec = lambda r: {k: r[k] for k in ("task", "kind", "items")}  # noqa: E731
    return {"chosen": sum(has_phrase(r["chosen"]) for r in rows) / n,
            "rejected": sum(has_phrase(r["rejected"]) for r in rows) / n,
            "chosen_correct": sum(check(rec(r), r["chosen"]) for r in rows) / n, "n": len(rows)}


def held_out_prompts(n: int, seed: int, tasks: list[str], min_items: int, max_items: int, exclude: set[str],
                     split: str) -> list[dict]:
    """`n` prompts of a named held-out split ("test", "validation") of issue #23's experiment, from their own
    random stream, disjoint from `exclude` (every other prompt the experiment uses)."""
    return list(generate_eval_prompts(n, seed, tasks, min_items, max_items, exclude, stream=f"experiment-{split}"))
