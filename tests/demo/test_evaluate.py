"""Generation-eval helpers: the checker's scoring, the paired comparison and the answer budget."""

from __future__ import annotations

import json

import pytest
import torch

from midpo.demo.evaluate import interval95, paired_difference, read_prompts
from midpo.demo.sft import collate_sft
from midpo.demo.task import check_answer


def test_right_answers_score_one_and_wrong_zero() -> None:
    rec = {"task": "sort", "kind": "numbers", "items": ["10", "9", "42"]}
    assert check_answer(rec, "9 10 42") == 1.0
    assert check_answer(rec, " 9, 10, 42 ") == 1.0
    assert check_answer(rec, "10 42 9") == 0.0  # lexicographic sort is wrong


def test_paired_difference_is_narrower_than_independent_intervals() -> None:
    # 100 prompts: 40 both right, 50 both wrong, 10 gained, 0 lost
    before = [1.0] * 40 + [0.0] * 60
    after = [1.0] * 50 + [0.0] * 50
    d = paired_difference(before, after)
    assert d["diff"] == pytest.approx(0.10)
    assert (d["gained"], d["lost"]) == (10, 0)
    independent = (interval95(before) ** 2 + interval95(after) ** 2) ** 0.5
    assert d["ci95"] < independent
    assert d["significant"]  # paired: 0.10 - 0.059 > 0 ...
    assert 0.10 < independent  # ... while two independent intervals would not separate them


def test_paired_difference_no_change_and_mismatch() -> None:
    same = [1.0, 0.0, 1.0, 0.0]
    d = paired_difference(same, same)
    assert d["diff"] == 0.0 and not d["significant"]
    assert not paired_difference([0.0, 1.0], [1.0, 0.0])["significant"]
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 0.0])


def test_read_prompts_limits_and_rejects_empty(tmp_path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"reverse: {i} x"}) + "\n" for i in range(5)))
    assert len(read_prompts(p, 3)) == 3
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError):
        read_prompts(tmp_path / "e.jsonl")


def test_collate_sft_masks_prompt_and_padding() -> None:
    rows = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2]}, {"prompt_ids": [1, 5], "chosen_ids": [8, 9, 2]}]
    ids, attn, labels = collate_sft(rows, pad_id=3)
    assert ids.tolist() == [[1, 5, 6, 7, 2], [1, 5, 8, 9, 2]]
    assert labels.tolist() == [[-100, -100, -100, 7, 2], [-100, -100, 8, 9, 2]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    ids, attn, labels = collate_sft([rows[0], {"prompt_ids": [1], "chosen_ids": [2]}], pad_id=3)
    assert ids[1].tolist() == [1, 2, 3, 3, 3] and labels[1].tolist() == [-100, 2, -100, -100, -100]
    assert attn[1].tolist() == [1, 1, 0, 0, 0]
    assert labels.dtype == torch.long
