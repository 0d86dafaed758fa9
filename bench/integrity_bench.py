"""Cost of the integrity checks that run whenever a cache split is opened (`midpo.runtime.cache.open_cache`):
content hashes + row recount (`midpo.runtime.integrity.split_damage`) and the value check
(`midpo.runtime.cache.check_values`), on a synthetic reference cache of N rows written the way
`midpo ref` writes it (`Dataset.save_to_disk`).

    python bench/integrity_bench.py --rows 100000 --mean-len 128 [--topk 0]

Prints sizes and seconds (best of --repeat; the files are in the page cache after the first pass,
which is the common case right after `midpo ref` or a previous open).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def list_column(lengths: np.ndarray, values: np.ndarray) -> pa.Array:
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def build(folder: Path, rows: int, mean_len: int, topk: int, seed: int = 0) -> dict:
    from datasets import Dataset

    from midpo.runtime.integrity import HASHES, hash_split

    rng = np.random.default_rng(seed)
    cols: dict[str, pa.Array] = {"id": pa.array([f"r{i:08d}" for i in range(rows)]),
                                 "tokens_hash": pa.array([f"{i:024x}" for i in range(rows)])}
    for side in ("chosen", "rejected"):
        lens = rng.integers(1, 2 * mean_len, size=rows)
        vals = -rng.exponential(2.0, size=int(lens.sum())).astype(np.float32)
        cols[f"{side}_ref_logps"] = list_column(lens, vals)
        starts = np.concatenate(([0], np.cumsum(lens)))[:-1]
        cols[f"{side}_ref_logp_sum"] = pa.array(np.add.reduceat(vals, starts, dtype=np.float64))
        if topk:
            inner = list_column(np.full(len(vals), topk), -rng.exponential(2.0, size=len(vals) * topk).astype(np.float32))
            ids = list_column(np.full(len(vals), topk), rng.integers(0, 32000, size=len(vals) * topk).astype(np.int32))
            offsets = pa.array(np.concatenate(([0], np.cumsum(lens))).astype(np.int32))
            cols[f"{side}_ref_topk_logps"] = pa.ListArray.from_arrays(offsets, inner)
            cols[f"{side}_ref_topk_ids"] = pa.ListArray.from_arrays(offsets, ids)
            cols[f"{side}_ref_tail_logmass"] = list_column(lens, -rng.exponential(1.0, size=len(vals)).astype(np.float32))
    Dataset(pa.table(cols)).save_to_disk(str(folder))
    return {"rows": rows, HASHES: hash_split(folder)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--mean-len", type=int, default=128, help="mean response length in tokens (uniform 1..2x)")
    ap.add_argument("--topk", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from midpo.runtime.cache import check_values
    from midpo.runtime.integrity import data_files, read_arrow, split_damage

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train"
        record = build(folder, args.rows, args.mean_len, args.topk)
        size = sum(p.stat().st_size for p in folder.iterdir())
        tokens = sum(len(read_arrow(p).column("chosen_ref_logps").combine_chunks().flatten())
                     + len(read_arrow(p).column("rejected_ref_logps").combine_chunks().flatten())
                     for p in data_files(folder))

        def timed(fn) -> float:
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            return best

        def values():
            first = 0
            for p in data_files(folder):
                table = read_arrow(p)
                check_values(table, where=str(p), split="train", first_row=first, vocab_size=32000)
                first += len(table)

        assert split_damage(folder, record, Path(tmp) / "manifest.json") is None
        t_hash = timed(lambda: split_damage(folder, record, Path(tmp) / "manifest.json"))
        t_values = timed(values)
        print(f"{args.rows} rows, {tokens / 1e6:.1f}M response tokens, top-k {args.topk}, {size / 2**20:.0f} MiB in "
              f"{len(data_files(folder))} file(s)")
        print(f"  content hashes + row recount: {t_hash:.3f} s ({size / 2**20 / t_hash:.0f} MiB/s)")
        print(f"  value check (numpy over Arrow buffers): {t_values:.3f} s ({tokens / 1e6 / t_values:.0f}M tokens/s)")


if __name__ == "__main__":
    main()
