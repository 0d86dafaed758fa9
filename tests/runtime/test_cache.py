"""The trainer-side reader: refusal of stale caches (naming what changed), per-row verification and
join; and the top-k cache: its columns against an independent full log-softmax, and the error of the
top-k + tail KL approximation against the exact KL(pi_ref || pi_theta) for perturbed policies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ref_helpers import make_rows, make_run, run_stage, write_data  # noqa: E402
from train_helpers import (  # noqa: E402
    fake_logps,
    fake_ref_stage,
    fake_score,
    flip_two_bytes,
    float_offset,
    reseal,
    rewrite_split,
)

from midpo.runtime.cache import REF_COLUMNS, TOPK_COLUMNS, CacheMismatchError, join_cache, open_cache, verify_rows


@pytest.fixture
def run_dir(tmp_path):
    data_dir = write_data(tmp_path / "data", {"train": make_rows(6, 1), "eval": make_rows(3, 2)})
    fake_ref_stage(tmp_path / "ref", data_dir)  # the stage's real writer, stand-in values
    return tmp_path


def _set_data_manifest(data_dir: Path, **changes) -> dict:
    m = json.loads((data_dir / "manifest.json").read_text())
    for k, v in changes.items():
        if k == "tokenizer":
            m["tokenizer"]["fingerprint"] = v
        else:
            m[k] = v
    (data_dir / "manifest.json").write_text(json.dumps(m))
    return m


def test_open_cache_accepts_matching_and_joins(run_dir):
    from datasets import load_from_disk

    cache = open_cache(run_dir / "ref", run_dir / "data", "train", expect_reference_fp="ref-fp-1",
                       expect_tokenizer_fp="tok-test-1")
    data = load_from_disk(str(run_dir / "data" / "train"))
    joined = join_cache(data, cache)
    assert joined["id"] == data["id"]
    assert joined[2]["rejected_ref_logps"] == fake_logps(data[2], "rejected").tolist()
    assert set(REF_COLUMNS) - {"id", "tokens_hash"} <= set(joined.column_names)


@pytest.mark.parametrize("what", ["data", "tokenizer", "reference"])
def test_open_cache_refuses_changed_fingerprint_naming_it(run_dir, what):
    data_dir = run_dir / "data"
    kwargs = {"expect_reference_fp": "ref-fp-1"}
    if what == "data":
        _set_data_manifest(data_dir, fingerprint="data-fp-NEW")
        expected, found = "data-fp-NEW", json.loads((run_dir / "ref" / "manifest.json").read_text())["data_fingerprint"]
    elif what == "tokenizer":
        kwargs["expect_tokenizer_fp"] = "tok-NEW"
        expected, found = "tok-NEW", "tok-test-1"
    else:
        kwargs["expect_reference_fp"] = "ref-fp-NEW"
        expected, found = "ref-fp-NEW", "ref-fp-1"
    with pytest.raises(CacheMismatchError) as e:
        open_cache(run_dir / "ref", data_dir, "train", **kwargs)
    msg = str(e.value)
    label = {"data": "data fingerprint", "tokenizer": "tokenizer fingerprint", "reference": "reference model"}[what]
    assert f"{label}" in msg and f"expected {expected}, cache has {found}" in msg
    assert msg.count("differs") == 1  # only what changed is named


def test_incomplete_cache_and_row_mismatch_are_refused(run_dir):
    from datasets import Dataset, load_from_disk

    (run_dir / "ref" / "manifest.json").rename(run_dir / "ref" / "manifest.bak")
    (run_dir / "ref" / ".work").mkdir()
    with pytest.raises(CacheMismatchError, match="incomplete"):
        open_cache(run_dir / "ref", run_dir / "data", "train")
    (run_dir / "ref" / "manifest.bak").rename(run_dir / "ref" / "manifest.json")
    cache = open_cache(run_dir / "ref", run_dir / "data", "train")
    rows = load_from_disk(str(run_dir / "data" / "train")).to_list()
    rows[4]["chosen_ids"] = rows[4]["chosen_ids"][:-2] + [7, rows[4]["chosen_ids"][-1]]  # same id, other tokens
    with pytest.raises(CacheMismatchError, match=r"row 4 \(id row-1-0004\): token ids differ"):
        verify_rows(Dataset.from_list(rows), cache)
    rows = load_from_disk(str(run_dir / "data" / "train")).to_list()
    rows[1], rows[2] = rows[2], rows[1]  # reordered data
    with pytest.raises(CacheMismatchError, match="row 1: data id 'row-1-0002' != cache id 'row-1-0001'"):
        verify_rows(Dataset.from_list(rows), cache)


def test_topk_cache_and_kl_approximation_error(tmp_path):
    """Stage run with ref.topk=8 (vocab 128): cached top-k == independent full log-softmax; then the
    KL(pi_ref || pi_theta) from top-k + tail vs exact for a perturbed policy: a lower bound whose gap
    shrinks with k and vanishes at k = V."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from midpo.core.logprobs import per_token_kl, per_token_kl_topk, topk_logprobs

    k = 8
    recipe = make_run(tmp_path, n_train=5, n_eval=2, extra=f"  topk: {k}\n")
    run_stage(recipe, 1)
    cache = load_from_disk(str(tmp_path / "run" / "ref" / "train"))
    assert set(TOPK_COLUMNS) <= set(cache.column_names)
    data = load_from_disk(str(tmp_path / "run" / "data" / "train"))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p) * p.std())

    rows = []
    for row, c in zip(data, cache, strict=True):
        for side in ("chosen", "rejected"):
            ids = torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])
            sl = slice(len(row["prompt_ids"]) - 1, ids.shape[1] - 1)  # positions predicting response tokens
            with torch.no_grad():
                ref_logits, pol_logits = ref(input_ids=ids).logits[0, sl], policy(input_ids=ids).logits[0, sl]
            full = ref_logits.log_softmax(-1)  # (L, V)
            vals = torch.tensor(c[f"{side}_ref_topk_logps"])  # (L, k)
            idx = torch.tensor(c[f"{side}_ref_topk_ids"]).long()
            tail = torch.tensor(c[f"{side}_ref_tail_logmass"])  # (L,)
            torch.testing.assert_close(vals, full.topk(k, -1).values, atol=2e-5, rtol=0)
            torch.testing.assert_close(full.gather(-1, idx), vals, atol=2e-5, rtol=0)
            torch.testing.assert_close(tail, torch.log1p(-vals.exp().sum(-1)), atol=1e-4, rtol=0)
            resp = torch.tensor(row[f"{side}_ids"])
            torch.testing.assert_close(torch.tensor(c[f"{side}_ref_logps"]), full.gather(-1, resp[:, None])[:, 0],
                                       atol=2e-5, rtol=0)
            rows.append((ref_logits, pol_logits, vals, idx, tail))

    exact = torch.cat([per_token_kl(r, p) for r, p, *_ in rows])
    approx_cached = torch.cat([per_token_kl_topk(v, i, t, p) for _, p, v, i, t in rows])
    assert (approx_cached <= exact + 1e-6).all()  # coarsening never increases KL
    errors = {}
    for kk in (1, 4, 8, 32, 128):
        approx = torch.cat([per_token_kl_topk(*topk_logprobs(r, kk), p) for r, p, *_ in rows])
        assert (approx <= exact + 1e-6).all()
        errors[kk] = float((exact - approx).abs().mean() / exact.mean())
    torch.testing.assert_close(approx_cached, torch.cat([per_token_kl_topk(*topk_logprobs(r, k), p)
                                                         for r, p, *_ in rows]), atol=1e-5, rtol=0)
    print(f"\ntop-k KL approximation, mean exact KL {exact.mean():.4g}; relative error by k: "
          + ", ".join(f"k={kk}: {e:.3%}" for kk, e in errors.items()))
    assert errors[128] < 1e-4  # k = V is exact
    assert errors[1] > errors[8] > errors[32] >= errors[128]
    assert exact.mean() > 1e-4  # the perturbation is not trivial


