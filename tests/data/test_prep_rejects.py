"""Every reject reason, with file and row; the reject-fraction failure; the template-boundary check."""

from __future__ import annotations

import collections
import json
import shutil

import pytest
from prep_helpers import all_rows, data_cfg, read_rejects, write_jsonl

from midpo.config import ConfigError
from midpo.data.formats import REJECT_REASONS
from midpo.data.prepare import PrepError, prepare

GOOD = {"prompt": "sort: 3 1 2", "chosen": "1 2 3", "rejected": "1 3 2"}
LONG_PROMPT = "sort: " + " ".join(str(i % 90) for i in range(200))
LONG_ANSWER = " ".join(str(i % 90) for i in range(200))

# (line content, expected reason or None for kept); line numbers are 1-based and count blank lines
ROWS = [
    (GOOD, None),
    (b'{"prompt": "a", "chosen": ', "invalid_json"),
    (b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}', "invalid_utf8"),
    ({"prompt": "p", "chosen": "a"}, "missing_field"),
    ({"prompt": "p", "chosen": "a", "rejected": 5}, "wrong_type"),
    (b"[1, 2, 3]", "wrong_type"),
    ({"prompt": "p", "chosen": None, "rejected": "b"}, "null_field"),
    (b"", None),  # a blank line: counted in the manifest, not a row
    ({"prompt": "p", "chosen": " \n ", "rejected": "b"}, "empty_response"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical_responses"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty_prompt"),
    ({"prompt": LONG_PROMPT, "chosen": "a", "rejected": "b"}, "prompt_too_long"),
    ({"prompt": "p", "chosen": LONG_ANSWER, "rejected": "b"}, "response_too_long"),
    (GOOD, "duplicate"),
    ({"prompt": "reverse: a b", "chosen": "b a", "rejected": "a b"}, None),
]


def test_every_row_level_reason_is_reported_with_file_and_row(tmp_path, tok_dir):
    f = write_jsonl(tmp_path / "mixed.jsonl", [r for r, _ in ROWS])
    out = tmp_path / "out"
    m = prepare(data_cfg(prompt_overflow="drop"), [str(f)], tok_dir, out)
    want = {i + 1: reason for i, (_, reason) in enumerate(ROWS) if reason}
    got = {r["row"]: r["reason"] for r in read_rejects(out)}
    assert got == want
    assert all(r["file"] == str(f) and r["detail"] for r in read_rejects(out))
    assert m["rejects"]["by_reason"] == dict(collections.Counter(want.values()))
    assert set(m["rejects"]["explanations"]) == set(want.values())
    n_rows = sum(1 for r, _ in ROWS if r != b"")
    assert m["rows"] == {"read": n_rows, "kept": 2, "rejected": len(want)}
    assert m["sources"][0]["blank_lines"] == 1
    assert len(all_rows(out)) == 2


def test_implicit_and_hh_without_shared_prompt(tmp_path, tok_dir):
    u = {"role": "user", "content": "q"}
    implicit = [
        {"chosen": [u, {"role": "assistant", "content": "a"}], "rejected": [u, {"role": "assistant", "content": "b"}]},
        {"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
        {"chosen": [u, {"role": "assistant", "content": "a"}], "rejected": [u, {"role": "assistant", "content": "a"}]},
        {"chosen": [u, {"role": "assistant", "content": "a"}], "rejected": [{"role": "robot", "content": "b"}]},
    ]
    f = write_jsonl(tmp_path / "imp.jsonl", implicit)
    prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "o1")
    assert [(r["row"], r["reason"]) for r in read_rejects(tmp_path / "o1")] == [
        (2, "no_shared_prompt"), (3, "identical_responses"), (4, "wrong_type")]
    hh = [
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:   "},
    ]
    f = write_jsonl(tmp_path / "hh.jsonl", hh)
    prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "o2")
    assert [(r["row"], r["reason"]) for r in read_rejects(tmp_path / "o2")] == [
        (2, "no_shared_prompt"), (3, "empty_response")]


def test_reject_reasons_are_all_tested_or_documented():
    # identical_after_truncation: below; truncation_unstable: test_prep_long_rows.py; template_error:
    # test_family_templates.py
    tested = {r for _, r in ROWS if r} | {"no_shared_prompt", "template_boundary", "identical_after_truncation",
                                          "truncation_unstable", "template_error"}
    # the published schemas' reasons: tests/data/test_prep_schemas.py
    tested |= {"prompt_mismatch", "tie", "abstention", "too_few_responses", "score_margin_too_small"}
    untested = set(REJECT_REASONS) - tested
    assert untested == {"unexpected_error"}  # the catch-all; see test below


