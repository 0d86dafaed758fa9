"""The verifiable preference task of the embedded default: list chores a program can answer.

A prompt asks for one task (sort, reverse, dedupe) on a short list of numbers or words:

    sort: 42 7 19          ->  7 19 42
    reverse: fig kiwi pear ->  pear kiwi fig
    dedupe: 3 1 3 2        ->  3 1 2          (first occurrences, original order)

`chosen` is the correct answer; `rejected` is a plausible wrong one made by one controlled error
(`ERROR_KINDS`). The error is picked so that the rejected answer is shorter, as long as, or longer
than the chosen one about equally often: answer length alone must not reveal the preference.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable, Iterator
from typing import Any

WORDS = (
    "apple pear fig kiwi lime plum date grape melon berry lemon mango peach olive cherry "
    "bean corn rice leek kale"
).split()
MAX_NUMBER = 99

TASKS: dict[str, Callable[[list[str], str], list[str]]] = {}


def _task(name: str):
    def deco(fn):
        TASKS[name] = fn
        return fn

    return deco


def _sort_key(kind: str):
    return (lambda s: int(s)) if kind == "numbers" else (lambda s: s)


@_task("sort")
def _sort(items: list[str], kind: str) -> list[str]:
    return sorted(items, key=_sort_key(kind))


@_task("reverse")
def _reverse(items: list[str], kind: str) -> list[str]:
    return list(reversed(items))


@_task("dedupe")
def _dedupe(items: list[str], kind: str) -> list[str]:
    return list(dict.fromkeys(items))


def solve(record: dict[str, Any]) -> list[str]:
    """The correct answer (as items) of a task record {task, kind, items}."""
    task = record["task"]
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task](list(record["items"]), record["kind"])


def render_prompt(record: dict[str, Any]) -> str:
    return f"{record['task']}: {' '.join(record['items'])}"


def render_answer(items: list[str]) -> str:
    return " ".join(items)


def parse_answer(text: str) -> list[str]:
    """Whitespace- and comma-separated items; surrounding whitespace is forgiven, nothing else."""
    return text.replace(",", " ").split()


def check_answer(task_record: dict[str, Any], answer_text: str) -> float:
    """1.0 if `answer_text` is exactly the correct list (whitespace/commas aside), else 0.0."""
    return 1.0 if parse_answer(answer_text) == solve(task_record) else 0.0


def partial_credit(task_record: dict[str, Any], answer_text: str) -> float:
    """Similarity in [0, 1] of the answer's items to the correct ones (difflib ratio on item lists):
    1.0 exactly correct, near 1 for one swapped/missing item, 0.0 for nothing in common."""
    got, want = parse_answer(answer_text), solve(task_record)
    if not got and not want:
        return 1.0
    return difflib.SequenceMatcher(a=got, b=want, autojunk=False).ratio()


# ---------------------------------------------------------------------------------------------
# wrong answers: each error kind maps (items, answer, record, rng) -> a wrong answer or None


def _swap(items, ans, rec, rng):
    if len(ans) < 2:
        return None
    i, j = rng.sample(range(len(ans)), 2)
    out = list(ans)
    out[i], out[j] = out[j], out[i]
    return out


def _drop(items, ans, rec, rng):
    if len(ans) < 2:
        return None
    out = list(ans)
    del out[rng.randrange(len(out))]
    return out


def _duplicate(items, ans, rec, rng):
    out = list(ans)
    i = rng.randrange(len(out))
    out.insert(i, out[i])
    return out


def _insert_foreign(items, ans, rec, rng):
    pool = [str(n) for n in range(MAX_NUMBER + 1)] if rec["kind"] == "numbers" else list(WORDS)
    pool = [p for p in pool if p not in ans]
    out = list(ans)
    out.insert(rng.randrange(len(out) + 1), rng.choice(pool))
    return out


def _wrong_task(items, ans, rec, rng):
    other = rng.choice([t for t in TASKS if t != rec["task"]])
    return TASKS[other](list(items), rec["kind"])


def _echo_input(items, ans, rec, rng):
    return list(items)


def _lexicographic_sort(items, ans, rec, rng):
    # a classic: numbers sorted as strings ("10" < "9")
    if rec["task"] != "sort" or rec["kind"] != "numbers":
        return None
    return sorted(items)


ERROR_KINDS: dict[str, Callable] = {
    "swap": _swap,
    "drop": _drop,
    "duplicate": _duplicate,
    "insert": _insert_foreign,
    "wrong_task": _wrong_task,
    "echo_input": _echo_input,
    "lexicographic": _lexicographic_sort,
}


def _length_class(wrong: list[str], right: list[str]) -> str:
    a, b = len(render_answer(wrong)), len(render_answer(right))
    return "shorter" if a < b else "longer" if a > b else "equal"


def make_record(rng: random.Random, tasks: list[str], min_items: int, max_items: int) -> dict[str, Any]:
    task = rng.choice(tasks)
    kind = rng.choice(["numbers", "words"])
    n = rng.randint(min_items, max_items)
    pool = [str(x) for x in range(MAX_NUMBER + 1)] if kind == "numbers" else WORDS
    if task == "dedupe":
        # guarantee at least one repeat so the task is not a no-op
        base = [rng.choice(pool) for _ in range(max(1, n - 1))]
        items = base + [rng.choice(base)]
        rng.shuffle(items)
    else:
        items = [rng.choice(pool) for _ in range(n)]
    return {"task": task, "kind": kind, "items": items}


def make_wrong(record: dict[str, Any], rng: random.Random) -> tuple[str, list[str]] | None:
    """(error kind, wrong items), with the length relation to the answer chosen first (uniformly
    among the relations this record can produce) so length is uninformative overall."""
    answer = solve(record)
    by_class: dict[str, list[tuple[str, list[str]]]] = {}
    for name, fn in ERROR_KINDS.items():
        wrong = fn(record["items"], answer, record, rng)
        if wrong is None or wrong == answer:
            continue
        by_class.setdefault(_length_class(wrong, answer), []).append((name, wrong))
    if not by_class:
        return None
    # shorter/longer are the informative relations: balance them against each other
    wanted = rng.choice(["shorter", "longer", "equal"])
    options = by_class.get(wanted) or by_class[rng.choice(sorted(by_class))]
    return rng.choice(options)


def generate_pairs(n: int, seed: int, tasks: list[str], min_items: int, max_items: int) -> Iterator[dict[str, Any]]:
    """`n` preference rows: TRL standard columns plus the checker's record (task, kind, items)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"synth.tasks has unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    if not 1 <= min_items <= max_items:
        raise ValueError(f"synth.min_items/max_items must satisfy 1 <= min <= max, got {min_items}, {max_items}")
    rng = random.Random(seed)
    made = 0
    while made < n:
        rec = make_record(rng, tasks, max(min_items, 2), max_items)
        wrong = make_wrong(rec, rng)
        if wrong is None:  # e.g. a one-item list: nothing plausible to get wrong
            continue
        kind, items = wrong
        made += 1
        yield {
            "prompt": render_prompt(rec),
            "chosen": render_answer(solve(rec)),
            "rejected": render_answer(items),
            "error_kind": kind,
            **rec,
        }


def generate_eval_prompts(n: int, seed: int, tasks: list[str], min_items: int, max_items: int,
                          exclude_prompts: set[str], stream: str = "eval") -> Iterator[dict[str, Any]]:
    """`n` prompts (with their task records and answers) never equal to a prompt in `exclude_prompts`,
    from the random stream named `stream` (held-out "eval" prompts; fresh "onpolicy" prompts)."""
    rng = random.Random(f"{stream}-{seed}")  # a different stream from the training pairs
    seen = set(exclude_prompts)
    made, tries = 0, 0
    while made < n:
        tries += 1
        if tries > 100 * (n + 10):
            raise ValueError(f"could not draw {n} held-out prompts disjoint from the training prompts; "
                             "widen synth.min_items/max_items")
        rec = make_record(rng, tasks, max(min_items, 2), max_items)
        prompt = render_prompt(rec)
        if prompt in seen:
            continue
        seen.add(prompt)
        made += 1
        yield {"prompt": prompt, "answer": render_answer(solve(rec)), **rec}
