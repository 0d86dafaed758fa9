"""Checkpoints: `<run_dir>/checkpoints/step-NNNNNNN/` + `checkpoints/latest`.

A checkpoint holds the DeepSpeed policy checkpoint (ZeRO-3 shards, optimizer, lr scheduler), the
prior network's own (MI-DPO, in `prior/`, its HF config in `prior_hf_config/`), `trainer_state.json` (step, consumed samples,
sampler state, counters, world size, input fingerprints), one `rng_rank{r}.pt` per rank (python,
numpy, torch RNG states) and the resolved `config.yaml`. `latest` is written last, atomically, by
rank 0, after a barrier that every rank reaches only once its own files are written; older
checkpoints beyond `keep_last` are removed only after that. A half-written checkpoint is therefore
never named by `latest`.

Loading trusts nothing in the folder (it may have been copied from elsewhere, or crafted):
- every `.pt` is unpickled with `weights_only=True` and an allow-list of the few plain-data types
  DeepSpeed's own files hold (`safe_load`). DeepSpeed's loaders (its checkpoint engine, ZeRO-3's
  universal loader, zero_to_fp32, ds_to_universal) call `torch.load(weights_only=False)` with no
  switch, so `safe_torch_load()` routes their torch.load to `safe_load` for the duration of a load
  and restores it after. Before a resume, rank 0 also scans every `.pt` pickle (no tensor read) and
  all ranks refuse together, so a crafted file on one rank cannot leave the others in a collective.
  A hash recorded in the same folder would not help: whoever crafts the folder rewrites the hash.
- midpo.train.resume.check_resume compares the checkpoint's `config.yaml` and input fingerprints with the run about to
  resume, names every changed key and refuses all but the ones `midpo.config.RESUME_MUTABLE` lists.
- another number of processes than the checkpoint's is supported: `load_engine` converts the ZeRO
  partitions to DeepSpeed's universal checkpoint (rank 0, once, into `step-N/universal/`) and loads
  that; the global batch (micro x accum x processes) must stay the same.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import pickle
import random
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from midpo.config import Config
from midpo.errors import MidpoError
from midpo.runtime import dist as pdist
from midpo.runtime.files import (
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    publish_dir,
    save_config,
    temp_dir_for,
    written_by_midpo,
)

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{7,})$")
UNIVERSAL_DIR = "universal"  # inside a step folder (or its prior/): DeepSpeed's universal form, written by midpo


class CheckpointError(MidpoError, RuntimeError):
    """A checkpoint midpo refuses to load or resume from; the message says what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file whose pickle holds something no midpo/DeepSpeed checkpoint holds (code could run)."""


# ---------------------------------------------------------------------------------------------
# safe loading


_TORCH_LOAD = torch.serialization.load  # the real loader (what `torch.load` is, outside safe_torch_load)
_patch_lock = threading.Lock()
_patch_depth = 0
_patched_over = None


@functools.cache
def checkpoint_globals() -> tuple:
    """The non-tensor types DeepSpeed 0.19.8 pickles into checkpoint files, and nothing else: found by saving
    real checkpoints (ZeRO 0, 2 and 3, the MI-DPO prior engine, their universal conversions) and listing their
    pickles' globals outside torch's own allow-list (torch.serialization.get_unsafe_globals_in_checkpoint).
    ZeroStageEnum and LossScaler (ZeRO-2/3 optim_states), fragment_address (ZeRO-2 slice map), DynamicLossScaler
    (fp16 in place of LossScaler). Plain-data classes: unpickling one only sets attributes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)


