"""Whole-folder atomic publishing, and the one guard on what midpo may replace.

Build under a hidden temp name beside the target, then rename: a reader sees either the previous
complete folder or the new complete one, never a half-written one; a crash leaves only a
`.NAME.tmp-PID` folder that the next run removes.

midpo replaces or deletes only folders it wrote itself. Every folder it publishes carries a marker
file (`OUTPUT_MARKER`, naming the stage that wrote it); `publish_dir` replaces an existing target
only when that target holds the marker (or is an empty folder), so `--out ~/important` or an output
folder that holds the stage's own input is refused with a message, never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

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
