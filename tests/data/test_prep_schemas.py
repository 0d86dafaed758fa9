"""Published preference schemas, as small local replicas with their real column names and nesting: rows kept,
prompt/response boundaries after the chat template, rejects by reason, rated/ranked pairs against pairs computed
here, column mapping, DatasetDict splits, compressed and sharded containers, and a three-schema mix."""

from __future__ import annotations

import gzip
import hashlib
import json
import random

import pytest
from prep_helpers import all_rows, data_cfg, expected_ids, read_rejects, write_jsonl

from midpo.data import formats
from midpo.data.formats import ReadPlan, RowReject, to_pairs
from midpo.data.prepare import prepare
from midpo.data.sources import InputError


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


# -- replicas ---------------------------------------------------------------------------------------------------

def h4_row(prompt, chosen, rejected, sc=8.0, sr=5.0, rejected_prompt=None):
    """HuggingFaceH4/ultrafeedback_binarized: chosen/rejected repeat the user turn."""
    conv_c = [U(prompt), A(chosen)]
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "chosen": conv_c,
            "rejected": [U(rejected_prompt or prompt), A(rejected)], "messages": conv_c,
            "score_chosen": sc, "score_rejected": sr}


def pku_row(prompt, r0, r1, better):
    """PKU-Alignment/PKU-SafeRLHF."""
    return {"prompt": prompt, "response_0": r0, "response_1": r1, "prompt_source": "Alpaca3-70B",
            "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B", "is_response_0_safe": True,
            "is_response_1_safe": False, "response_0_severity_level": 0, "response_1_severity_level": 2,
            "better_response_id": better, "safer_response_id": 0, "response_0_sha256": "0" * 64,
            "response_1_sha256": "1" * 64}


def shp_row(history, a, b, label, score_a=10, score_b=4):
    """stanfordnlp/SHP."""
    return {"post_id": "himc90", "domain": "askscience_train", "upvote_ratio": 0.99, "history": history,
            "c_root_id_A": "ga1", "c_root_id_B": "gb1", "created_at_utc_A": 1609981335,
            "created_at_utc_B": 1609981400, "score_A": score_a, "score_B": score_b, "human_ref_A": a,
            "human_ref_B": b, "labels": label, "seconds_difference": 65.0, "score_ratio": score_a / score_b}


def helpsteer2_row(prompt, r1, r2, strength):
    """nvidia/HelpSteer2 preference/preference.jsonl.gz."""
    return {"split": "train", "prompt": prompt, "response_1": r1, "response_2": r2,
            "preference_strength": strength, "preference_statement": "@Response 1 is better",
            "preference_elaboration": "..."}


def helpsteer3_row(prompt, r1, r2, pref):
    """nvidia/HelpSteer3 preference."""
    return {"domain": "general", "language": "english", "context": [U(prompt)], "response1": r1, "response2": r2,
            "overall_preference": pref,
            "individual_preference": [{"score": pref, "reasoning": "...", "feedback1": "", "feedback2": ""}]}


def uf_row(instruction, responses, scores):
    """openbmb/UltraFeedback (raw): completions with ratings."""
    comps = [{"annotations": {"helpfulness": {"Rating": "4", "Rationale": "..."}}, "critique": "...",
              "custom_system_prompt": "", "fine-grained_score": s / 2, "model": f"m{i}", "overall_score": s,
              "principle": "helpfulness", "response": r} for i, (r, s) in enumerate(zip(responses, scores))]
    return {"source": "evol_instruct", "instruction": instruction, "models": [c["model"] for c in comps],
            "completions": comps, "correct_answers": ["None"], "incorrect_answers": ["None"]}


def nectar_row(prompt, answers, ranks):
    """berkeley-nest/Nectar: an HH-transcript prompt and ranked answers (rank 1 best)."""
    return {"prompt": f"\n\nHuman: {prompt}\n\nAssistant:",
            "answers": [{"answer": a, "model": f"m{i}", "rank": float(r)} for i, (a, r) in enumerate(zip(answers, ranks))],
            "turns": 1, "num_responses": len(answers), "source": ["sharegpt"], "good_natured": True}


def read(row, fmt, **kw):
    plan = ReadPlan(fmt, tuple(sorted(formats.effective_columns(fmt, kw.pop("columns", {})).items())), **kw)
    return to_pairs(row, plan, "f", 1)


def reason(row, fmt, **kw):
    with pytest.raises(RowReject) as e:
        read(row, fmt, **kw)
    return e.value.reason


def texts(pair):
    return pair.prompt_messages, pair.chosen_messages[0]["content"], pair.rejected_messages[0]["content"]


