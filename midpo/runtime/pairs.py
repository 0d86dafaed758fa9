"""Training data: tokenized pairs joined to the reference cache (and TIS-DPO weights), fetched by row index.

The data split and its cache have the same row order (written so by `midpo ref`); the join is by
position and VERIFIED per row when the row is fetched: equal `id` and equal token-id hash of
(prompt, chosen, rejected), and one cached value per response token. Fingerprints (data, tokenizer,
reference model), content hashes and cached values are checked once when the cache and the TIS-DPO
weights are opened (`midpo.runtime.cache.open_cache`), the data's hashes when it is loaded
(`midpo.runtime.prepared.load_split`).
Verifying per fetched row costs microseconds and covers every row a run actually trains on, without
a pass over the whole split at start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from midpo.runtime.cache import CacheMismatchError, open_cache
from midpo.runtime.fingerprint import hash_token_ids

log = logging.getLogger(__name__)

DATA_COLUMNS = ("id", "prompt_ids", "chosen_ids", "rejected_ids")
# Cache columns the trainer may use; each present one is passed to the prior with the row.
OPTIONAL_CACHE_COLUMNS = ("chosen_ref_topk_logps", "chosen_ref_topk_ids",
                          "chosen_ref_tail_logmass", "rejected_ref_topk_logps", "rejected_ref_topk_ids",
                          "rejected_ref_tail_logmass")
PER_TOKEN_CACHE_COLUMNS = ("chosen_ref_logps", "rejected_ref_logps")
WEIGHT_COLUMNS = ("chosen_weights", "rejected_weights")


@dataclass
class PairSplit:
    """One split: data rows + (optionally) their cached reference values, fetched together."""

    name: str
    data: object  # datasets.Dataset with DATA_COLUMNS
    cache: object | None  # datasets.Dataset with id, tokens_hash, *_ref_logps, ... (same row order)
    cache_columns: tuple[str, ...] = ()
    weights: object | None = None  # `midpo weights` output: id, tokens_hash, chosen/rejected_weights (same order)

    def __len__(self) -> int:
        return len(self.data)

    def rows(self, indices) -> list[dict]:
        """Rows at `indices` (row positions) as dicts, cache values attached, every row verified."""
        idx = [int(i) for i in indices]
        d = self.data.select_columns(list(DATA_COLUMNS))[idx]
        out = [{k: d[k][j] for k in DATA_COLUMNS} for j in range(len(idx))]
        hashes = [hash_token_ids(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in out]
        for source, cols, per_token, stage in ((self.cache, self.cache_columns, "ref_logps", "midpo ref"),
                                               (self.weights, WEIGHT_COLUMNS, "weights", "midpo weights")):
            if source is None:
                continue
            c = source.select_columns(["id", "tokens_hash", *cols])[idx]
            for j, row in enumerate(out):
                where = f"{self.name} row {idx[j]} (id {row['id']})"
                if row["id"] != c["id"][j]:
                    raise CacheMismatchError(f"{where}: `{stage}` output has id {c['id'][j]!r} here; it was built "
                                             f"for other data, rebuild it with `{stage}`")
                if hashes[j] != c["tokens_hash"][j]:
                    raise CacheMismatchError(f"{where}: token ids differ from the ones `{stage}` saw (other tokenizer "
                                             f"or data); rebuild with `{stage}`")
                for col in cols:
                    row[col] = c[col][j]
                for side in ("chosen", "rejected"):
                    n = len(row[f"{side}_{per_token}"])
                    if n != len(row[f"{side}_ids"]):
                        raise CacheMismatchError(f"{where}: {n} {side}_{per_token} values for "
                                                 f"{len(row[f'{side}_ids'])} tokens")
        return out


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
