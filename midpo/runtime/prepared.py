"""Reading stage 1's output, for later stages: the manifest and the tokenized splits.

Both refuse a folder whose manifest is missing or incomplete (a crashed or in-progress prep run),
so no stage can train on partial data. A split is opened only after its files match the content
hashes and row count `midpo prep` recorded (`midpo.runtime.integrity`): damaged or hand-edited data is
refused with the file's name and the command that rebuilds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from midpo.errors import MidpoError
from midpo.runtime.integrity import split_damage

SPLITS = ("train", "eval")
REBUILD = "re-run `midpo prep --force`"


class DataNotReady(MidpoError, FileNotFoundError):
    """The data folder is missing, incomplete, or not a `midpo prep` output."""


class DataDamaged(DataNotReady):
    """A split's files differ from what `midpo prep` recorded (damaged, edited, or an older midpo's)."""


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


def _split_folder(data_dir: str | Path, split: str, manifest: dict[str, Any]) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    folder = Path(data_dir) / split
    if split not in manifest.get("splits", {}):
        raise DataNotReady(f"{Path(data_dir) / 'manifest.json'} has no split {split!r}; re-run `midpo prep`")
    if not (folder / "state.json").exists():
        raise DataNotReady(f"{folder}: split folder missing although the manifest exists; {REBUILD}")
    return folder


def check_split(data_dir: str | Path, split: str, manifest: dict[str, Any]) -> None:
    """Raise unless `split`'s files are exactly what `manifest` recorded (hashes streamed, rows recounted)."""
    folder = _split_folder(data_dir, split, manifest)
    damage = split_damage(folder, manifest["splits"][split], Path(data_dir) / "manifest.json")
    if damage:
        raise DataDamaged(f"{damage}; {REBUILD}")


def verify_data(data_dir: str | Path, splits: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
    """The manifest, after checking `splits` (default: every split it lists). For a stage's "up to date"
    check on its input: a stage cannot rebuild its input, so damage raises DataDamaged."""
    manifest = read_manifest(data_dir)
    for split in splits or [s for s in SPLITS if s in manifest.get("splits", {})]:
        check_split(data_dir, split, manifest)
    return manifest


def load_split(data_dir: str | Path, split: str, *, verify: bool = True):
    """The tokenized split as a memory-mapped `datasets.Dataset` (id, prompt_ids, chosen_ids, rejected_ids).
    verify=False skips re-hashing, for a caller that ran `verify_data` on this split just before."""
    import datasets

    manifest = read_manifest(data_dir)
    folder = _split_folder(data_dir, split, manifest)
    if verify:
        check_split(data_dir, split, manifest)
    ds = datasets.load_from_disk(str(folder))
    expected = manifest["splits"][split]["rows"]
    if len(ds) != expected:
        raise DataNotReady(f"{folder}: {len(ds)} rows but the manifest says {expected}; {REBUILD}")
    return ds


def data_fingerprints(manifest: dict, data_dir: Path) -> tuple[str, str]:
    """(data fingerprint, tokenizer fingerprint) from a stage-1 manifest."""
    data_fp = manifest.get("fingerprint")
    tok_fp = (manifest.get("tokenizer") or {}).get("fingerprint")
    if not data_fp or not tok_fp:
        raise DataNotReady(f"{Path(data_dir) / 'manifest.json'}: no `fingerprint` or `tokenizer.fingerprint`")
    return str(data_fp), str(tok_fp)


def available_splits(manifest: dict) -> list[str]:
    return [s for s in SPLITS if s in manifest.get("splits", {})]
