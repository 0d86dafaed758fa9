"""Each input format, each container, end to end: ids must equal hand-built expected ids."""

from __future__ import annotations

import codecs
import json

import pytest
from prep_helpers import all_rows, data_cfg, expected_ids, read_rejects, write_jsonl

from midpo.data import sources
from midpo.data.prepare import prepare
from midpo.data.sources import InputError

STD = [
    {"prompt": "sort: 3 1 2", "chosen": "1 2 3", "rejected": "1 3 2", "extra": [1, 2]},
    {"prompt": "reverse: fig kiwi", "chosen": "kiwi fig", "rejected": "fig kiwi", "score": None},
    {"prompt": "dedupe: 5 5 4", "chosen": "5 4", "rejected": "5 5 4"},
]


def _expected_by_prompt(sp, rows, system=None):
    out = {}
    for prompt, chosen, rejected in rows:
        p, c = expected_ids(sp, prompt, chosen, system)
        _, r = expected_ids(sp, prompt, rejected, system)
        out[tuple(p)] = (c, r)
    return out


def _check(out, sp, triples, system=None):
    got = all_rows(out)
    want = _expected_by_prompt(sp, triples, system)
    assert len(got) == len(want)
    for row in got:
        assert (row["chosen_ids"], row["rejected_ids"]) == want[tuple(row["prompt_ids"])]


def test_standard_jsonl(tmp_path, tok_dir, sp):
    f = write_jsonl(tmp_path / "std.jsonl", STD)
    m = prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "out")
    assert m["sources"][0]["format"] == "standard" and m["sources"][0]["format_detected"]
    _check(tmp_path / "out", sp, [(r["prompt"], r["chosen"], r["rejected"]) for r in STD])


def test_conversational(tmp_path, tok_dir, sp):
    rows = [{"prompt": [{"role": "system", "content": "be exact"}, {"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in STD]
    f = write_jsonl(tmp_path / "conv.jsonl", rows)
    m = prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "out")
    assert m["sources"][0]["format"] == "conversational"
    _check(tmp_path / "out", sp, [(r["prompt"], r["chosen"], r["rejected"]) for r in STD], system="be exact")


def test_implicit_prompt(tmp_path, tok_dir, sp):
    rows = []
    for r in STD:
        user = {"role": "user", "content": r["prompt"]}
        rows.append({"chosen": [user, {"role": "assistant", "content": r["chosen"]}],
                     "rejected": [user, {"role": "assistant", "content": r["rejected"]}], "prompt_id": "x"})
    f = write_jsonl(tmp_path / "implicit.jsonl", rows)
    m = prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "out")
    assert m["sources"][0]["format"] == "implicit"
    _check(tmp_path / "out", sp, [(r["prompt"], r["chosen"], r["rejected"]) for r in STD])


def test_implicit_multi_turn_prompt(tmp_path, tok_dir, sp):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "sort: 2 1"}]
    row = {"chosen": conv + [{"role": "assistant", "content": "1 2"}],
           "rejected": conv + [{"role": "assistant", "content": "2 1"}]}
    f = write_jsonl(tmp_path / "mt.jsonl", [row])
    prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "out")
    (got,) = all_rows(tmp_path / "out")
    user, asst, eos = sp.piece_to_id("<|user|>"), sp.piece_to_id("<|assistant|>"), sp.eos_id()
    want_prompt = [sp.bos_id(), user, *sp.encode("hi"), eos, asst, *sp.encode("hello"), eos,
                   user, *sp.encode("sort: 2 1"), eos, asst]
    assert got["prompt_ids"] == want_prompt
    assert got["chosen_ids"] == [*sp.encode("1 2"), eos]


def test_hh_rlhf(tmp_path, tok_dir, sp):
    rows = [{"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
             "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}"} for r in STD]
    rows.append({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: sort: 9 8\n\nAssistant: 8 9",
                 "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: sort: 9 8\n\nAssistant: 9 8"})
    f = write_jsonl(tmp_path / "hh.jsonl", rows)
    m = prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "out")
    assert m["sources"][0]["format"] == "hh"
    got = {tuple(r["prompt_ids"]): r for r in all_rows(tmp_path / "out")}
    user, asst, eos = sp.piece_to_id("<|user|>"), sp.piece_to_id("<|assistant|>"), sp.eos_id()
    multi = (sp.bos_id(), user, *sp.encode("hi"), eos, asst, *sp.encode("hello"), eos,
             user, *sp.encode("sort: 9 8"), eos, asst)
    assert got[multi]["chosen_ids"] == [*sp.encode("8 9"), eos]
    assert got[multi]["rejected_ids"] == [*sp.encode("9 8"), eos]
    p, c = expected_ids(sp, STD[0]["prompt"], STD[0]["chosen"])
    assert got[tuple(p)]["chosen_ids"] == c


def test_forced_format_and_unknown_format(tmp_path, tok_dir):
    f = write_jsonl(tmp_path / "std.jsonl", STD)
    m = prepare(data_cfg(format="conversational"), [str(f)], tok_dir, tmp_path / "out")
    assert m["sources"][0]["format"] == "conversational" and not m["sources"][0]["format_detected"]
    assert m["rows"]["kept"] == 3  # string prompts/responses follow the plain-string rule
    with pytest.raises(ValueError, match="choose one of auto, standard, conversational, implicit, hh"):
        prepare(data_cfg(format="sharegpt"), [str(f)], tok_dir, tmp_path / "out2")


def test_undetectable_format_is_a_clear_error(tmp_path, tok_dir):
    f = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(InputError, match=r"odd.jsonl: cannot detect .*\['answer', 'question'\].*--format"):
        prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "out")


