"""Streaming writer of one split as a `datasets.save_to_disk`-compatible folder of Arrow shards.

Rows arrive in batches and go straight to the current shard file (Arrow IPC stream, as `datasets`
writes them), so memory holds one batch, not a split. Shard count is only known at the end, so
shards are written as `part-N.arrow` and renamed `data-0000N-of-0000M.arrow` in `close()`, which
also writes `state.json` and `dataset_info.json`, and returns the split's record for the manifest,
with the content hash of every file (`midpo.runtime.integrity`, checked whenever the split is opened).
`datasets.load_from_disk` memory-maps the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from midpo.errors import ConfigError
from midpo.runtime.integrity import HASHES, hash_split

COLUMNS = ("id", "prompt_ids", "chosen_ids", "rejected_ids")
# optional columns after the ids (prep adds those its inputs give): the pair's scores and margin, its input
EXTRA_COLUMNS = {"score_chosen": "float64", "score_rejected": "float64", "score_margin": "float64", "source": "string"}


def features(extra: tuple[str, ...] = ()):
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({"id": datasets.Value("string"), "prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids,
                              **{c: datasets.Value(EXTRA_COLUMNS[c]) for c in extra}})


class SplitWriter:
    def __init__(self, folder: Path, shard_rows: int, extra: tuple[str, ...] = ()):
        if shard_rows < 1:
            raise ConfigError(f"data.shard_rows must be >= 1, got {shard_rows}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True)
        self.shard_rows = shard_rows
        self.columns = COLUMNS + tuple(extra)
        self.features = features(tuple(extra))
        self.schema = self.features.arrow_schema  # carries the `huggingface` metadata datasets reads
        self.parts: list[Path] = []
        self._writer: pa.RecordBatchStreamWriter | None = None
        self._sink = None
        self._in_shard = 0
        self.rows = 0
        self.tokens = {"prompt": 0, "chosen": 0, "rejected": 0}

    def _open(self) -> None:
        path = self.folder / f"part-{len(self.parts)}.arrow"
        self.parts.append(path)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def write(self, rows: dict[str, list]) -> None:
        """rows: column -> list, all the same length (the extra columns may be absent: nulls)."""
        n = len(rows["id"])
        self.write_batch(pa.RecordBatch.from_pydict(
            {c: rows[c] if c in rows else [None] * n for c in self.columns}, schema=self.schema))

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Arrow rows with (at least) this split's columns, in shards of shard_rows."""
        import pyarrow.compute as pc

        batch = pa.RecordBatch.from_arrays([batch.column(c).cast(self.schema.field(c).type) for c in self.columns],
                                           schema=self.schema)
        n = batch.num_rows
        start = 0
        while start < n:
            if self._writer is None or self._in_shard >= self.shard_rows:
                self._close_shard()
                self._open()
            take = min(n - start, self.shard_rows - self._in_shard)
            self._writer.write_batch(batch.slice(start, take))
            self._in_shard += take
            start += take
        self.rows += n
        for side in self.tokens:
            self.tokens[side] += int(pc.sum(pc.list_value_length(batch.column(f"{side}_ids"))).as_py() or 0)

    def close(self, fingerprint: str) -> dict:
        """Finish the split; `fingerprint` (16 hex) becomes the dataset fingerprint datasets caches by."""
        if not self.parts:  # an empty split is still a loadable dataset
            self._open()
        self._close_shard()
        m = len(self.parts)
        names = []
        for i, part in enumerate(self.parts):
            name = f"data-{i:05d}-of-{m:05d}.arrow"
            part.rename(self.folder / name)
            names.append(name)
        state = {
            "_data_files": [{"filename": n} for n in names],
            "_fingerprint": fingerprint[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (self.folder / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        info = {"citation": "", "description": "", "features": self.features.to_dict(), "homepage": "", "license": ""}
        (self.folder / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
        return {"rows": self.rows, "shards": m, "tokens": dict(self.tokens), HASHES: hash_split(self.folder)}


def write_split(folder: Path, rows: list[dict], shard_rows: int, fingerprint: str) -> dict:
    """A whole split from rows in memory (tests, benches): the same files and manifest record as prep's."""
    writer = SplitWriter(folder, shard_rows)
    if rows:
        writer.write({c: [r[c] for r in rows] for c in COLUMNS})
    return writer.close(fingerprint)
