"""Content integrity of the Arrow split folders midpo writes and later reads back: prep's
`data/{train,eval}/` and the `ref/` and `weights/` caches' `{train,eval}/`.

At write time the writer records, per split in its manifest, the row count and the sha256 of every
file of the split folder (`hash_split`: the Arrow shards, `state.json`, `dataset_info.json`).
Whoever opens the split, and every "up to date" check, calls `split_damage`: it re-hashes the
files (streamed) and recounts the rows, and says what is wrong. The caller decides what that means:
a stage finding its own output damaged rebuilds it; a reader, or a stage finding its input damaged,
refuses and names the stage to re-run. A manifest without hashes (an older midpo's) is never trusted.

Extra files in a split folder are ignored: `datasets` reads only the shards `state.json` lists (and
`Dataset.map` on a loaded split may leave its own `cache-*.arrow` files there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from midpo.runtime.fingerprint import hash_file

HASHES = "sha256"  # the manifest key of a split's {file name: hex digest}


def split_files(folder: str | Path) -> list[Path]:
    """The files a split folder is made of: regular, non-hidden (midpo's marker is hidden), sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


def hash_split(folder: str | Path) -> dict[str, str]:
    """{file name: sha256} of a freshly written split folder, for its manifest."""
    return {p.name: hash_file(p) for p in split_files(folder)}


def data_files(folder: str | Path) -> list[Path]:
    """The Arrow shards `datasets.load_from_disk` reads, in its order (from `state.json`)."""
    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    return [folder / f["filename"] for f in state["_data_files"]]


def read_arrow(path: str | Path) -> pa.Table:
    """One shard as written by `datasets`/`SplitWriter` (Arrow IPC stream), memory-mapped, not copied."""
    with pa.memory_map(str(path), "r") as src:
        return pa.ipc.open_stream(src).read_all()


def count_rows(folder: str | Path) -> int:
    total = 0
    for path in data_files(folder):
        with pa.memory_map(str(path), "r") as src:
            total += sum(batch.num_rows for batch in pa.ipc.open_stream(src))
    return total


def split_damage(folder: str | Path, record: dict, manifest_path: str | Path) -> str | None:
    """What is wrong with `folder` against its manifest `record` ({"rows": n, "sha256": {...}}), or None.

    The message names the file and how it differs, without the fix (the caller knows the stage)."""
    folder = Path(folder)
    hashes = record.get(HASHES) if isinstance(record, dict) else None
    if not isinstance(hashes, dict) or not hashes:
        return (f"{manifest_path}: no content hashes for {folder.name}/ (written by an older midpo, or edited); "
                "its files cannot be checked")
    for name in sorted(hashes):
        path = folder / name
        if not path.is_file():
            return f"{path}: missing (recorded in {manifest_path})"
        if hash_file(path) != hashes[name]:
            return f"{path}: content hash differs from {manifest_path} (damaged or edited)"
    rows = count_rows(folder)  # the files are as written: this catches an edited row count
    if rows != record.get("rows"):
        return (f"{manifest_path}: says {record.get('rows')} rows for {folder.name}/ but its files hold {rows} "
                "(damaged or edited)")
    return None
