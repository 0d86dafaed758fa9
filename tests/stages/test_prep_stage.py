"""Stage behaviour: round-trip of the synthetic data, splits, fingerprints, truncation, re-runs,
atomic output, parallel workers, the reader module and the CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from prep_helpers import all_rows, data_cfg, expected_ids, read_rejects, write_jsonl

from midpo.config import DataConfig
from midpo.data import prepare as prep
from midpo.data import shards as arrow_shards
from midpo.data.prepare import prepare
from midpo.data.tokenization import is_eval
from midpo.runtime.prepared import DataNotReady, load_split, read_manifest


def _synth_rows(tiny_default):
    return [json.loads(line) for line in tiny_default["pairs"].read_text().splitlines()]


@pytest.fixture(scope="module")
def prepared(tiny_default, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    cfg = data_cfg(eval_fraction=0.2, shard_rows=64, max_reject_fraction=0.05)
    m = prepare(cfg, [str(tiny_default["pairs"])], tiny_default["model"], out)
    return out, m, cfg


def test_arrow_round_trips_to_independently_tokenized_ids(prepared, tiny_default, sp):
    import datasets

    out, m, _ = prepared
    rows = _synth_rows(tiny_default)
    want = {}
    for r in rows:
        p, c = expected_ids(sp, r["prompt"], r["chosen"])
        _, rj = expected_ids(sp, r["prompt"], r["rejected"])
        want[tuple(p)] = (c, rj)
    got = all_rows(out)
    assert len(got) == len(rows) == m["rows"]["kept"]
    for g in got:
        assert (g["chosen_ids"], g["rejected_ids"]) == want[tuple(g["prompt_ids"])]
        assert g["chosen_ids"][-1] == sp.eos_id() and g["rejected_ids"][-1] == sp.eos_id()
    train = load_split(out, "train")
    assert train.features["prompt_ids"].feature.dtype == "int32"
    assert train.features["id"].dtype == "string"
    assert len(list((out / "train").glob("data-*.arrow"))) == m["splits"]["train"]["shards"] > 1
    assert datasets.load_from_disk(str(out / "eval")).num_rows == m["splits"]["eval"]["rows"]
    tokens = sum(len(x) for x in train["chosen_ids"])
    assert m["splits"]["train"]["tokens"]["chosen"] == tokens


def test_manifest_records_the_longest_pair(prepared):
    """prompt + longer response, in tokens, over every kept row: what a model's positions must cover."""
    out, m, _ = prepared
    assert m["longest_pair_tokens"] == max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
                                           for r in all_rows(out))


def test_split_is_deterministic_by_id(prepared):
    out, m, cfg = prepared
    train, ev = load_split(out, "train"), load_split(out, "eval")
    assert 0.1 < len(ev) / (len(ev) + len(train)) < 0.3
    # independent of the writer: recompute the split rule from the id
    for rid in train["id"]:
        assert int(rid[:16], 16) / 2**64 >= cfg.eval_fraction
    for rid in ev["id"]:
        assert int(rid[:16], 16) / 2**64 < cfg.eval_fraction
    assert len(set(train["id"]) | set(ev["id"])) == m["rows"]["kept"]


