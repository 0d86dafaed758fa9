"""Reading the reference cache in training: refuse stale caches, verify rows, join to the data.

    from pipeline.ref_cache import open_cache, join_cache
    cache = open_cache(run_dir / "ref", run_dir / "data", "train",
                       expect_reference_fp=model_fingerprint(ref_path),
                       expect_tokenizer_fp=tokenizer_fingerprint(tok_path))
    train = join_cache(load_split(run_dir / "data", "train"), cache)   # checks id + tokens_hash per row

A cache is usable only when its manifest exists (written last by `midpo ref`) and its data, tokenizer
and reference fingerprints equal what the trainer is about to use; otherwise `CacheMismatchError`
says exactly what changed (expected vs found) and how to fix it.

Top-k caches (`ref.topk > 0`) carry, per response token, the reference's k largest log-probs, their
ids and the log of the remaining ("tail") mass. `pipeline.logprobs.per_token_kl_topk` turns them into
KL(pi_ref || pi_theta): an APPROXIMATION — the exact KL of the two distributions coarsened to
{top-k tokens, everything else}, hence never above the exact KL; the gap is the KL hidden inside the
tail. tests/pipeline/test_ref_cache.py measures it (see `TOPK_COLUMNS`).
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.dataset_io import read_manifest
from pipeline.errors import MidpoError
from pipeline.fingerprint import hash_token_ids
from pipeline.reference import REF_SCHEMA, TOPK_SCHEMA, data_fingerprints

REF_COLUMNS = tuple(REF_SCHEMA.names)  # id, tokens_hash, {chosen,rejected}_ref_logps, ..._ref_logp_sum
TOPK_COLUMNS = tuple(TOPK_SCHEMA.names)  # with ref.topk = k > 0; per response token: (k,) logps, (k,) ids, tail


class CacheMismatchError(MidpoError, ValueError):
    """A cache that does not belong to the data/tokenizer/model in use, or rows that do not line up."""


def read_cache_manifest(ref_dir: str | Path) -> dict:
    path = Path(ref_dir) / "manifest.json"
    if not path.exists():
        partial = (Path(ref_dir) / ".work").exists()
        raise CacheMismatchError(
            f"{path} not found: the reference cache is {'incomplete (a run was interrupted)' if partial else 'missing'}; "
            "run `midpo ref --config RECIPE` (it resumes a partial run)"
        )
    return json.loads(path.read_text())


def check_fingerprints(manifest: dict, *, data_fp: str | None, tokenizer_fp: str | None,
                       reference_fp: str | None, where: str = "reference cache") -> None:
    stage = manifest.get("stage", "ref")  # `midpo weights` writes the same manifest contract
    """Raise naming every fingerprint that differs (expected = what training uses, found = cache)."""
    problems = []
    for label, key, expected in (("data", "data_fingerprint", data_fp),
                                 ("tokenizer", "tokenizer_fingerprint", tokenizer_fp),
                                 ("reference model", "reference_fingerprint", reference_fp)):
        if expected is None:
            continue
        found = manifest.get(key)
        if found != expected:
            problems.append(f"{label} fingerprint differs: expected {expected}, cache has {found}")
    if problems:
        raise CacheMismatchError(f"{where} was built for other inputs: " + "; ".join(problems)
                                 + f". Rebuild it with `midpo {stage} --config RECIPE`.")


def open_cache(ref_dir: str | Path, data_dir: str | Path, split: str, *, expect_reference_fp: str | None = None,
               expect_tokenizer_fp: str | None = None):
    """The cache split as a `datasets.Dataset`, after checking that it matches the data in `data_dir`
    (and, when given, the reference model and tokenizer the caller uses)."""
    from datasets import load_from_disk

    ref_dir, data_dir = Path(ref_dir), Path(data_dir)
    manifest = read_cache_manifest(ref_dir)
    data_fp, data_tok_fp = data_fingerprints(read_manifest(data_dir), data_dir)
    where = f"`midpo {manifest.get('stage', 'ref')}` output {ref_dir}"
    # The tokenizer the trainer loads when given, else the one the data was tokenized with.
    check_fingerprints(manifest, data_fp=data_fp, tokenizer_fp=expect_tokenizer_fp or data_tok_fp,
                       reference_fp=expect_reference_fp, where=where)
    if split not in manifest.get("splits", {}):
        raise CacheMismatchError(f"{where} has no split {split!r} (has {sorted(manifest.get('splits', {}))})")
    ds = load_from_disk(str(ref_dir / split))
    want = manifest["splits"][split]["rows"]
    if len(ds) != want:
        raise CacheMismatchError(f"{ref_dir / split}: {len(ds)} rows, manifest says {want}")
    return ds


def verify_rows(data, cache, indices=None) -> None:
    """Rows `indices` (default: all) of `cache` belong to the same rows of `data`: equal `id`, equal
    `tokens_hash` of (prompt, chosen, rejected) ids, one cached value per response token."""
    if len(data) != len(cache):
        raise CacheMismatchError(f"data has {len(data)} rows, cache has {len(cache)}")
    idx = list(range(len(data))) if indices is None else list(indices)
    d = data.select(idx).to_dict() if indices is not None else data.to_dict()
    cols = ["id", "tokens_hash"] + [c for c in ("chosen_ref_logps", "rejected_ref_logps", "chosen_weights",
                                                 "rejected_weights") if c in cache.column_names]
    c = cache.select_columns(cols)
    c = c.select(idx).to_dict() if indices is not None else c.to_dict()
    for j, i in enumerate(idx):
        if d["id"][j] != c["id"][j]:
            raise CacheMismatchError(f"row {i}: data id {d['id'][j]!r} != cache id {c['id'][j]!r}")
        h = hash_token_ids(d["prompt_ids"][j], d["chosen_ids"][j], d["rejected_ids"][j])
        if h != c["tokens_hash"][j]:
            raise CacheMismatchError(f"row {i} (id {d['id'][j]}): token ids differ from those the cache was built on")
        for col in cols[2:]:
            side = col.split("_")[0]
            if len(c[col][j]) != len(d[f"{side}_ids"][j]):
                raise CacheMismatchError(f"row {i} (id {d['id'][j]}): {len(c[col][j])} {col} values for "
                                         f"{len(d[f'{side}_ids'][j])} {side} tokens")


def join_cache(data, cache, *, verify: bool = True):
    """`data` with the cache's columns appended (same row order), after `verify_rows`."""
    from datasets import concatenate_datasets

    if verify:
        verify_rows(data, cache)
    extra = cache.remove_columns([c for c in ("id", "tokens_hash") if c in cache.column_names])
    clash = sorted(set(extra.column_names) & set(data.column_names))
    if clash:
        raise CacheMismatchError(f"cache columns {clash} already exist in the data")
    return concatenate_datasets([data, extra], axis=1)