# -- readers (no tokenizer) ---------------------------------------------------------------------------------------

def test_each_replica_is_detected_as_its_format():
    rows = {"conversational": h4_row("p", "a", "b"), "pku_saferlhf": pku_row("p", "a", "b", 0),
            "shp": shp_row("p", "a", "b", 1), "helpsteer2": helpsteer2_row("p", "a", "b", -1),
            "helpsteer3": helpsteer3_row("p", "a", "b", 1), "ultrafeedback": uf_row("p", ["a", "b"], [1, 2]),
            "nectar": nectar_row("p", ["a", "b"], [1, 2]),
            "rated": {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]}}
    for fmt, row in rows.items():
        assert formats.detect_formats(row) == [fmt], fmt


def test_h4_repeated_prompt_is_dropped_and_checked():
    (pair,) = read(h4_row("sort: 3 1 2", "1 2 3", "1 3 2"), "conversational")
    assert texts(pair) == ([U("sort: 3 1 2")], "1 2 3", "1 3 2")
    assert pair.meta == (8.0, 5.0, 3.0)
    assert reason(h4_row("sort: 3 1 2", "1 2 3", "1 3 2", rejected_prompt="sort: 9 9"), "conversational") \
        == "prompt_mismatch"
    # a system message in the prompt that the conversations do not repeat is not a mismatch
    row = {"prompt": [{"role": "system", "content": "be exact"}, U("q")], "chosen": [U("q"), A("x")],
           "rejected": [U("q"), A("y")]}
    (pair,) = read(row, "conversational")
    assert [m["role"] for m in pair.prompt_messages] == ["system", "user"] and pair.chosen_messages == [A("x")]


def test_two_responses_plus_label():
    assert texts(read(pku_row("p", "r0", "r1", 1), "pku_saferlhf")[0])[1:] == ("r1", "r0")
    assert texts(read(pku_row("p", "r0", "r1", 0), "pku_saferlhf")[0])[1:] == ("r0", "r1")
    assert reason(pku_row("p", "r0", "r1", None), "pku_saferlhf") == "abstention"
    assert reason(pku_row("p", "r0", "r1", -1), "pku_saferlhf") == "abstention"
    assert reason(pku_row("p", "r0", "r1", 2), "pku_saferlhf") == "wrong_type"
    # the other label of PKU through the column mapping
    row = pku_row("p", "r0", "r1", 1)
    assert texts(read(row, "pku_saferlhf", columns={"label": "safer_response_id"})[0])[1:] == ("r0", "r1")
    # SHP: labels 1 = A preferred; the upvote scores ride along
    (p,) = read(shp_row("h", "ra", "rb", 1), "shp")
    assert texts(p) == ([U("h")], "ra", "rb") and p.meta == (10.0, 4.0, 6.0)
    (p,) = read(shp_row("h", "ra", "rb", 0), "shp")
    assert texts(p)[1:] == ("rb", "ra") and p.meta == (4.0, 10.0, -6.0)
    # HelpSteer: < 0 response 1 better, > 0 response 2 better, 0 a tie; |strength| is the margin
    (p,) = read(helpsteer2_row("p", "r1", "r2", -2), "helpsteer2")
    assert texts(p)[1:] == ("r1", "r2") and p.meta == (None, None, 2.0)
    (p,) = read(helpsteer3_row("p", "r1", "r2", 3), "helpsteer3")
    assert texts(p) == ([U("p")], "r2", "r1") and p.meta[2] == 3.0
    assert reason(helpsteer2_row("p", "r1", "r2", 0), "helpsteer2") == "tie"
    assert reason(helpsteer3_row("p", "r1", "r2", None), "helpsteer3") == "abstention"


def _expected_pairs(scores, strategy, margin=0.0, rng_key=None, seed=0):
    """Reference pairing written out here: indices into `scores` (higher is better)."""
    n = len(scores)
    beats = [(i, j) for i in range(n) for j in range(n) if scores[i] > scores[j] and scores[i] - scores[j] >= margin]
    if strategy == "all_pairs":
        return beats
    best = next(i for i in range(n) if scores[i] == max(scores))
    if strategy == "best_vs_worst":
        worst = next(i for i in range(n) if scores[i] == min(scores))
        return [(best, worst)] if (best, worst) in beats else []
    cands = [j for (i, j) in beats if i == best]
    canon = json.dumps([seed, rng_key], sort_keys=True, separators=(",", ":"))
    rng = random.Random(int(hashlib.sha256(canon.encode()).hexdigest()[:16], 16))
    return [(best, cands[rng.randrange(len(cands))])] if cands else []


