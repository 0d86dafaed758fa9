"""Reading stage 1's output, for later stages: the manifest and the tokenized splits.

Both refuse a folder whose manifest is missing or incomplete (a crashed or in-progress prep run),
so no stage can train on partial data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import MidpoError

SPLITS = ("train", "eval")


class DataNotReady(MidpoError, FileNotFoundError):
    """The data folder is missing, incomplete, or not a `midpo prep` output."""


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise DataNotReady(f"{data_dir}: no manifest.json; run `midpo prep` first (or it did not finish)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataNotReady(f"{path}: unreadable manifest ({e}); re-run `midpo prep`") from None
    if not manifest.get("complete") or "fingerprint" not in manifest:
        raise DataNotReady(f"{path}: manifest is not marked complete; re-run `midpo prep`")
    return manifest


def load_split(data_dir: str | Path, split: str):
    """The tokenized split as a memory-mapped `datasets.Dataset` (id, prompt_ids, chosen_ids, rejected_ids)."""
    import datasets

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    manifest = read_manifest(data_dir)
    folder = Path(data_dir) / split
    if not (folder / "state.json").exists():
        raise DataNotReady(f"{folder}: split folder missing although the manifest exists; re-run `midpo prep`")
    ds = datasets.load_from_disk(str(folder))
    expected = manifest["splits"][split]["rows"]
    if len(ds) != expected:
        raise DataNotReady(f"{folder}: {len(ds)} rows but the manifest says {expected}; re-run `midpo prep`")
    return ds
