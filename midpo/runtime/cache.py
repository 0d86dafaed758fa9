"""Reading the reference cache in training: refuse stale caches, verify rows, join to the data.

    from midpo.runtime.cache import open_cache, join_cache
    cache = open_cache(run_dir / "ref", run_dir / "data", "train",
                       expect_reference_fp=model_fingerprint(ref_path),
                       expect_tokenizer_fp=tokenizer_fingerprint(tok_path))
    train = join_cache(load_split(run_dir / "data", "train"), cache)   # checks id + tokens_hash per row

A cache is usable only when its manifest exists (written last by `midpo ref`) and its data, tokenizer
and reference fingerprints equal what the trainer is about to use; otherwise `CacheMismatchError`
says exactly what changed (expected vs found) and how to fix it.

Top-k caches (`ref.topk > 0`) carry, per response token, the reference's k largest log-probs, their
ids and the log of the remaining ("tail") mass. `midpo.core.logprobs.per_token_kl_topk` turns them into
KL(pi_ref || pi_theta): an APPROXIMATION — the exact KL of the two distributions coarsened to
{top-k tokens, everything else}, hence never above the exact KL; the gap is the KL hidden inside the
tail. tests/runtime/test_cache.py measures it (see `TOPK_COLUMNS`).

Opening a split also checks its files and values, because a flipped byte in a cached float trains
silently otherwise: the files must match the content hashes and row count in the manifest
(`midpo.runtime.integrity`), then `check_values` runs over the Arrow buffers with numpy (no per-row
Python): log-probs finite and <= 0 (within LOGP_TOL), each cached sum equal to its per-token sum,
top-k log-probs finite and <= 0, top-k ids in [0, vocab), tail log-masses <= 0 and not NaN, token
weights finite, no nulls. `midpo ref`/`midpo weights` run the same value check before publishing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from midpo.core.logprobs import ResponseLogps
from midpo.core.priors import SidePair, TopK
from midpo.errors import MidpoError
from midpo.runtime.fingerprint import hash_token_ids
from midpo.runtime.integrity import data_files, read_arrow, split_damage
from midpo.runtime.prepared import data_fingerprints, read_manifest

# The cache's columns, declared once: `midpo ref` writes them (runtime.chunks), training reads them.
REF_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("tokens_hash", pa.string()),
    ("chosen_ref_logps", pa.list_(pa.float32())),
    ("rejected_ref_logps", pa.list_(pa.float32())),
    ("chosen_ref_logp_sum", pa.float64()),
    ("rejected_ref_logp_sum", pa.float64()),
])
TOPK_SCHEMA = pa.schema([
    (f"{side}_{name}", typ)
    for side in ("chosen", "rejected")
    for name, typ in (("ref_topk_logps", pa.list_(pa.list_(pa.float32()))),
                      ("ref_topk_ids", pa.list_(pa.list_(pa.int32()))),
                      ("ref_tail_logmass", pa.list_(pa.float32())))
])

# `midpo weights` (TIS-DPO): one weight per response token, same row order as the data
WEIGHTS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("tokens_hash", pa.string()),
    ("chosen_weights", pa.list_(pa.float32())),
    ("rejected_weights", pa.list_(pa.float32())),
])


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
    rebuild = f"re-run `midpo {manifest.get('stage', 'ref')} --force`"
    damage = split_damage(ref_dir / split, manifest["splits"][split], ref_dir / "manifest.json")
    if damage:
        raise CacheMismatchError(f"{damage}; {rebuild}")
    ds = load_from_disk(str(ref_dir / split))
    want = manifest["splits"][split]["rows"]
    if len(ds) != want:
        raise CacheMismatchError(f"{ref_dir / split}: {len(ds)} rows, manifest says {want}; {rebuild}")
    first = 0
    for path in data_files(ref_dir / split):  # file by file, so an error names the file holding the row
        table = read_arrow(path)
        check_values(table, where=str(path), split=split, first_row=first, vocab_size=manifest.get("vocab_size"),
                     fix=f"the cache is damaged, {rebuild}")
        first += len(table)
    return ds


# ---------------------------------------------------------------------------------------------
# value checks (vectorized over Arrow buffers)

# fp32 log-softmax can exceed 0 by rounding (~1e-7); a log-prob above this is not one
LOGP_TOL = 1e-4
SUM_RTOL = 1e-6  # cached float64 sum vs the float64 sum of the cached float32 values (summation order only)


def _levels(chunk: pa.Array) -> tuple[np.ndarray, list[np.ndarray], int | None]:
    """(leaf values, per list level the start offsets (outermost first), local row of the first null or None)."""
    starts, arr, null_at = [], chunk, None
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        if arr.null_count and null_at is None:
            null_at = _row_of(int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]), starts)
        lens = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        starts.append(np.concatenate(([0], np.cumsum(lens, dtype=np.int64))))
        arr = arr.flatten()
    if arr.null_count and null_at is None:
        null_at = _row_of(int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]), starts)
    return arr.to_numpy(zero_copy_only=False), starts, null_at


def _row_of(j: int, starts: list[np.ndarray]) -> int:
    """The row holding element `j` of the level below the `starts` levels."""
    for s in reversed(starts):
        j = int(np.searchsorted(s, j, side="right")) - 1
    return j


def _token_of(j: int, starts: list[np.ndarray]) -> tuple[int, int]:
    """(row, response token) of leaf `j` (token = position in the row's outermost list)."""
    k = j
    for s in reversed(starts[1:]):
        k = int(np.searchsorted(s, k, side="right")) - 1
    row = int(np.searchsorted(starts[0], k, side="right")) - 1 if starts else k
    return row, (k - int(starts[0][row]) if starts else 0)


def _rule(name: str, vocab_size: int | None):
    """(bad-element predicate over leaf values, what a good value is) for a cache column, or None."""
    if name.endswith(("_ref_logps", "_ref_topk_logps")):
        return (lambda v: ~(np.isfinite(v) & (v <= LOGP_TOL))), f"a log-prob (finite, <= 0 within {LOGP_TOL:g})"
    if name.endswith("_ref_tail_logmass"):  # -inf is legitimate: no mass outside the top k
        return (lambda v: np.isnan(v) | (v > LOGP_TOL)), f"a log-mass (<= 0 within {LOGP_TOL:g}, -inf allowed)"
    if name.endswith("_ref_topk_ids"):
        hi = vocab_size if vocab_size else np.iinfo(np.int64).max
        return (lambda v: (v < 0) | (v >= hi)), f"a token id in [0, {vocab_size or 'vocab'})"
    if name.endswith(("_weights", "_ref_logp_sum")):
        return (lambda v: ~np.isfinite(v)), "finite"
    return None


def _row_sums(col: pa.ChunkedArray) -> np.ndarray:
    """float64 sum of each row of a list<float> column (0 for an empty row)."""
    out = []
    for chunk in col.chunks:
        vals, (starts,), _ = _levels(chunk)
        lens = np.diff(starts)
        sums = np.zeros(len(lens), dtype=np.float64)
        nz = lens > 0
        if nz.any():
            sums[nz] = np.add.reduceat(vals, starts[:-1][nz], dtype=np.float64)
        out.append(sums)
    return np.concatenate(out) if out else np.zeros(0)


def check_values(table: pa.Table, *, where: str, split: str, first_row: int = 0, vocab_size: int | None = None,
                 fix: str = "") -> None:
    """Raise CacheMismatchError naming file, split, row, id and column at the first cached value that
    cannot be what `midpo ref`/`midpo weights` wrote (see the module doc), `fix` appended. `first_row`: the
    split row of `table`'s first row. numpy over whole columns, no loop over rows."""

    def fail(row: int, col: str, detail: str) -> None:
        rid = table.column("id")[row].as_py() if "id" in table.column_names else "?"
        raise CacheMismatchError(f"{where}: split {split}, row {first_row + row} (id {rid}), column {col}: {detail}"
                                 + (f"; {fix}" if fix else ""))

    for name in table.column_names:
        rule = _rule(name, vocab_size)
        if rule is None:
            continue
        bad_of, good = rule
        base = 0
        for chunk in table.column(name).chunks:
            vals, starts, null_at = _levels(chunk)
            if null_at is not None:
                fail(base + null_at, name, "null value")
            bad = np.flatnonzero(bad_of(vals))
            if len(bad):
                row, tok = _token_of(int(bad[0]), starts)
                fail(base + row, name, f"value {vals[bad[0]].item()!r}" + (f" at token {tok}" if starts else "")
                     + f" is not {good}")
            base += len(chunk)
    for side in ("chosen", "rejected"):
        s, per_token = f"{side}_ref_logp_sum", f"{side}_ref_logps"
        if s in table.column_names and per_token in table.column_names:
            got = table.column(s).to_numpy()
            want = _row_sums(table.column(per_token))
            bad = np.flatnonzero(np.abs(got - want) > SUM_RTOL * np.maximum(1.0, np.abs(want)))
            if len(bad):
                i = int(bad[0])
                fail(i, s, f"{float(got[i])!r} but its {per_token} sum to {float(want[i])!r}")


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


def row_tokens_hash(row: dict) -> str:
    """The hash that joins a cache row to its data row (id + this hash are checked on every read)."""
    return hash_token_ids(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])