@pytest.mark.parametrize("strategy,margin", [("best_vs_worst", 0.0), ("best_vs_random", 0.0), ("all_pairs", 0.0),
                                             ("all_pairs", 2.0), ("best_vs_random", 2.0)])
def test_rated_and_ranked_pairs_match_the_reference(strategy, margin):
    rng = random.Random(7)
    for k in range(40):
        n = rng.randint(2, 5)
        scores = [float(rng.choice([1, 2, 3, 4, 5, 7.5])) for _ in range(n)]
        resp = [f"answer {k}.{i}" for i in range(n)]
        # UltraFeedback: overall_score, higher is better
        key = [[U(f"q{k}")], resp]
        want = _expected_pairs(scores, strategy, margin, key, seed=3)
        row = uf_row(f"q{k}", resp, scores)
        if not want:
            assert reason(row, "ultrafeedback", pairing=strategy, min_score_margin=margin, seed=3) in (
                "tie", "score_margin_too_small")
        else:
            got = read(row, "ultrafeedback", pairing=strategy, min_score_margin=margin, seed=3)
            assert [(p.chosen_messages[0]["content"], p.rejected_messages[0]["content"], p.meta) for p in got] == [
                (resp[i], resp[j], (scores[i], scores[j], scores[i] - scores[j])) for i, j in want]
        # Nectar: ranks, 1 best (rank = 10 - score keeps the same order); the margin is the rank difference
        ranks = [10 - s for s in scores]
        row = nectar_row(f"q{k}", resp, ranks)
        if want:
            got = read(row, "nectar", pairing=strategy, min_score_margin=margin, seed=3)
            assert [(p.chosen_messages[0]["content"], p.rejected_messages[0]["content"], p.meta) for p in got] == [
                (resp[i], resp[j], (ranks[i], ranks[j], ranks[j] - ranks[i])) for i, j in want]
            assert got[0].prompt_messages == [U(f"q{k}")]  # the HH-transcript prompt, parsed


def test_rated_rejects_and_seeded_draws():
    assert reason(uf_row("q", ["a", "b", "c"], [5, 5, 5]), "ultrafeedback") == "tie"
    assert reason(uf_row("q", ["a"], [5]), "ultrafeedback") == "too_few_responses"
    assert reason(uf_row("q", ["a", "b"], [5, 4.5]), "ultrafeedback", min_score_margin=1.0) == "score_margin_too_small"
    # an item without a usable score is left out, not the row
    row = uf_row("q", ["a", "b", "c"], [5, 3, 1])
    row["completions"][2]["overall_score"] = None
    assert [texts(p)[1:] for p in read(row, "ultrafeedback", pairing="all_pairs")] == [("a", "b")]
    # another score key inside the items, through the mapping
    row = uf_row("q", ["a", "b"], [5, 3])
    row["completions"][1]["fine-grained_score"] = 9
    assert texts(read(row, "ultrafeedback", columns={"score": "fine-grained_score"})[0])[1:] == ("b", "a")
    # best_vs_random: the same seed draws the same rejected response; the seed changes some draws
    rows = [uf_row(f"q{k}", [f"r{i}" for i in range(6)], [9, 1, 2, 3, 4, 5]) for k in range(30)]
    draw = lambda seed: [texts(read(r, "ultrafeedback", pairing="best_vs_random", seed=seed)[0])[2] for r in rows]  # noqa: E731
    assert draw(0) == draw(0) and draw(0) != draw(1) and len(set(draw(0))) > 1


def test_mapping_a_rated_field_selects_the_rated_reading():
    # princeton-nlp/gemma2-ultrafeedback-armorm: a binarized pair beside all the scored samples
    row = {"prompt_id": "x", "prompt": "q", "chosen": [U("q"), A("a")], "rejected": [U("q"), A("c")],
           "all_generated_responses": ["a", "b", "c"], "all_rm_scores": [0.9, 0.1, -0.5]}
    assert formats.detect_formats(row) == ["conversational"]
    cols = {"responses": "all_generated_responses", "scores": "all_rm_scores"}
    assert formats.detect_formats(row, cols) == ["rated"]
    pairs = read(row, "rated", columns=cols, pairing="all_pairs")
    assert [texts(p)[1:] for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]


def test_column_mapping_and_system_column():
    row = {"question": "q", "answer_good": "g", "answer_bad": "b", "sys": "be brief", "prompt": "not this one"}
    cols = {"prompt": "question", "chosen": "answer_good", "rejected": "answer_bad", "system": "sys"}
    assert formats.detect_formats(row, cols) == ["standard"]
    (p,) = read(row, "standard", columns=cols)
    assert texts(p) == ([{"role": "system", "content": "be brief"}, U("q")], "g", "b")
    del row["answer_bad"]
    with pytest.raises(RowReject, match="answer_bad \\(as rejected\\)"):
        read(row, "standard", columns=cols)


