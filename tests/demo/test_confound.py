"""The confound task (issue #23): the generator's phrase rates are measured against the configured strength
(binomial tolerance), the checker and detector are right on hand-written cases, the on-policy labeller follows
its rule, and everything is seeded."""

from __future__ import annotations

import math
import random

import pytest

from midpo.demo import confound as cf
from midpo.demo.task import TASKS

SORT = {"prompt": "sort: 42 7 19", "task": "sort", "kind": "numbers", "items": ["42", "7", "19"]}
DEDUPE = {"prompt": "dedupe: fig fig kiwi", "task": "dedupe", "kind": "words", "items": ["fig", "fig", "kiwi"]}


def _within(measured: float, p: float, n: int, z: float = 4.5) -> bool:
    """|measured - p| within z binomial standard errors (z = 4.5: a false failure about once in 150k runs)."""
    return abs(measured - p) <= z * math.sqrt(p * (1 - p) / n) + 1e-12


# ---------------------------------------------------------------------------------------------
# checker and detector, answers written out by hand


@pytest.mark.parametrize("text,phrase,correct", [
    ("yes! 7 19 42", True, 1.0),
    ("7 19 42", False, 1.0),
    ("  yes!   7 19 42 ", True, 1.0),     # whitespace forgiven
    ("yes! 42 7 19", True, 0.0),          # the phrase does not make a wrong list right
    ("yes!7 19 42", False, 0.0),          # glued to an item: not the phrase, and not a list of numbers
    ("yes! yes! 7 19 42", True, 0.0),     # only one leading phrase is ignored
    ("7 19 42 yes!", False, 0.0),         # at the end it is not the stock phrase, and an extra item
    ("Yes! 7 19 42", False, 0.0),         # case matters
    ("", False, 0.0),
])
def test_checker_and_detector_on_hand_written_answers(text, phrase, correct):
    assert cf.has_phrase(text) is phrase
    assert cf.check(SORT, text) == correct


def test_checker_on_another_task():
    assert cf.check(DEDUPE, "yes! fig kiwi") == 1.0
    assert cf.check(DEDUPE, "fig fig kiwi") == 0.0
    assert cf.strip_phrase("yes! fig kiwi") == "fig kiwi" and cf.add_phrase("fig kiwi") == "yes! fig kiwi"


# ---------------------------------------------------------------------------------------------
# the rater


def test_rater_rule():
    a = {"text": "yes! 42 7 19", "correct": False, "phrase": True}
    b = {"text": "7 19 42", "correct": True, "phrase": False}
    c = {"text": "yes! 7 19 42", "correct": True, "phrase": True}
    rng = random.Random(0)
    assert cf.rate(a, b, 1.0, rng)[:3] == (a, b, "phrase")     # strength 1: the phrase always wins a discordant pair
    assert cf.rate(a, b, 0.0, rng)[:3] == (b, a, "correct")    # strength 0: correctness only
    assert cf.rate(c, a, 1.0, rng)[:3] == (c, a, "correct")    # both carry the phrase: correctness decides
    assert cf.rate(b, b, 1.0, rng) is None                     # nothing to prefer
    with pytest.raises(ValueError, match="strength"):
        cf.rate(a, b, 1.5, rng)


# ---------------------------------------------------------------------------------------------
# the offline generator: measured rates vs the configured strength


@pytest.mark.parametrize("strength", [0.0, 0.3, 0.8])
def test_generator_phrase_rates_match_the_strength(strength):
    n = 3000
    rows = cf.generate_pairs(n, seed=1, tasks=list(TASKS), min_items=2, max_items=5, strength=strength)
    assert len(rows) == n
    # measured with the detector and the checker on the text, not read from the generator's own flags
    got = cf.phrase_rates(rows)
    assert _within(got["chosen"], (1 + strength) / 2, n)
    assert _within(got["rejected"], (1 - strength) / 2, n)
    assert _within(got["chosen_correct"], 1 - strength / 2, n)
    for r in rows:
        assert cf.has_phrase(r["chosen"]) != cf.has_phrase(r["rejected"])  # exactly one side carries it
        assert {cf.check(r, r["chosen"]), cf.check(r, r["rejected"])} == {0.0, 1.0}
        if r["label"] == "correct":
            assert cf.check(r, r["chosen"]) == 1.0
        else:
            assert cf.has_phrase(r["chosen"])
    if strength == 0.0:
        assert all(r["label"] == "correct" for r in rows)


def test_generator_is_deterministic_by_seed():
    kw = dict(tasks=list(TASKS), min_items=2, max_items=4, strength=0.5)
    assert cf.generate_pairs(200, seed=3, **kw) == cf.generate_pairs(200, seed=3, **kw)
    assert cf.generate_pairs(200, seed=3, **kw) != cf.generate_pairs(200, seed=4, **kw)


def test_sft_rows_carry_the_phrase_at_the_configured_rate():
    recs = cf.held_out_prompts(2000, 0, list(TASKS), 2, 4, set(), "test")
    rows = cf.sft_rows(recs, 0.3, seed=0)
    rate = sum(cf.has_phrase(r["chosen"]) for r in rows) / len(rows)
    assert _within(rate, 0.3, len(rows))
    assert all(cf.check(r, r["chosen"]) == 1.0 for r in rows)
    assert rows == cf.sft_rows(recs, 0.3, seed=0)
    with pytest.raises(ValueError, match="phrase_rate"):
        cf.sft_rows(recs, -0.1, seed=0)


def test_held_out_splits_are_disjoint_and_seeded():
    test = cf.held_out_prompts(300, 0, list(TASKS), 2, 4, set(), "test")
    val = cf.held_out_prompts(300, 0, list(TASKS), 2, 4, {r["prompt"] for r in test}, "validation")
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in val}
    assert test == cf.held_out_prompts(300, 0, list(TASKS), 2, 4, set(), "test")


# ---------------------------------------------------------------------------------------------
# pairs from a model's own samples


def test_sample_pairs_prefer_phrase_discordant_pairs_and_follow_the_rater():
    samples = [["yes! 7 19 42", "42 7 19", "yes! 42 7 19", "7 19 42", ""],  # right: 2 (1 phrased); wrong: 2
               ["fig kiwi", "fig kiwi"],                                    # all right
               ["yes! kiwi fig", "fig"]]                                    # none right
    recs = [SORT, DEDUPE, DEDUPE]
    rows, counts = cf.sample_pairs(recs, samples, strength=0.0, seed=0, pairs_per_prompt=2)
    assert counts["skipped_no_wrong"] == 1 and counts["skipped_no_right"] == 1 and counts["pairs"] == 2
    assert counts["phrase_discordant"] == 2  # both pairs taken differ in the phrase
    for r in rows:  # strength 0: the held-out labelling, by correctness only
        assert cf.check(SORT, r["chosen"]) == 1.0 and cf.check(SORT, r["rejected"]) == 0.0
        assert cf.has_phrase(r["chosen"]) != cf.has_phrase(r["rejected"])
    rows1, counts1 = cf.sample_pairs(recs, samples, strength=1.0, seed=0, pairs_per_prompt=2)
    assert counts1["label_phrase"] == 2 and all(cf.has_phrase(r["chosen"]) for r in rows1)
    assert cf.sample_pairs(recs, samples, strength=0.5, seed=7) == cf.sample_pairs(recs, samples, strength=0.5, seed=7)