def test_unexpected_errors_become_rejects(tmp_path, tok_dir, monkeypatch):
    from midpo.data import formats

    def boom(row):
        if row["prompt"] == "boom":
            raise KeyError("surprise")
        return formats._read_standard(row)

    monkeypatch.setattr(formats, "FORMATS", {**formats.FORMATS, "standard": formats.Format(
        "standard", "test", formats.FORMATS["standard"].detect, boom)})
    f = write_jsonl(tmp_path / "x.jsonl", [GOOD, {"prompt": "boom", "chosen": "a", "rejected": "b"}])
    prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "out")
    (rej,) = read_rejects(tmp_path / "out")
    assert rej["reason"] == "unexpected_error" and "KeyError" in rej["detail"] and rej["row"] == 2


def test_too_many_rejects_fail_loudly_and_write_nothing(tmp_path, tok_dir):
    rows = [GOOD] + [{"prompt": "p", "chosen": "a"}] * 5 + [b"not json"] * 3 + [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(11)]
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(PrepError) as e:
        prepare(data_cfg(max_reject_fraction=0.2), [str(f)], tok_dir, out)
    msg = str(e.value)
    assert "8 of 20 rows (40.0%)" in msg
    assert "missing_field: 5 rows" in msg and "invalid_json: 3 rows" in msg
    assert msg.index("missing_field") < msg.index("invalid_json")  # most common first
    assert f"{f} row 2" in msg  # an example row
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    kept = tmp_path / "out.rejects.jsonl"
    assert len(kept.read_text().splitlines()) == 8
    # the same data passes with a permissive threshold
    assert prepare(data_cfg(max_reject_fraction=0.5), [str(f)], tok_dir, out)["rows"]["kept"] == 12


def test_duplicates_do_not_count_toward_the_failure_threshold(tmp_path, tok_dir, caplog):
    """Duplicates are not broken input (the first copy is kept): data.max_reject_fraction bounds unusable rows
    only; the duplicate fraction is reported in the manifest and the log line, and the failure message says
    duplicates were not counted."""
    f = write_jsonl(tmp_path / "dups.jsonl", [GOOD] * 10)
    with caplog.at_level("INFO", logger="midpo.data.prepare"):
        m = prepare(data_cfg(max_reject_fraction=0.05), [str(f)], tok_dir, tmp_path / "out")
    assert m["rows"] == {"read": 10, "kept": 1, "rejected": 9}
    assert m["rejects"]["by_reason"] == {"duplicate": 9}
    assert m["rejects"]["duplicate_fraction"] == 0.9 and m["rejects"]["unusable_fraction"] == 0.0
    assert "90.0% duplicates (not counted toward the limit)" in caplog.text
    m = prepare(data_cfg(dedup=False), [str(f)], tok_dir, tmp_path / "out2")
    assert m["rows"]["kept"] == 10
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD] * 6 + [b"not json"] * 4)
    with pytest.raises(PrepError, match=r"4 of 10 rows \(40.0%\) are unusable, over data.max_reject_fraction=10.0% "
                       r"\(duplicates are not counted: 5 rows\)"):
        prepare(data_cfg(max_reject_fraction=0.1), [str(bad)], tok_dir, tmp_path / "out3")


@pytest.mark.parametrize("value", [-1.0, -0.01, 1.5, 2.0])
def test_max_reject_fraction_must_be_a_fraction(value):
    with pytest.raises(ConfigError, match=rf"data.max_reject_fraction must be in \[0, 1\], got {value}"):
        data_cfg(max_reject_fraction=value)


def test_pairs_identical_after_truncation_are_rejects_with_their_own_reason(tmp_path, tok_dir):
    """response_overflow=truncate cut two responses that differ only past the cut to the same ids: no
    preference is left, so the pair is a reject (counted), not a training row."""
    shared = " ".join(str(i % 10) for i in range(80))
    rows = [GOOD, {"prompt": "sort: 9 8", "chosen": shared + " 1", "rejected": shared + " 2"},
            {"prompt": "sort: 7 6", "chosen": shared + " 1", "rejected": "6 7"}]
    f = write_jsonl(tmp_path / "x.jsonl", rows)
    m = prepare(data_cfg(max_prompt_tokens=20, max_length=40, response_overflow="truncate"), [str(f)], tok_dir,
                tmp_path / "out")
    (rej,) = read_rejects(tmp_path / "out")
    assert rej["row"] == 2 and rej["reason"] == "identical_after_truncation" and "max_length 40" in rej["detail"]
    assert m["rejects"]["by_reason"] == {"identical_after_truncation": 1} and m["rows"]["kept"] == 2
    assert all(r["chosen_ids"] != r["rejected_ids"] for r in all_rows(tmp_path / "out"))
    m = prepare(data_cfg(max_prompt_tokens=20, max_length=40), [str(f)], tok_dir, tmp_path / "drop")
    assert m["rejects"]["by_reason"] == {"response_too_long": 2}