# -- end to end (tokenizer, containers, manifest) -----------------------------------------------------------------

H4 = [h4_row("sort: 3 1 2", "1 2 3", "1 3 2"), h4_row("reverse: fig kiwi", "kiwi fig", "fig kiwi", 9.0, 2.0),
      h4_row("dedupe: 5 5 4", "5 4", "5 5 4", rejected_prompt="dedupe: 5 4")]


def test_h4_end_to_end_ids_scores_and_rejects(tmp_path, tok_dir, sp):
    f = write_jsonl(tmp_path / "h4.jsonl", H4)
    m = prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "out")
    src = m["sources"][0]
    assert src["format"] == "conversational" and src["format_detected"] and src["rejected_by_reason"] == {
        "prompt_mismatch": 1}
    assert [r["reason"] for r in read_rejects(tmp_path / "out")] == ["prompt_mismatch"]
    got = sorted(all_rows(tmp_path / "out"), key=lambda r: r["score_chosen"])
    assert len(got) == 2 and m["rows"] == {"read": 3, "kept": 2, "rejected": 1}
    for row, (prompt, c, r, sc, sr) in zip(got, [("sort: 3 1 2", "1 2 3", "1 3 2", 8.0, 5.0),
                                                 ("reverse: fig kiwi", "kiwi fig", "fig kiwi", 9.0, 2.0)]):
        p_ids, c_ids = expected_ids(sp, prompt, c)
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (p_ids, c_ids,
                                                                              expected_ids(sp, prompt, r)[1])
        assert (row["score_chosen"], row["score_rejected"], row["score_margin"]) == (sc, sr, sc - sr)


def test_datasetdict_splits_and_test_split_as_eval(tmp_path, tok_dir):
    import datasets

    train = [h4_row(f"sort: {i} 1", f"1 {i}", f"{i} 1") for i in range(2, 8)]
    test = [h4_row(f"reverse: {i} 0", f"0 {i}", f"{i} 0") for i in range(2, 5)]
    dd = datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(train),
                               "test_prefs": datasets.Dataset.from_list(test),
                               "train_sft": datasets.Dataset.from_list(train[:1])})
    dd.save_to_disk(str(tmp_path / "h4"))
    with pytest.raises(InputError, match=r"--split NAME \(data.split"):
        prepare(data_cfg(), [str(tmp_path / "h4")], tok_dir, tmp_path / "o")
    m = prepare(data_cfg(split="train_prefs", eval_split="test_prefs", eval_fraction=0.5), [str(tmp_path / "h4")],
                tok_dir, tmp_path / "out")
    assert m["splits"]["train"]["rows"] == 6 and m["splits"]["eval"]["rows"] == 3  # the test split, whole
    assert [(s["split"], s.get("eval_split", False)) for s in m["sources"]] == [("train_prefs", False),
                                                                              ("test_prefs", True)]


def test_ambiguous_rows_are_refused_naming_the_flag(tmp_path, tok_dir):
    row = {**pku_row("p", "a", "b", 0), "chosen": "a", "rejected": "b"}  # both a pair and a labelled pair
    f = write_jsonl(tmp_path / "amb.jsonl", [row])
    with pytest.raises(InputError, match=r"several formats \(standard, pku_saferlhf.*--format NAME"):
        prepare(data_cfg(), [str(f)], tok_dir, tmp_path / "o")
    m = prepare(data_cfg(format="pku_saferlhf"), [str(f)], tok_dir, tmp_path / "o")
    assert m["sources"][0]["format"] == "pku_saferlhf" and not m["sources"][0]["format_detected"]
    assert m["sources"][0]["columns"]["label"] == "better_response_id"


def _write_zst(path, rows):
    import pyarrow as pa

    with pa.CompressedOutputStream(str(path), "zstd") as f:
        for r in rows:
            f.write(json.dumps(r).encode() + b"\n")


