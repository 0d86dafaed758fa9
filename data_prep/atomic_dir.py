"""Whole-folder atomic publishing: build under a hidden temp name beside the target, then rename.

A reader therefore sees either the previous complete folder or the new complete one, never a
half-written one; a crash leaves only a `.NAME.tmp-PID` folder that the next run removes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def temp_dir_for(final: str | Path) -> Path:
    """A fresh, empty temp folder in the same parent (same filesystem, so rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_dir(tmp: str | Path, final: str | Path) -> Path:
    """Replace `final` by `tmp`. The old folder is moved aside first, then deleted."""
    tmp, final = Path(tmp), Path(final)
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