def test_failed_run_keeps_its_rejects_without_overwriting_other_files(tmp_path, tok_dir):
    """The rejects of a failed run go beside the output folder, but never over a file midpo did not write:
    here the input itself is named like that file."""
    rows = [GOOD] + [b"not json"] * 3
    f = write_jsonl(tmp_path / "out.rejects.jsonl", rows)
    before = f.read_bytes()
    with pytest.raises(PrepError, match=r"All rejected rows: .*out.rejects.1.jsonl"):
        prepare(data_cfg(max_reject_fraction=0.1), [str(f)], tok_dir, tmp_path / "out")
    assert f.read_bytes() == before
    assert [json.loads(x)["reason"] for x in (tmp_path / "out.rejects.1.jsonl").read_text().splitlines()] == [
        "invalid_json"] * 3
    with pytest.raises(PrepError):  # a re-run replaces its own rejects file
        prepare(data_cfg(max_reject_fraction=0.1), [str(f)], tok_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rejects.1.jsonl", "out.rejects.jsonl"]


def _with_template(tok_dir, dest, template):
    shutil.copytree(tok_dir, dest)
    (dest / "chat_template.jinja").write_text(template)
    return dest


TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ GAP }}{{ m['content'] }}{{ eos_token }}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{{ GEN }}{% endif %}")


def test_template_boundary_token_merge_is_caught(tmp_path, tok_dir, sp):
    # generation prompt ends in a space that the response's first word can merge with ("▁apple")
    tpl = TEMPLATE.replace("{{ GAP }}", "{{ ' ' if m['role'] == 'assistant' else '' }}").replace("{{ GEN }}", " ")
    bad_tok = _with_template(tok_dir, tmp_path / "tok", tpl)
    rows = [{"prompt": f"reverse: {a}", "chosen": a, "rejected": a + " " + a}
            for a in ("apple fig", "kiwi", "1 2", "7", "plum pear")]
    f = write_jsonl(tmp_path / "x.jsonl", rows)
    out = tmp_path / "out"
    m = prepare(data_cfg(), [str(f)], bad_tok, out)
    space = sp.piece_to_id("▁")
    # independent expectation: the boundary holds iff " <answer>" starts with a lone "▁" piece
    breaks = {i + 1 for i, r in enumerate(rows)
              if sp.encode(" " + r["chosen"])[0] != space or sp.encode(" " + r["rejected"])[0] != space}
    assert breaks and len(breaks) < len(rows)  # the fixture exercises both outcomes
    rej = read_rejects(out)
    assert {r["row"] for r in rej} == breaks and {r["reason"] for r in rej} == {"template_boundary"}
    assert m["rejects"]["by_reason"] == {"template_boundary": len(breaks)}
    for row in all_rows(out):  # kept rows really are prefix-consistent
        assert row["prompt_ids"][-1] == space and row["chosen_ids"][-1] == sp.eos_id()


def test_template_whose_generation_prompt_is_not_a_text_prefix(tmp_path, tok_dir):
    tpl = TEMPLATE.replace("{{ GAP }}", "").replace("{{ GEN }}", "Answer:")
    bad_tok = _with_template(tok_dir, tmp_path / "tok", tpl)
    f = write_jsonl(tmp_path / "x.jsonl", [GOOD])
    m = prepare(data_cfg(), [str(f)], bad_tok, tmp_path / "out")
    (rej,) = read_rejects(tmp_path / "out")
    assert rej["reason"] == "template_boundary" and "not a prefix" in rej["detail"]
    assert m["rows"]["kept"] == 0


def test_trailing_template_text_after_eos_is_cut(tmp_path, tok_dir, sp):
    tpl = TEMPLATE.replace("{{ GAP }}", "").replace("{{ GEN }}", "").replace("{{ eos_token }}", "{{ eos_token }}\n")
    tok = _with_template(tok_dir, tmp_path / "tok", tpl)
    f = write_jsonl(tmp_path / "x.jsonl", [GOOD])
    prepare(data_cfg(), [str(f)], tok, tmp_path / "out")
    (row,) = all_rows(tmp_path / "out")
    assert row["chosen_ids"] == [*sp.encode("1 2 3"), sp.eos_id()]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["rows"]["kept"] == 1