# ---------------------------------------------------------------------------------------------
# the training data: tokenized pairs joined to their cached values, fetched by row index as tensors


DATA_COLUMNS = ("id", "prompt_ids", "chosen_ids", "rejected_ids")
PER_TOKEN_CACHE_COLUMNS = ("chosen_ref_logps", "rejected_ref_logps")
OPTIONAL_CACHE_COLUMNS = tuple(TOPK_SCHEMA.names)  # each present one reaches the prior with its rows
WEIGHT_COLUMNS = ("chosen_weights", "rejected_weights")


@dataclass
class Cached:
    """A micro-batch's cached values as tensors (left-aligned per response, as core.logprobs.ResponseLogps)."""

    ref: ResponseLogps | None = None  # the reference's per-token log-probs
    weights: SidePair | None = None  # TIS-DPO token weights per side, (B, L)
    topk: SidePair | None = None  # TopK per side: (B, L, k) log-probs and ids, (B, L) tail log-mass

    def to(self, device) -> Cached:
        weights = topk = None
        if self.weights is not None:
            weights = SidePair(self.weights.chosen.to(device), self.weights.rejected.to(device))
        if self.topk is not None:
            topk = SidePair(*(TopK(t.values.to(device), t.indices.to(device), t.tail.to(device))
                              for t in (self.topk.chosen, self.topk.rejected)))
        return Cached(None if self.ref is None else self.ref.to(device), weights, topk)