def test_row_id_is_content_hash_independent_of_location(tmp_path, tok_dir):
    rows = [{"prompt": f"sort: {i} 1", "chosen": f"1 {i}", "rejected": f"{i} 1"} for i in range(2, 12)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", [{"x": 0, **r} for r in reversed(rows)])  # extra column, other order
    ma = prepare(data_cfg(eval_fraction=0.3), [str(a)], tok_dir, tmp_path / "oa")
    mb = prepare(data_cfg(eval_fraction=0.3), [str(b)], tok_dir, tmp_path / "ob")
    ida = {s: set(load_split(tmp_path / "oa", s)["id"]) for s in ("train", "eval")}
    idb = {s: set(load_split(tmp_path / "ob", s)["id"]) for s in ("train", "eval")}
    assert ida == idb and ida["eval"] and ida["train"]
    assert ma["fingerprint"] != mb["fingerprint"]  # different input bytes


def test_manifest_contents(prepared, tiny_default):
    out, m, cfg = prepared
    assert read_manifest(out) == m
    assert m["format_version"] >= 1 and m["complete"] is True
    assert m["tokenizer"]["eos_token_id"] == 2 and "chat_template.jinja" in m["tokenizer"]["files"]
    assert m["truncation"]["max_prompt_tokens"] == cfg.max_prompt_tokens
    assert m["truncation"]["max_length"] == cfg.max_length
    (src,) = m["sources"]
    assert src["files"][0]["size"] == tiny_default["pairs"].stat().st_size
    import hashlib

    assert src["files"][0]["sha256"] == hashlib.sha256(tiny_default["pairs"].read_bytes()).hexdigest()
    assert m["splits"]["train"]["rows"] + m["splits"]["eval"]["rows"] == m["rows"]["kept"]
    assert (out / "rejects.jsonl").exists()


def test_fingerprint_stable_and_sensitive(tmp_path, tok_dir, prepared, tiny_default):
    out, m, cfg = prepared
    # same input and settings into a fresh folder: same fingerprint and identical shards
    m2 = prepare(cfg, [str(tiny_default["pairs"])], tiny_default["model"], tmp_path / "again")
    assert m2["fingerprint"] == m["fingerprint"]
    for split in ("train", "eval"):
        assert load_split(tmp_path / "again", split).to_list() == load_split(out, split).to_list()
    # the tokenizer folder of the model and the standalone one hold identical tokenizer files
    m3 = prepare(cfg, [str(tiny_default["pairs"])], tok_dir, tmp_path / "tokdir")
    assert m3["fingerprint"] == m["fingerprint"]
    # changed setting
    m4 = prepare(dataclasses.replace(cfg, max_length=150), [str(tiny_default["pairs"])], tok_dir, tmp_path / "s")
    assert m4["fingerprint"] != m["fingerprint"]
    # settings that do not change the output do not change the fingerprint
    m5 = prepare(dataclasses.replace(cfg, max_reject_fraction=0.5), [str(tiny_default["pairs"])], tok_dir,
                 tmp_path / "s2")
    assert m5["fingerprint"] == m["fingerprint"]
    # changed tokenizer (only its chat template)
    tok2 = tmp_path / "tok2"
    shutil.copytree(tok_dir, tok2)
    (tok2 / "chat_template.jinja").write_text((tok2 / "chat_template.jinja").read_text() + "{# v2 #}")
    m6 = prepare(cfg, [str(tiny_default["pairs"])], tok2, tmp_path / "t")
    assert m6["fingerprint"] != m["fingerprint"]
    # changed input (one byte)
    changed = tmp_path / "pairs.jsonl"
    changed.write_bytes(tiny_default["pairs"].read_bytes().replace(b"sort", b"sorT", 1))
    m7 = prepare(cfg, [str(changed)], tok_dir, tmp_path / "i")
    assert m7["fingerprint"] != m["fingerprint"]


def test_rerun_is_a_noop_and_changed_input_rebuilds(tmp_path, tok_dir, caplog):
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "sort: 2 1", "chosen": "1 2", "rejected": "2 1"}])
    out = tmp_path / "out"
    m1 = prepare(data_cfg(), [str(f)], tok_dir, out)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="midpo.data.prepare"):
        m2 = prepare(data_cfg(), [str(f)], tok_dir, out)
    assert m2 == m1 and (out / "manifest.json").stat().st_mtime_ns == stamp
    assert "up to date" in caplog.text
    write_jsonl(f, [{"prompt": "sort: 2 1", "chosen": "1 2", "rejected": "2 1"},
                    {"prompt": "sort: 3 1", "chosen": "1 3", "rejected": "3 1"}])
    m3 = prepare(data_cfg(), [str(f)], tok_dir, out)
    assert m3["fingerprint"] != m1["fingerprint"] and len(all_rows(out)) == 2