def safe_load(f, map_location=None, **kwargs):
    """`torch.load` with `weights_only=True` and `checkpoint_globals()`, whatever the caller asked for: a file
    whose pickle would call anything else (code run on load) raises UnsafeCheckpointError, unloaded."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(list(checkpoint_globals())):
            return _TORCH_LOAD(f, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        # torch's reason, without its advice to allow-list what it found
        m = re.search(r"WeightsUnpickler error: (.+?)(\. Please|\n|$)", str(e))
        raise UnsafeCheckpointError(
            f"{f}: refused to load: its pickle holds what no midpo or DeepSpeed checkpoint holds "
            f"({m.group(1).strip() if m else str(e).splitlines()[0]}); loading it could run code. The file was "
            "modified or replaced: do not load it. Resume from another checkpoint (point checkpoints/latest at an "
            "intact step-* folder) or start over with `midpo train --force`.") from None


@contextlib.contextmanager
def safe_torch_load():
    """Within: every `torch.load` call is `safe_load`. DeepSpeed's checkpoint loaders (its checkpoint engine,
    ZeRO-3's universal loader, zero_to_fp32, ds_to_universal) call `torch.load(weights_only=False)` and offer no
    switch; this routes them through the allow-list for the duration of one load and restores torch.load on
    exit (nested scopes share one patch)."""
    global _patch_depth, _patched_over
    with _patch_lock:
        if _patch_depth == 0:
            _patched_over, torch.load = torch.load, safe_load
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                torch.load, _patched_over = _patched_over, None


def unsafe_files(folder: str | Path) -> list[str]:
    """`file: reason` for every `*.pt` under `folder` (midpo's own hidden temp folders aside) whose pickle names a
    global outside the allow-list, or that is no torch.save file. A static scan of the pickles: nothing is
    unpickled and no tensor is read."""
    folder = Path(folder)
    out = []
    with torch.serialization.safe_globals(list(checkpoint_globals())):
        for f in sorted(folder.rglob("*.pt")):
            if any(part.startswith(".") for part in f.relative_to(folder).parts[:-1]):
                continue  # `.NAME.tmp-PID`: a conversion in progress or crashed (temp_dir_for removes it)
            try:
                bad = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(f))
            except Exception as e:  # not a zip written by torch.save, truncated, unreadable
                bad = [f"unreadable as a torch.save file ({type(e).__name__}: {e})"]
            if bad:
                out.append(f"{f}: {', '.join(bad)}")
    return out


def refuse_unsafe(folder: str | Path) -> None:
    """Collective: rank 0 scans `folder` (unsafe_files); every rank raises the same UnsafeCheckpointError."""
    bad = pdist.broadcast_object(unsafe_files(folder) if pdist.is_main() else None)
    if bad:
        raise UnsafeCheckpointError(
            f"refusing to load {folder}: {len(bad)} file(s) hold pickled objects that no midpo or DeepSpeed "
            "checkpoint holds (loading them could run code):\n  " + "\n  ".join(bad[:20])
            + ("\n  ..." if len(bad) > 20 else "") + "\nDo not load this folder. Resume from another checkpoint "
            "(point checkpoints/latest at an intact step-* folder) or start over with `midpo train --force`.")


# ---------------------------------------------------------------------------------------------
# save


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


def save_checkpoint(ckpt_root: str | Path, step: int, engines: dict, trainer_state: dict, cfg: Config,
                    keep_last: int = 2) -> Path:
    """Collective: every rank calls it at the same step. `engines`: name -> runtime.engine.Engine; "policy" is
    DeepSpeed's checkpoint in the step folder itself, any other in `<step>/<name>/` with its module's HF config in
    `<step>/<name>_hf_config/` (what offline export needs)."""
    root = Path(ckpt_root)
    tag = step_dir_name(step)
    path = root / tag
    rank = pdist.rank()
    if rank == 0 and path.exists():
        if (root / "latest").exists() and (root / "latest").read_text().strip() == tag:
            raise CheckpointError(f"refusing to overwrite {path}: `latest` names it")
        shutil.rmtree(path)  # a stale half-written folder from a killed run (latest never named it)
    pdist.barrier()
    for name, engine in engines.items():
        # save_latest=False: DeepSpeed would otherwise write its own `latest` before our state exists
        # LoRA: the frozen base is not saved (it is the policy folder); the adapters and their optimizer state are
        kw = {"save_latest": False, "exclude_frozen_parameters": is_lora(engine)}
        if name == "policy":
            engine.ds.save_checkpoint(str(root), tag=tag, **kw)
        else:
            engine.ds.save_checkpoint(str(path), tag=name, **kw)
            if rank == 0:
                engine.module.config.save_pretrained(str(path / f"{name}_hf_config"))
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


def is_lora(engine) -> bool:
    """The engine's module holds LoRA adapters (runtime.lora): its checkpoints leave the frozen base out."""
    return getattr(engine.module, "peft_model", None) is not None


def _prune(root: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    steps = sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)
    for p in steps[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)



# ---------------------------------------------------------------------------------------------
# load


def load_checkpoint(path: str | Path, engines: dict) -> dict:
    """Collective. Restores every engine of `engines` (as save_checkpoint names them: weights, optimizer, lr
    schedule) and this rank's RNG; returns the trainer state. Every file is checked first (refuse_unsafe) and
    loaded through safe_load."""
    path = Path(path)
    refuse_unsafe(path)
    with safe_torch_load():
        for name, engine in engines.items():
            load_dir, tag = (path.parent, path.name) if name == "policy" else (path, name)
            if load_engine(engine.ds, load_dir, tag) is None:
                raise CheckpointError(f"DeepSpeed could not load the {name} checkpoint in {Path(load_dir) / tag} "
                                      f"(was the run trained with the same loss.prior?)")
        state = json.loads((path / "trainer_state.json").read_text())
        rank, world = pdist.rank(), pdist.world_size()
        if state.get("world_size") != world:
            # Weights, optimizer and sampler resume (sampler offsets are in rows, the global batch is the same);
            # the per-rank RNG streams cannot be mapped onto another number of ranks.
            log.warning("checkpoint was written with world size %s, resuming with %s: RNG streams not restored",
                        state.get("world_size"), world)
        else:
            set_rng_state(safe_load(path / f"rng_rank{rank}.pt"))
    return state


def zero_partitions(folder: Path) -> int:
    """How many ZeRO-2/3 optimizer partitions (one per data-parallel rank) the DeepSpeed checkpoint in `folder`
    holds; 0 for stage 0, whose optimizer state is whole in the model file and loads on any number of ranks."""
    return len(list(Path(folder).glob("*zero_pp_rank_*_optim_states.pt")))


def load_engine(engine, load_dir: str | Path, tag: str):
    """Collective: `engine.load_checkpoint(load_dir, tag)` (weights, optimizer, lr schedule) through safe_load;
    returns DeepSpeed's load path (None: nothing loaded). When the ZeRO partitions were written by another number
    of processes, they are converted to DeepSpeed's universal checkpoint first (universal_copy) and loaded from it:
    DeepSpeed's own loader refuses a changed data-parallel world size."""
    src = Path(load_dir) / tag
    saved, now = zero_partitions(src), getattr(engine, "dp_world_size", None)
    lora = is_lora(engine)  # the frozen base is not in the checkpoint
    with safe_torch_load():
        if not saved or now is None or saved == now:
            load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True, load_module_strict=not lora)
            return load_path
        uni = universal_copy(src, saved, now)
        # DeepSpeed's `checkpoint.load_universal` setting: read only by load_checkpoint, so set just around it
        ds_cfg = engine._config
        before, ds_cfg.load_universal_checkpoint = ds_cfg.load_universal_checkpoint, True
        try:
            load_path, _ = engine.load_checkpoint(str(uni.parent), tag=uni.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True, load_module_strict=not lora)
        finally:
            ds_cfg.load_universal_checkpoint = before
        log.info("loaded %s (%d ZeRO partitions) on %d ranks through its universal form %s", src, saved, now, uni)
        return load_path


