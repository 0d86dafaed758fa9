"""Atomic writes (one file, or a whole folder), and the one guard on what midpo may replace.

`atomic_file(path)` is the one way midpo writes a file that a reader may look at while it is written:
write to a temp name beside it, fsync, rename over it. Folders are published the same way.

Build under a hidden temp name beside the target, then rename: a reader sees either the previous
complete folder or the new complete one, never a half-written one; a crash leaves only a
`.NAME.tmp-PID` folder that the next run removes.

midpo replaces or deletes only folders it wrote itself. Every folder it publishes carries a marker
file (`OUTPUT_MARKER`, naming the stage that wrote it); `publish_dir` replaces an existing target
only when that target holds the marker (or is an empty folder), so `--out ~/important` or an output
folder that holds the stage's own input is refused with a message, never deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from midpo.errors import MidpoError

OUTPUT_MARKER = ".midpo-output.json"


class OutputDirError(MidpoError, FileExistsError):
    """An output path midpo must not replace: a folder (or file) it did not write, or one holding an input."""


def written_by_midpo(path: str | Path) -> bool:
    """True when `path` is a folder holding midpo's output marker."""
    return (Path(path) / OUTPUT_MARKER).is_file()


def check_replaceable(final: str | Path, *, inputs: tuple[str | Path, ...] = ()) -> None:
    """Raise OutputDirError unless `final` is absent, an empty folder, or a folder midpo wrote, and it
    contains none of `inputs` (a stage must not publish over its own input). Call it before any work,
    so a refused output costs nothing."""
    final = Path(final)
    resolved = final.resolve()
    for inp in inputs:
        p = Path(inp).resolve()
        if p == resolved or resolved in p.parents:
            raise OutputDirError(f"output folder {final} contains the input {inp}: publishing would delete it; "
                                 "choose another output folder")
    if not final.exists() and not final.is_symlink():
        return
    if not final.is_dir() or final.is_symlink():
        raise OutputDirError(f"output path {final} exists and is not a folder midpo wrote; midpo never replaces "
                             "it: choose another output path or move it away yourself")
    if written_by_midpo(final) or not any(final.iterdir()):
        return
    raise OutputDirError(
        f"output folder {final} exists and was not written by midpo (no {OUTPUT_MARKER} in it); midpo replaces "
        "only folders it wrote. Choose another output folder, or move or delete this one yourself.")


def mark_output(folder: str | Path, kind: str, **info) -> Path:
    """Write the marker that makes `folder` replaceable by a later run (call on the temp folder)."""
    path = Path(folder) / OUTPUT_MARKER
    path.write_text(json.dumps({"written_by": "midpo", "kind": kind, "created_unix": int(time.time()), **info},
                               sort_keys=True) + "\n", encoding="utf-8")
    return path


def temp_dir_for(final: str | Path, kind: str) -> Path:
    """A fresh, empty temp folder in the same parent (same filesystem, so rename is atomic), already
    carrying the output marker of `kind` (the stage that writes it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)  # our own naming: a crashed run's leftovers
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mark_output(tmp, kind)
    return tmp


def publish_dir(tmp: str | Path, final: str | Path) -> Path:
    """Replace `final` by `tmp` (which must carry the marker). The old folder is moved aside first, then
    deleted; a folder midpo did not write is refused (OutputDirError) and left as it is."""
    tmp, final = Path(tmp), Path(final)
    if not written_by_midpo(tmp):
        raise OutputDirError(f"{tmp}: no {OUTPUT_MARKER}; build outputs with temp_dir_for")  # a midpo bug
    check_replaceable(final)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# single files


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block succeeds, fsync it and rename it over `path`, so a reader
    sees the old file or the new one, never half of one. On an error the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_config(cfg, path: str | Path, records: dict | None = None) -> Path:
    """Write a resolved config as YAML, atomically (`records`: see config.dump_config)."""
    from midpo.config import dump_config

    return atomic_write_text(path, dump_config(cfg, records))


def update_saved_config(cfg, path: str | Path, records: dict | None = None) -> list[tuple[str, Any, Any]]:
    """Write `cfg` (and `records`) to `path` unless it already holds the same (then the file is left untouched); a
    file with other settings is rewritten with a warning naming every changed key (never silently). Returns those
    changes; an unreadable file counts as changed."""
    import logging

    import yaml

    from midpo.config import ConfigError, config_changes, load_config

    path = Path(path)
    changes: list[tuple[str, Any, Any]] = []
    if path.exists():
        try:
            changes = config_changes(load_config(path), cfg)
            saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (ConfigError, yaml.YAMLError) as e:
            changes, saved = [("(unreadable)", str(e), None)], {}
        if not changes and all(saved.get(k) == v for k, v in (records or {}).items()):
            return []
        # records alone (derived, e.g. auto's reasons with this launch's free memory): no message; `auto` resolved
        # to its choice (the trainer logged the reason): info; any other change: a warning naming every key
        if changes:
            level = logging.INFO if all(a == "auto" for _, a, _ in changes) else logging.WARNING
            logging.getLogger(__name__).log(level, "%s: rewritten with this run's config; changed: %s", path,
                                            "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes))
    save_config(cfg, path, records)
    return changes