def test_system_prompt_setting(tmp_path, tok_dir, sp):
    f = write_jsonl(tmp_path / "std.jsonl", STD)
    prepare(data_cfg(system_prompt="be exact"), [str(f)], tok_dir, tmp_path / "out")
    _check(tmp_path / "out", sp, [(r["prompt"], r["chosen"], r["rejected"]) for r in STD], system="be exact")


# ---------------------------------------------------------------------------------------------
# containers


def _triples():
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in STD]


def test_json_array_streams_across_chunk_boundaries(tmp_path, tok_dir, sp, monkeypatch):
    monkeypatch.setattr(sources, "_JSON_CHUNK", 7)  # force elements and numbers to straddle chunks
    rows = [dict(r, n=123456789) for r in STD]
    f = tmp_path / "arr.json"
    f.write_text("\ufeff[\n " + ",\n ".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n", encoding="utf-8")
    got = [v for _, v in sources.iter_rows(sources.resolve_inputs([str(f)])[0])]
    assert got == rows
    prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "out")
    _check(tmp_path / "out", sp, _triples())


def test_json_array_syntax_error_is_a_reject_not_a_crash(tmp_path, tok_dir):
    f = tmp_path / "bad.json"
    f.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": ]')
    m = prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "out")
    assert m["rows"] == {"read": 2, "kept": 1, "rejected": 1}
    (rej,) = read_rejects(tmp_path / "out")
    assert rej["reason"] == "invalid_json" and rej["row"] == 2 and "rest of the file" in rej["detail"]


def test_json_lines_with_json_extension(tmp_path, tok_dir, sp):
    f = write_jsonl(tmp_path / "lines.json", STD)
    prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "out")
    _check(tmp_path / "out", sp, _triples())


def test_parquet_arrow_and_save_to_disk(tmp_path, tok_dir, sp):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(STD[:2])
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=1)
    with pa.ipc.new_file(str(tmp_path / "b.arrow"), table.schema) as w:  # IPC file format
        w.write_table(table)
    rest = pa.Table.from_pylist(STD[2:])
    with pa.ipc.new_stream(str(tmp_path / "c.arrow"), rest.schema) as w:  # IPC stream format
        w.write_table(rest)
    datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in STD]).save_to_disk(str(tmp_path / "hf"), num_shards=2)
    for inputs in ([str(tmp_path / "a.parquet")], [str(tmp_path / "b.arrow")], [str(tmp_path / "hf")]):
        out = tmp_path / ("out_" + inputs[0].rsplit("/", 1)[-1].replace(".", "_"))
        m = prepare(data_cfg(), inputs, tok_dir, out)
        n = len(m["sources"][0]["files"])
        assert n == (2 if inputs[0].endswith("hf") else 1)
        _check(out, sp, _triples()[: 3 if inputs[0].endswith("hf") else 2])
    # a glob over two files of different containers, in sorted order
    m = prepare(data_cfg(), [str(tmp_path / "[bc].arrow")], tok_dir, tmp_path / "out_glob")
    assert [s["path"].rsplit("/", 1)[-1] for s in m["sources"]] == ["b.arrow", "c.arrow"]
    _check(tmp_path / "out_glob", sp, _triples())


def test_input_errors_name_the_input(tmp_path, tok_dir):
    import datasets

    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match=r"x.csv: unsupported file type .csv"):
        prepare(data_cfg(), [str(tmp_path / "x.csv")], tok_dir, tmp_path / "o")
    with pytest.raises(InputError, match="matches no files"):
        prepare(data_cfg(), [str(tmp_path / "*.jsonl")], tok_dir, tmp_path / "o")
    with pytest.raises(InputError, match="does not exist"):
        prepare(data_cfg(), [str(tmp_path / "nope.jsonl")], tok_dir, tmp_path / "o")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(STD)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=r"DatasetDict with splits \['train'\]; pass one split folder"):
        prepare(data_cfg(), [str(tmp_path / "dd")], tok_dir, tmp_path / "o")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a datasets.save_to_disk folder"):
        prepare(data_cfg(), [str(tmp_path / "plain")], tok_dir, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.json"])
def test_utf8_bom_does_not_cost_the_first_row(tmp_path, tok_dir, sp, name):
    """Editors on Windows start a file with a byte-order mark; it is not part of the first row (which used
    to be rejected as invalid JSON: with max_reject_fraction=0 the whole stage failed)."""
    f = tmp_path / name
    f.write_bytes(codecs.BOM_UTF8 + b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in STD))
    m = prepare(data_cfg(max_reject_fraction=0.0), [str(f)], tok_dir, tmp_path / "out")
    assert m["rows"] == {"read": 3, "kept": 3, "rejected": 0}
    _check(tmp_path / "out", sp, _triples())


def test_utf16_and_empty_inputs_are_errors_naming_the_file(tmp_path, tok_dir):
    good = write_jsonl(tmp_path / "good.jsonl", STD)
    u16 = tmp_path / "u16.jsonl"
    u16.write_bytes("\n".join(json.dumps(r) for r in STD).encode("utf-16"))  # with its byte-order mark
    with pytest.raises(InputError, match=r"u16.jsonl is UTF-16 encoded"):
        prepare(data_cfg(), [str(good), str(u16)], tok_dir, tmp_path / "out")
    for name, content in (("empty.jsonl", b""), ("blank.jsonl", b"\n \n"), ("empty.json", b"[]")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match=rf"{name} holds no rows"):
            prepare(data_cfg(), [str(good), str(tmp_path / name)], tok_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
