"""Checkpoints: `<run_dir>/checkpoints/step-NNNNNNN/` + `checkpoints/latest`.

A checkpoint holds the DeepSpeed policy checkpoint (ZeRO-3 shards, optimizer, lr scheduler), the
hook's state (the prior engine, when there is one), `trainer_state.json` (step, consumed samples,
sampler state, counters), one `rng_rank{r}.pt` per rank (python, numpy, torch RNG states) and the
resolved `config.yaml`. `latest` is written last, atomically, by rank 0, after a barrier that
every rank reaches only once its own files are written; older checkpoints beyond `keep_last` are
removed only after that. A half-written checkpoint is therefore never named by `latest`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline import dist as pdist
from pipeline.config import Config, save_config
from pipeline.fingerprint import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def rng_state() -> dict:
    """RNG states in a form `torch.load(weights_only=True)` accepts (tensors, lists, ints)."""
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint named by `latest`, or None. A dangling `latest` is an error, never ignored."""
    root = Path(ckpt_root)
    f = root / "latest"
    if not f.exists():
        return None
    name = f.read_text().strip()
    path = root / name
    if not (path / "trainer_state.json").exists():
        raise RuntimeError(f"{f} names {name!r} but {path}/trainer_state.json is missing: the checkpoint folder "
                           "was damaged or moved; point `latest` at an intact step-* folder or remove it")
    return path


def save_checkpoint(ckpt_root: str | Path, step: int, engine, trainer_state: dict, cfg: Config, hook=None,
                    keep_last: int = 2) -> Path:
    """Collective: every rank calls it at the same step."""
    root = Path(ckpt_root)
    tag = step_dir_name(step)
    path = root / tag
    rank = pdist.rank()
    if rank == 0 and path.exists():
        if (root / "latest").exists() and (root / "latest").read_text().strip() == tag:
            raise RuntimeError(f"refusing to overwrite {path}: `latest` names it")
        shutil.rmtree(path)  # a stale half-written folder from a killed run (latest never named it)
    pdist.barrier()
    # save_latest=False: DeepSpeed would otherwise write its own `latest` before our state exists.
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    if hook is not None:
        hook.save_checkpoint(path)
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    if rank == 0:
        atomic_write_json(path / "trainer_state.json", trainer_state)
        save_config(cfg, path / "config.yaml")
    pdist.barrier()  # every rank's files are on disk
    if rank == 0:
        atomic_write_text(root / "latest", tag + "\n")
        _prune(root, keep_last, keep=tag)
    pdist.barrier()
    log.info("saved checkpoint %s", path)
    return path


def _prune(root: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    steps = sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=lambda p: p.name)
    for p in steps[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path, engine, hook=None) -> dict:
    """Collective. Restores engine (weights, optimizer, scheduler), hook, this rank's RNG; returns trainer state."""
    path = Path(path)
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    if hook is not None:
        hook.load_checkpoint(path)
    state = json.loads((path / "trainer_state.json").read_text())
    rank, world = pdist.rank(), pdist.world_size()
    if state.get("world_size") != world:
        # Weights, optimizer and sampler resume fine (sampler offsets are in rows); only the
        # per-rank RNG streams cannot be mapped, so the run is no longer bit-reproducible.
        log.warning("checkpoint was written with world size %s, resuming with %s: RNG streams not restored",
                    state.get("world_size"), world)
    else:
        set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=True))
    return state
