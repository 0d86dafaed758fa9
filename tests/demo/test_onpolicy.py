"""On-policy pairs (`midpo sample`): pair construction from checked samples, and the stage end to end
on a tiny model (every prompt accounted for, output re-read by `midpo prep`, reuse when unchanged)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from midpo.config import ConfigError, OnPolicyConfig
from midpo.demo.onpolicy import build_pairs, sample_pairs
from midpo.demo.task import check_answer, render_answer, solve

SORT = {"prompt": "sort: 3 1 2", "task": "sort", "kind": "numbers", "items": ["3", "1", "2"]}
REV = {"prompt": "reverse: a b", "task": "reverse", "kind": "words", "items": ["a", "b"]}


def test_pairs_take_the_models_own_right_and_wrong_answers() -> None:
    samples = [["1 2 3", "3 1 2", "1 3 2", "3 1 2"], ["b a", "b a"]]
    rows, counts = build_pairs([SORT, REV], samples, OnPolicyConfig(), seed=0)
    assert len(rows) == 1  # REV: all correct -> no preference signal
    (row,) = rows
    assert row["chosen"] == "1 2 3" and check_answer(SORT, row["chosen"]) == 1.0
    assert row["rejected"] == "3 1 2"  # the most frequent mistake first
    assert check_answer(SORT, row["rejected"]) == 0.0
    assert {k: row[k] for k in ("task", "kind", "items")} == {k: SORT[k] for k in ("task", "kind", "items")}
    assert counts["skipped_all_correct"] == 1 and counts["pairs"] == 1 and counts["pairs_chosen_sample"] == 1


def test_every_prompt_is_accounted_for() -> None:
    recs = [SORT, REV, SORT, REV]
    samples = [["1 2 3", "2 1 3", "3 2 1"], ["b a"], ["9 9 9", ""], ["", ""]]
    cfg = OnPolicyConfig(pairs_per_prompt=2)
    rows, counts = build_pairs(recs, samples, cfg, seed=0)
    # prompt 0: two distinct wrong answers -> 2 pairs; 1: all right; 2: no right sample; 3: only empty answers
    assert counts["pairs"] == len(rows) == 2
    assert counts["skipped_all_correct"] == 1
    assert counts["skipped_no_correct_sample"] == 1
    assert counts["skipped_only_empty_answers"] == 1
    assert counts["empty_answers"] == 3
    assert {r["rejected"] for r in rows} == {"2 1 3", "3 2 1"}


def test_gold_fallback_and_gold_only() -> None:
    samples = [["9 9 9", "1 3 2"]]  # no correct sample
    rows, counts = build_pairs([SORT], samples, OnPolicyConfig(chosen="sample_or_gold"), seed=0)
    assert rows[0]["chosen"] == render_answer(solve(SORT)) and counts["pairs_chosen_gold"] == 1
    rows, _ = build_pairs([SORT], [["1 2 3", "1 3 2"]], OnPolicyConfig(chosen="gold"), seed=0)
    assert rows[0]["chosen"] == render_answer(solve(SORT))  # the solution even though a sample was right
    with pytest.raises(ConfigError, match="onpolicy.chosen"):
        OnPolicyConfig(chosen="best")


@pytest.fixture(scope="module")
def tiny_default(tmp_path_factory):
    from midpo.config import SynthConfig
    from midpo.demo.synthetic import build_tiny_default

    cfg = SynthConfig(n_pairs=120, n_eval_prompts=20, n_onpolicy_prompts=12, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=2, num_kv_heads=1, max_position_embeddings=256)
    return build_tiny_default(tmp_path_factory.mktemp("tiny") / "synth", cfg)


def test_synth_writes_fresh_onpolicy_prompts(tiny_default) -> None:
    read = lambda name: [json.loads(x) for x in (tiny_default["root"] / name).read_text().splitlines()]  # noqa: E731
    fresh, evals, pairs = read("onpolicy_prompts.jsonl"), read("eval_prompts.jsonl"), read("pairs.jsonl")
    assert len(fresh) == 12
    seen = {r["prompt"] for r in evals} | {r["prompt"] for r in pairs}
    assert not seen & {r["prompt"] for r in fresh}  # unseen by SFT, never an eval prompt
    assert all(check_answer(r, r["answer"]) == 1.0 for r in fresh)


def test_sample_never_writes_into_a_folder_it_did_not_write(tiny_default, tmp_path) -> None:
    """`midpo sample --out DIR` over a user's folder (holding a pairs.jsonl of its own) is refused before any
    sampling; it used to overwrite DIR/pairs.jsonl."""
    from midpo.runtime.files import OutputDirError

    user = tmp_path / "mine"
    user.mkdir()
    (user / "pairs.jsonl").write_text("my data\n")
    cfg = OnPolicyConfig(enabled=True, samples=1, chosen="sample_or_gold", max_prompts=2)
    with pytest.raises(OutputDirError, match=f"output folder {user} exists and was not written by midpo"):
        sample_pairs(tiny_default["model"], tiny_default["onpolicy_prompts"], user, cfg, seed=0)
    assert [p.name for p in user.iterdir()] == ["pairs.jsonl"] and (user / "pairs.jsonl").read_text() == "my data\n"


@pytest.mark.slow
def test_sample_stage_end_to_end(tiny_default, tmp_path) -> None:
    """A tiny random model answers badly: pairs need `sample_or_gold`. The output is complete, every
    prompt is counted, rejected answers really fail the checker, and a re-run reuses the output."""
    from midpo.config import DataConfig
    from midpo.data.prepare import prepare

    prompts = tiny_default["onpolicy_prompts"]
    cfg = OnPolicyConfig(enabled=True, samples=2, chosen="sample_or_gold", max_prompts=12, batch_size=8)
    out = tmp_path / "onpolicy"
    m = sample_pairs(tiny_default["model"], prompts, out, cfg, seed=0)
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    c = Counter(m["counts"])
    assert c["prompts"] == 12 and c["pairs"] == len(rows) > 0
    assert c["prompts"] == (c["skipped_all_correct"] + c["skipped_no_correct_sample"]
                            + c["skipped_only_empty_answers"] + len({r["prompt"] for r in rows}))
    for r in rows:
        assert check_answer(r, r["chosen"]) == 1.0 and check_answer(r, r["rejected"]) == 0.0
    mtime = (out / "pairs.jsonl").stat().st_mtime_ns
    assert sample_pairs(tiny_default["model"], prompts, out, cfg, seed=0)["key"] == m["key"]
    assert (out / "pairs.jsonl").stat().st_mtime_ns == mtime  # reused, not re-sampled
    # the output is ordinary preference data for stage 1
    dc = DataConfig(max_length=96, max_prompt_tokens=48, eval_fraction=0.0)
    manifest = prepare(dc, [str(out / "pairs.jsonl")], tiny_default["tokenizer"], tmp_path / "data")
    assert manifest["rows"] == {"read": len(rows), "kept": len(rows), "rejected": 0}