# ---------------------------------------------------------------------------------------------
# integrity: content hashes and value checks when the cache is opened (issue #14)


def _open_train(run_dir: Path):
    """The open path `midpo train` uses: data + verified cache."""
    from midpo.runtime.cache import open_split

    return open_split(run_dir / "data", run_dir / "ref", run_dir / "weights", "train", reference_fp="ref-fp-1",
                      tokenizer_fp="tok-test-1")


def test_flipped_bytes_in_a_cached_float_are_refused_naming_the_file(run_dir):
    """Two flipped bytes inside one row's cached log-prob (it becomes ~ +1e35): refused by the content
    hash, naming the file; with the hash recomputed, the value check still names row, id and column."""
    from datasets import load_from_disk

    row = load_from_disk(str(run_dir / "data" / "train"))[3]
    value = float(fake_logps(row, "chosen")[1])
    (shard,) = [p for p in (run_dir / "ref" / "train").glob("*.arrow") if np.float32(value).tobytes() in p.read_bytes()]
    flip_two_bytes(shard, float_offset(shard, value))
    with pytest.raises(CacheMismatchError) as e:
        _open_train(run_dir)
    assert str(e.value) == (f"{shard}: content hash differs from {run_dir / 'ref' / 'manifest.json'} (damaged or "
                            "edited); re-run `midpo ref --force`")
    reseal(run_dir / "ref", "train")  # a valid hash over the damaged value: the value check must catch it
    with pytest.raises(CacheMismatchError, match=r"split train, row 3 \(id row-1-0003\), column chosen_ref_logps: "
                                                 r"value 8\.\d+e\+34 at token 1 is not a log-prob"):
        _open_train(run_dir)