def universal_copy(src: Path, saved: int, now: int) -> Path:
    """Collective: `src/universal`, DeepSpeed's universal (world-size independent) form of the checkpoint in `src`,
    converted by rank 0 the first time any resume needs it while the other ranks wait."""
    out = Path(src) / UNIVERSAL_DIR
    err = ""
    if pdist.is_main() and not written_by_midpo(out):
        log.warning("%s holds %d ZeRO partitions, this run has %d: converting it to DeepSpeed's universal "
                    "checkpoint in %s (once)", src, saved, now, out)
        try:
            to_universal(src, out)
        except Exception as e:  # every rank must hear of it, or they wait in the next collective forever
            err = f"{type(e).__name__}: {e}"
            log.exception("universal conversion of %s failed", src)
    if not pdist.all_ranks_true(not err):
        raise CheckpointError(
            f"{src} was written by {saved} processes and cannot be loaded by {now}: converting it to DeepSpeed's "
            f"universal checkpoint failed ({err or 'on rank 0, see its log'}). Resume with {saved} processes, or "
            f"write its weights with `midpo export --checkpoint {src} --out DIR` and start a new run from DIR "
            "(model.policy=DIR).")
    return out


def to_universal(src: Path, out: Path) -> Path:
    """One process: DeepSpeed's ds_to_universal of the checkpoint in `src` into `out`, built under a temp name and
    published whole (midpo's output marker in it); every file it reads goes through safe_load."""
    from deepspeed.checkpoint import ds_to_universal

    check_replaceable(out)
    tmp = temp_dir_for(out, "universal")
    # one worker each: in this process (no pools), so the torch.load routing below covers every read;
    # inject_missing_state: a ZeRO-2 checkpoint outside Megatron lacks the `universal_checkpoint_info` it wants
    args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with safe_torch_load(), contextlib.redirect_stdout(sys.stderr):
        ds_to_universal.main(args)
    (Path(src) / "latest_universal").unlink(missing_ok=True)  # its pointer to our temp name; unused (we pass tags)
    return publish_dir(tmp, out)