def test_crash_leaves_previous_output_intact_and_no_partial(tmp_path, tok_dir, monkeypatch):
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "sort: 2 1", "chosen": "1 2", "rejected": "2 1"}])
    out = tmp_path / "out"
    m1 = prepare(data_cfg(), [str(f)], tok_dir, out)

    def crash(self, fingerprint):
        raise RuntimeError("disk full")

    monkeypatch.setattr(arrow_shards.SplitWriter, "close", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(data_cfg(max_length=100), [str(f)], tok_dir, out)
    assert read_manifest(out) == m1  # the old, complete output still stands
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(RuntimeError):
        prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_reader_refuses_incomplete_folders(tmp_path, prepared):
    out, _, _ = prepared
    with pytest.raises(DataNotReady, match="no manifest.json"):
        read_manifest(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    m = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    with pytest.raises(DataNotReady, match="not marked complete"):
        load_split(broken, "train")
    (broken / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(broken / "eval")
    with pytest.raises(DataNotReady, match="split folder missing"):
        load_split(broken, "eval")
    with pytest.raises(ValueError, match="unknown split"):
        load_split(out, "test")


def test_truncation_policies(tmp_path, tok_dir, sp):
    prompt = "sort: " + " ".join(str(i % 10) for i in range(60))
    answer = " ".join(str(i % 10) for i in range(30))
    f = write_jsonl(tmp_path / "long.jsonl", [{"prompt": prompt, "chosen": answer, "rejected": "0"}])
    full_p, full_c = expected_ids(sp, prompt, answer)
    assert len(full_p) > 40 and len(full_c) > 30
    cfg = DataConfig(max_prompt_tokens=40, max_length=60, response_overflow="truncate", eval_fraction=0.0,
                     max_reject_fraction=1.0)
    m = prepare(cfg, [str(f)], tok_dir, tmp_path / "t")
    (row,) = all_rows(tmp_path / "t")
    assert row["prompt_ids"] == [sp.bos_id()] + full_p[-39:]  # BOS + the END of the prompt
    assert row["chosen_ids"] == full_c[:20]  # cut to max_length - 40, no EOS appended
    assert row["rejected_ids"] == [*sp.encode("0"), sp.eos_id()]
    assert m["truncation"]["prompts_truncated"] == 1 and m["truncation"]["responses_truncated"] == 1
    m = prepare(dataclasses.replace(cfg, response_overflow="drop"), [str(f)], tok_dir, tmp_path / "d")
    assert m["rejects"]["by_reason"] == {"response_too_long": 1}
    m = prepare(dataclasses.replace(cfg, prompt_overflow="drop"), [str(f)], tok_dir, tmp_path / "pd")
    assert m["rejects"]["by_reason"] == {"prompt_too_long": 1}
    assert read_rejects(tmp_path / "pd")[0]["row"] == 1


def test_parallel_workers_give_identical_output(tmp_path, tiny_default, prepared, monkeypatch):
    out, m, cfg = prepared
    monkeypatch.setattr(prep, "CHUNK_ROWS", 37)  # many chunks in flight, odd sizes
    monkeypatch.setattr(prep, "CHUNK_BYTES", 3000)  # ... some cut by their bytes first
    mp_ = prepare(dataclasses.replace(cfg, num_proc=2), [str(tiny_default["pairs"])], tiny_default["model"],
                  tmp_path / "p2")
    assert mp_["fingerprint"] == m["fingerprint"]
    for split in ("train", "eval"):
        assert load_split(tmp_path / "p2", split).to_list() == load_split(out, split).to_list()


def test_is_eval_is_a_pure_function_of_the_id():
    ids = [f"{i:032x}" for i in range(0, 2**64, 2**58)]
    assert [is_eval(x, 0.5) for x in ids] == [is_eval(x, 0.5) for x in ids]
    assert not any(is_eval(x, 0.0) for x in ids)


# ---------------------------------------------------------------------------------------------
# integrity: the up-to-date check re-hashes the output; --force (issue #14)


def _three_rows(tmp_path):
    rows = [{"prompt": f"sort: {i} 1", "chosen": f"1 {i}", "rejected": f"{i} 1"} for i in range(2, 8)]
    return write_jsonl(tmp_path / "x.jsonl", rows)


@pytest.mark.parametrize("damage", ["corrupt", "delete", "rows", "no_hashes"])
def test_damaged_or_edited_output_is_refused_then_rebuilt(tmp_path, tok_dir, caplog, damage):
    """A damaged shard, a deleted shard, a hand-edited row count or an older manifest without hashes:
    the reader refuses naming the file; `prepare` with the same inputs rebuilds instead of "up to date"."""
    f, out = _three_rows(tmp_path), tmp_path / "out"
    cfg = data_cfg(eval_fraction=0.3)
    m1 = prepare(cfg, [str(f)], tok_dir, out)
    shard = out / "train" / "data-00000-of-00001.arrow"
    manifest = out / "manifest.json"
    if damage == "corrupt":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        data[len(data) // 2 + 3] ^= 0x40
        shard.write_bytes(bytes(data))
        want = f"{shard}: content hash differs from {manifest} (damaged or edited)"
    elif damage == "delete":
        shard.unlink()
        want = f"{shard}: missing (recorded in {manifest})"
    elif damage == "rows":
        manifest.write_text(json.dumps({**m1, "splits": {**m1["splits"], "train": {
            **m1["splits"]["train"], "rows": m1["splits"]["train"]["rows"] + 1}}}))
        want = f"{manifest}: says {m1['splits']['train']['rows'] + 1} rows for train/ but its files hold"
    else:
        manifest.write_text(json.dumps({**m1, "splits": {s: {k: v for k, v in r.items() if k != "sha256"}
                                                          for s, r in m1["splits"].items()}}))
        want = f"{manifest}: no content hashes for train/"
    with pytest.raises(DataNotReady) as e:
        load_split(out, "train")
    assert str(e.value).startswith(want) and str(e.value).endswith("; re-run `midpo prep --force`"), str(e.value)
    stamp = manifest.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="midpo.data.prepare"):
        m2 = prepare(cfg, [str(f)], tok_dir, out)
    assert "up to date" not in caplog.text and f"{want}" in caplog.text and "rebuilding" in caplog.text
    assert manifest.stat().st_mtime_ns != stamp and m2["splits"] == m1["splits"]
    assert len(all_rows(out)) == 6  # readable again


def test_force_rebuilds_a_complete_output(tmp_path, tok_dir, caplog):
    from midpo import cli

    f, out = _three_rows(tmp_path), tmp_path / "out"
    m1 = prepare(data_cfg(), [str(f)], tok_dir, out)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare(data_cfg(), [str(f)], tok_dir, out) == m1 and (out / "manifest.json").stat().st_mtime_ns == stamp
    m2 = prepare(data_cfg(), [str(f)], tok_dir, out, force=True)
    assert (out / "manifest.json").stat().st_mtime_ns != stamp and m2["splits"] == m1["splits"]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    argv = ["prep", str(f), "--tokenizer", str(tok_dir), "--out", str(out), "--eval-fraction", "0",
            "--max-reject-fraction", "1", "--max-prompt-tokens", "96", "--max-length", "160"]
    assert cli.main(argv) == 0 and (out / "manifest.json").stat().st_mtime_ns == stamp  # up to date
    assert cli.main([*argv, "--force"]) == 0 and (out / "manifest.json").stat().st_mtime_ns != stamp