@pytest.mark.parametrize("column,value,detail", [
    ("chosen_ref_logps", float("nan"), "value nan at token 1 is not a log-prob"),
    ("rejected_ref_logps", 0.5, "value 0.5 at token 1 is not a log-prob"),
    ("chosen_ref_logp_sum", -1.0, "-1.0 but its chosen_ref_logps sum to"),
    ("rejected_ref_topk_logps", float("inf"), "value inf at token 1 is not a log-prob"),
    ("chosen_ref_topk_ids", 999, "value 999 at token 1 is not a token id in [0, 128)"),
    ("rejected_ref_tail_logmass", float("nan"), "value nan at token 1 is not a log-mass"),
])
def test_value_check_names_row_and_column_under_a_valid_hash(tmp_path, column, value, detail):
    """A bad value written with a valid content hash (the split rewritten, then its hashes recorded):
    opening the cache refuses it, naming file, split, row, id and column."""
    data_dir = write_data(tmp_path / "data", {"train": make_rows(6, 1), "eval": make_rows(3, 2)})
    fake_ref_stage(tmp_path / "ref", data_dir, topk=2)
    _open_train(tmp_path)  # intact: opens

    def poison(rows):
        r = rows[4]
        if column.endswith("_sum"):
            r[column] = value
        elif column.endswith(("_topk_logps", "_topk_ids")):
            r[column][1][0] = value
        else:
            r[column][1] = value
        return rows

    rewrite_split(tmp_path / "ref", "train", poison)
    with pytest.raises(CacheMismatchError) as e:
        _open_train(tmp_path)
    msg = str(e.value)
    assert f"{tmp_path / 'ref' / 'train'}/data-00000-of-00001.arrow: split train, row 4 (id row-1-0004), " \
           f"column {column}: " in msg and detail in msg and "re-run `midpo ref --force`" in msg, msg


def test_writer_refuses_to_publish_a_nan(tmp_path):
    """The same value check runs before `midpo ref` publishes a split: a NaN from the forward is not cached."""
    data_dir = write_data(tmp_path / "data", {"train": make_rows(6, 1)})

    def nan_score(rows):
        out = fake_score(rows)
        for r in out:
            if r["id"] == "row-1-0002":
                r["rejected_ref_logps"][0] = np.nan
                r["rejected_ref_logp_sum"] = float("nan")
        return out

    with pytest.raises(CacheMismatchError, match=r"split train, row 2 \(id row-1-0002\), column rejected_ref_logps: "
                                                 r"value nan at token 0 .* not published"):
        fake_ref_stage(tmp_path / "ref", data_dir, splits=("train",), score=nan_score)
    assert not (tmp_path / "ref" / "manifest.json").exists() and not (tmp_path / "ref" / "train").exists()


def test_cache_without_hashes_or_with_an_edited_row_count_is_refused(run_dir):
    """An older midpo's manifest (no hashes) is not trusted; a hand-edited row count is caught."""
    path = run_dir / "ref" / "manifest.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps({**m, "splits": {**m["splits"], "train": {"rows": 6}}}))
    with pytest.raises(CacheMismatchError, match=r"no content hashes for train/ .*re-run `midpo ref --force`"):
        _open_train(run_dir)
    path.write_text(json.dumps({**m, "splits": {**m["splits"], "train": {**m["splits"]["train"], "rows": 5}}}))
    with pytest.raises(CacheMismatchError, match=r"says 5 rows for train/ but its files hold 6 \(damaged or edited\)"):
        _open_train(run_dir)


def test_padded_tensors_from_arrow_equal_the_python_list_path():
    """runtime.cache.padded builds (B, L) / (B, L, k) tensors from Arrow buffers; they equal core.logprobs's
    left-aligned tensors built from Python lists (ResponseLogps.from_lists), for a sliced column too (offsets
    not starting at 0), empty rows and a nested top-k column."""
    import pyarrow as pa

    from midpo.core.logprobs import ResponseLogps
    from midpo.runtime.cache import padded

    rng = np.random.default_rng(0)
    lists = [rng.standard_normal(n).astype(np.float32).tolist() for n in (3, 0, 7, 1, 5)]
    col = pa.array(lists, type=pa.list_(pa.float32()))
    for arr, want in ((col, lists), (col.slice(1, 3), lists[1:4]), (pa.chunked_array([col[:2], col[2:]]), lists)):
        torch.testing.assert_close(padded(arr, torch.float32), ResponseLogps.from_lists(want, want).chosen,
                                   rtol=0, atol=0)
    k = 3
    nested = [[rng.standard_normal(k).astype(np.float32).tolist() for _ in range(n)] for n in (2, 4, 1)]
    got = padded(pa.array(nested, type=pa.list_(pa.list_(pa.float32()))), torch.float32)  # (B, L, k)
    assert got.shape == (3, 4, k)
    for i, rows in enumerate(nested):
        torch.testing.assert_close(got[i, :len(rows)], torch.tensor(rows), rtol=0, atol=0)
        assert not got[i, len(rows):].any()
    ids = padded(pa.array([[[1, 2], [3, 4]], [[5, 6]]], type=pa.list_(pa.list_(pa.int32()))), torch.long)
    assert ids.dtype == torch.long and ids.tolist() == [[[1, 2], [3, 4]], [[5, 6], [0, 0]]]