def test_three_schema_mix_gives_the_requested_shares(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # SHP as a Hub-style sharded parquet folder (train in two shards, and a test split not read)
    shp = [shp_row(f"sort: {i} {i + 1} 0", f"0 {i} {i + 1}", f"{i + 1} 0 {i}", 1) for i in range(24)]
    d = tmp_path / "shp" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(shp[:12]), d / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(shp[12:]), d / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(shp[:2]), d / "test-00000-of-00001.parquet")
    # PKU as gzip JSON lines, one abstention
    pku = [pku_row(f"reverse: {i} a", f"a {i}", f"{i} a", i % 2) for i in range(13)]
    pku[5]["better_response_id"] = None
    with gzip.open(tmp_path / "pku.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in pku)
    # Nectar as zstd JSON lines: all_pairs over 3 ranked answers, one all-tied row
    nectar = [nectar_row(f"dedupe: {i} {i}", [f"{i}", f"{i} {i}", f"x{i}"], [1, 2, 3]) for i in range(5)]
    nectar.append(nectar_row("dedupe: 7 7", ["7", "7 7"], [1, 1]))
    _write_zst(tmp_path / "nectar.jsonl.zst", nectar)
    mix = [{"path": str(tmp_path / "shp"), "weight": 2, "split": "train"},
           {"path": str(tmp_path / "pku.jsonl.gz"), "weight": 1},
           {"path": str(tmp_path / "nectar.jsonl.zst"), "weight": 1, "pairing": "all_pairs"}]
    cfg = data_cfg(mix=mix, eval_fraction=0.1, seed=5)
    m = prepare(cfg, [], tok_dir, tmp_path / "out")
    # valid pairs: shp 24, pku 12, nectar 5 rows x 3 pairs = 15; shares 2:1:1 -> 24, 12, 12 (nectar loses 3)
    by = {r["input"]: r for r in m["mix"]}
    assert [by[e["path"]]["rows_kept"] for e in mix] == [24, 12, 12]
    rows = all_rows(tmp_path / "out")
    assert [sum(r["source"] == e["path"] for r in rows) for e in mix] == [24, 12, 12]
    assert all(by[e["path"]]["rows_eval"] >= 1 for e in mix)  # each source represented in eval
    # per-source counts add up to the totals
    for key, total in (("rows_read", "read"), ("rows_kept", "kept"), ("rows_rejected", "rejected"),
                       ("rows_dropped_by_mix", "dropped_by_mix")):
        assert sum(s[key] for s in m["sources"]) == m["rows"][total], key
    # nectar: 5 rows x 3 pairs + 1 tied row = 16 units from 6 rows (10 extra)
    assert m["rows"] == {"read": 24 + 13 + 6, "kept": 48, "rejected": 2, "extra_pairs": 10, "dropped_by_mix": 3}
    assert m["rejects"]["by_reason"] == {"abstention": 1, "tie": 1}
    assert [s["format"] for s in m["sources"]] == ["shp", "pku_saferlhf", "nectar"]
    assert all(len(s["fingerprint"]) == 16 for s in m["sources"])
    # deterministic: the same mix again selects the same pairs
    m2 = prepare(cfg, [], tok_dir, tmp_path / "out2")
    assert sorted(r["id"] for r in all_rows(tmp_path / "out2")) == sorted(r["id"] for r in rows)
    assert m2["mix"] == m["mix"]


def test_cli_columns_flag(tmp_path, tok_dir, sp):
    from midpo import cli

    rows = [{"question": "sort: 2 1", "answer_good": "1 2", "answer_bad": "2 1", "sys": "be exact"}]
    f = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "out"
    assert cli.main(["prep", str(f), "--tokenizer", str(tok_dir), "--out", str(out), "--eval-fraction", "0",
                     "--columns", "prompt=question,chosen=answer_good,rejected=answer_bad,system=sys"]) == 0
    (row,) = all_rows(out)
    p, c = expected_ids(sp, "sort: 2 1", "1 2", system="be exact")
    assert (row["prompt_ids"], row["chosen_ids"]) == (p, c)
    m = json.loads((out / "manifest.json").read_text())
    assert m["sources"][0]["columns"] == {"prompt": "question", "chosen": "answer_good", "rejected": "answer_bad",
                                          "system": "sys"}


def test_mix_takes_shares_and_caps():
    from midpo.data.prepare import mix_takes

    # weights 2:1:1 over 24, 12, 15 valid pairs: the largest mix with those shares is 48 pairs
    assert mix_takes([24, 12, 15], [2, 1, 1], [None] * 3) == [24, 12, 12]
    # a cap bounds its input and, with weights, the whole mix (shares kept): 6 of the second -> 12, 6, 6
    assert mix_takes([24, 12, 15], [2, 1, 1], [None, 6, None]) == [12, 6, 6]
    # no weights: every valid pair, up to each cap
    assert mix_takes([24, 12, 15], [None] * 3, [10, None, 100]) == [10, 12, 15]
    # shares that do not divide evenly round down to whole pairs
    assert mix_takes([10, 10], [1, 2], [None, None]) == [5, 10]