def padded(column: pa.Array | pa.ChunkedArray, dtype: torch.dtype) -> torch.Tensor:
    """A list<T> column (one list per row) -> (B, L) zero-padded, left-aligned; a list<list<T>> column with a fixed
    inner length k -> (B, L, k). Straight from the Arrow buffers: no Python list per value."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lens = arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)  # (B,)
    values = arr.flatten()  # the rows' values in order (a slice's offsets are respected)
    inner = None
    if pa.types.is_list(values.type):
        inner = values.value_lengths().to_numpy(zero_copy_only=False)
        values = values.flatten()
    flat = torch.from_numpy(np.array(values.to_numpy(zero_copy_only=False))).to(dtype)  # a copy: writable
    B, L = len(lens), int(lens.max()) if len(lens) else 0
    mask = torch.from_numpy(np.arange(L)[None, :] < lens[:, None])  # (B, L)
    if inner is None:
        out = torch.zeros(B, L, dtype=dtype)
        out[mask] = flat
        return out
    k = int(inner[0]) if len(inner) else 0
    out = torch.zeros(B, L, k, dtype=dtype)
    out[mask] = flat.view(-1, k)
    return out


@dataclass
class PairSplit:
    """One split: data rows + (optionally) their cached reference values and TIS-DPO weights, fetched together.

    The data and its caches have the same row order (written so by `midpo ref` / `midpo weights`); the join is by
    position and VERIFIED for every fetched row: equal `id`, equal token-id hash of (prompt, chosen, rejected), one
    cached value per response token. Fingerprints, content hashes and value ranges were checked when the caches
    were opened (open_cache), the data's hashes when it was loaded (runtime.prepared.load_split)."""

    name: str
    data: object  # datasets.Dataset with DATA_COLUMNS
    cache: object | None  # datasets.Dataset with id, tokens_hash, *_ref_logps, ... (same row order)
    cache_columns: tuple[str, ...] = ()
    weights: object | None = None  # `midpo weights` output: id, tokens_hash, chosen/rejected_weights (same order)

    def __len__(self) -> int:
        return len(self.data)

    def rows(self, indices) -> list[dict]:
        """The data rows at `indices` (row positions) as dicts of DATA_COLUMNS (token ids: what collate reads)."""
        idx = [int(i) for i in indices]
        d = self.data.select_columns(list(DATA_COLUMNS))[idx]
        return [{k: d[k][j] for k in DATA_COLUMNS} for j in range(len(idx))]

    def fetch(self, indices) -> tuple[list[dict], Cached]:
        """(rows, their cached values as tensors), every row verified against each cache."""
        idx = [int(i) for i in indices]
        rows = self.rows(idx)
        cached = Cached()
        hashes = [row_tokens_hash(r) for r in rows]
        if self.cache is not None:
            t = self._verified(self.cache, ["id", "tokens_hash", *self.cache_columns], idx, rows, hashes, "midpo ref",
                               PER_TOKEN_CACHE_COLUMNS)
            cached.ref = ResponseLogps(*_side(t, "chosen_ref_logps"), *_side(t, "rejected_ref_logps"))
            if "chosen_ref_topk_logps" in self.cache_columns:
                cached.topk = SidePair(*(TopK(padded(t[f"{side}_ref_topk_logps"], torch.float32),
                                              padded(t[f"{side}_ref_topk_ids"], torch.long),
                                              padded(t[f"{side}_ref_tail_logmass"], torch.float32))
                                         for side in ("chosen", "rejected")))
        if self.weights is not None:
            t = self._verified(self.weights, ["id", "tokens_hash", *WEIGHT_COLUMNS], idx, rows, hashes,
                               "midpo weights", WEIGHT_COLUMNS)
            cached.weights = SidePair(_side(t, "chosen_weights")[0], _side(t, "rejected_weights")[0])
        return rows, cached

    def _verified(self, source, cols: list[str], idx: list[int], rows: list[dict], hashes: list[str], stage: str,
                  per_token: tuple[str, str]) -> pa.Table:
        """The Arrow rows `idx` of a cache, after checking that they belong to `rows`."""
        t = source.with_format("arrow").select_columns(cols)[idx]
        ids, got = t.column("id").to_pylist(), t.column("tokens_hash").to_pylist()
        for j, row in enumerate(rows):
            where = f"{self.name} row {idx[j]} (id {row['id']})"
            if row["id"] != ids[j]:
                raise CacheMismatchError(f"{where}: `{stage}` output has id {ids[j]!r} here; it was built for other "
                                         f"data, rebuild it with `{stage}`")
            if hashes[j] != got[j]:
                raise CacheMismatchError(f"{where}: token ids differ from the ones `{stage}` saw (other tokenizer or "
                                         f"data); rebuild with `{stage}`")
        for col, side in zip(per_token, ("chosen", "rejected")):
            n = t.column(col).combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
            for j, row in enumerate(rows):
                if n[j] != len(row[f"{side}_ids"]):
                    raise CacheMismatchError(f"{self.name} row {idx[j]} (id {row['id']}): {n[j]} {col} values for "
                                             f"{len(row[f'{side}_ids'])} tokens")
        return t


def _side(t: pa.Table, col: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, L) fp32, mask (B, L)) of a per-token column."""
    vals = padded(t.column(col), torch.float32)
    lens = torch.from_numpy(t.column(col).combine_chunks().value_lengths().to_numpy(zero_copy_only=False))
    return vals, torch.arange(vals.shape[1])[None, :] < lens[:, None].long()


def open_split(data_dir: Path, ref_dir: Path, weights_dir: Path, split: str, *, reference_fp: str | None,
               tokenizer_fp: str | None, with_cache: bool = True) -> PairSplit | None:
    """Data + verified cache of `split` (and the TIS-DPO token weights when `weights_dir` holds them); None when the
    data has no such split. The folders: a run's RunLayout.data, .cache, .weights."""
    from midpo.runtime.prepared import load_split

    data_dir, ref_dir, weights_dir = Path(data_dir), Path(ref_dir), Path(weights_dir)
    if not (data_dir / split).is_dir():
        return None
    data = load_split(data_dir, split)
    missing = [c for c in DATA_COLUMNS if c not in data.column_names]
    if missing:
        raise ValueError(f"{data_dir / split}: missing columns {missing} (stage-1 contract: {DATA_COLUMNS})")
    if not with_cache:
        return PairSplit(split, data, None)
    cache = open_cache(ref_dir, data_dir, split, expect_reference_fp=reference_fp, expect_tokenizer_fp=tokenizer_fp)
    if len(cache) != len(data):
        raise CacheMismatchError(f"{ref_dir / split}: {len(cache)} rows, data has {len(data)}")
    cols = tuple(c for c in PER_TOKEN_CACHE_COLUMNS + OPTIONAL_CACHE_COLUMNS if c in cache.column_names)
    if not set(PER_TOKEN_CACHE_COLUMNS) <= set(cols):
        raise CacheMismatchError(f"{ref_dir / split}: needs per-token columns {PER_TOKEN_CACHE_COLUMNS}, has "
                                 f"{cache.column_names}")
    weights = None
    if (weights_dir / "manifest.json").exists():  # TIS-DPO token weights (`midpo weights`)
        # Same manifest contract as the cache; no reference model is involved.
        weights = open_cache(weights_dir, data_dir, split, expect_tokenizer_fp=tokenizer_fp)
        if len(weights) != len(data):
            raise CacheMismatchError(f"{weights_dir / split}: {len(weights)} rows, data has {len(data)}")
    return PairSplit(split, data, cache, cols, weights)
