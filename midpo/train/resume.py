"""May this run resume from that checkpoint, and `midpo train --force`: start over.

`check_resume` compares the checkpoint's `config.yaml`, `trainer_state.json` and input fingerprints with the run
about to resume from it: it names every changed key and refuses all but the ones `midpo.config.RESUME_MUTABLE`
lists (a changed global batch, data or reference is refused too; another process count and another run length
are accepted and logged). `start_over` removes what training wrote in a run folder, and nothing else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from midpo.config import RESUME_MUTABLE, Config, config_changes, load_config
from midpo.runtime.checkpoint import STEP_DIR, CheckpointError
from midpo.runtime.files import check_replaceable


def global_batch(cfg: Config, world: int) -> int:
    """Pairs per optimizer step: micro x accum x data-parallel ranks (processes / train.sequence_parallel)."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum * (world // cfg.train.sequence_parallel)


def resume_differences(saved: Config, saved_state: dict, cfg: Config, world: int, inputs: dict,
                       total_steps: int, auto: dict | None = None) -> tuple[list[str], list[str]]:
    """(refused, accepted): one line per difference between the checkpoint (its config and trainer state) and
    the run about to resume from it. Pure. Refused: a changed key outside RESUME_MUTABLE, another global batch,
    changed input fingerprints. Accepted: RESUME_MUTABLE keys, another process count, another run length.
    `auto`: the keys `auto` chose for this run (runtime.planning.resolve_auto's picks); a refused one says why it
    was chosen and how to keep the checkpoint's."""
    refused, accepted = [], []
    for key, old, new in config_changes(saved, cfg):
        if key in RESUME_MUTABLE:
            accepted.append(f"{key}: {old!r} -> {new!r} ({RESUME_MUTABLE[key]})")
        elif key in (auto or {}):
            refused.append(f"{key}: {old!r} -> {new!r} ({key}=auto chose {new!r} for this launch: "
                           f"{auto[key]['reason']}; pass {key}={old} to resume with the checkpoint's)")
        else:
            refused.append(f"{key}: {old!r} -> {new!r}")
    saved_world = int(saved_state.get("world_size") or world)
    was, now = global_batch(saved, saved_world), global_batch(cfg, world)
    if was != now:
        tc = cfg.train
        if was % (tc.micro_batch_size * world) == 0:
            fix = f"train.grad_accum={was // (tc.micro_batch_size * world)}"
        elif was % (tc.grad_accum * world) == 0:
            fix = f"train.micro_batch_size={was // (tc.grad_accum * world)}"
        elif was % world == 0:
            fix = f"train.micro_batch_size={was // world} train.grad_accum=1"
        else:
            fix = None
        refused.append(
            f"pairs per optimizer step (micro x accum x processes): {saved.train.micro_batch_size} x "
            f"{saved.train.grad_accum} x {saved_world} = {was} at the checkpoint, {tc.micro_batch_size} x "
            f"{tc.grad_accum} x {world} = {now} now; the data order and the schedule are counted in global batches, "
            + (f"keep {was}: pass {fix}" if fix else f"and {was} pairs cannot be split over {world} processes: "
               f"resume with {saved_world} processes"))
    if saved_world != world:
        accepted.append(f"processes: {saved_world} -> {world} (ZeRO partitions resharded through DeepSpeed's universal "
                        "checkpoint; per-rank RNG streams cannot be mapped and are not restored)")
    for name, old in sorted((saved_state.get("inputs") or {}).items()):
        if inputs.get(name) is not None and inputs[name] != old:
            refused.append(f"{name} fingerprint: {old} -> {inputs[name]} (the {name} changed since the checkpoint)")
    old_total = saved_state.get("total_steps")
    if old_total is not None and int(old_total) != total_steps:
        from midpo.core.schedule import lr_multiplier, warmup_steps

        tc, k = cfg.train, int(saved_state.get("step", 0))
        lrs = [tc.lr * lr_multiplier(k, n, warmup_steps(n, tc.warmup_ratio), tc.schedule)
               for n in (int(old_total), total_steps)]
        accepted.append(f"run length: {old_total} -> {total_steps} steps (the lr schedule, warmup included, is laid "
                        f"over the new length: lr of step {k + 1}: {lrs[0]:.3g} -> {lrs[1]:.3g})")
    return refused, accepted


def check_resume(ckpt: str | Path, cfg: Config, world: int, inputs: dict, total_steps: int,
                 auto: dict | None = None) -> list[str]:
    """Raise CheckpointError naming every difference a resume from `ckpt` cannot take (resume_differences);
    return the accepted ones (the caller logs them)."""
    ckpt = Path(ckpt)
    try:
        saved = load_config(ckpt / "config.yaml")
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except Exception as e:
        raise CheckpointError(f"{ckpt}: cannot read its config.yaml / trainer_state.json ({e}); a resume cannot be "
                              "checked against it: start over with `midpo train --force`") from None
    refused, accepted = resume_differences(saved, state, cfg, world, inputs, total_steps, auto)
    if refused:
        raise CheckpointError(
            f"cannot resume from {ckpt} with this config: it differs from the checkpoint's\n  " + "\n  ".join(refused)
            + f"\nUndo these changes to resume (the checkpoint's config: {ckpt / 'config.yaml'}), or start the run "
            "over with `midpo train --force` (removes its checkpoints/, training logs, tensorboard/ and export/). "
            f"Keys a resume may change (midpo.config.RESUME_MUTABLE): {', '.join(RESUME_MUTABLE)}.")
    return accepted


# ---------------------------------------------------------------------------------------------
# `midpo train --force`: start over


# metrics.jsonl and the tracker run ids: report_to (a fresh start opens new W&B / MLflow runs; their data stays)
TRAIN_LOGS = ("train_metrics.jsonl", "consumed_rows.jsonl", "profile_rank*.txt", "profile_rank*.json", "metrics.jsonl",
              "wandb_run_id", "mlflow_run_id")


def start_over(run_dir: str | Path) -> list[Path]:
    """One process (rank 0). Remove what `midpo train` wrote in `run_dir`, and nothing else: checkpoints/latest,
    the step-* folders and DeepSpeed's scripts beside them, the training logs (TRAIN_LOGS), TensorBoard event files,
    and export/ when midpo wrote it (midpo.runtime.files's guard, checked before anything is removed). Returns what
    was removed."""
    run = Path(run_dir)
    export = run / "export"
    check_replaceable(export)  # raises OutputDirError for a folder midpo did not write: nothing removed yet
    removed: list[Path] = []
    ckpts = run / "checkpoints"
    if ckpts.is_dir():
        # the pointer first (no `latest` names a half-removed folder); DeepSpeed's recovery scripts, which it copies
        # beside every checkpoint it saves
        for name in ("latest", "zero_to_fp32.py", "zero_to_torch.py"):
            if (ckpts / name).is_file():
                (ckpts / name).unlink()
                removed.append(ckpts / name)
        for p in sorted(ckpts.iterdir()):
            if p.is_dir() and not p.is_symlink() and STEP_DIR.match(p.name):
                shutil.rmtree(p)
                removed.append(p)
    for folder, patterns in ((run / "logs", TRAIN_LOGS), (run / "tensorboard", ("events.out.tfevents.*",))):
        for pat in patterns:
            for f in sorted(folder.glob(pat)) if folder.is_dir() else ():
                if f.is_file():
                    f.unlink()
                    removed.append(f)
    for folder in (ckpts, run / "logs", run / "tensorboard"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if export.exists():
        aside = export.with_name(f".{export.name}.removed")
        shutil.rmtree(aside, ignore_errors=True)
        export.rename(aside)
        shutil.rmtree(aside)
        removed.append(export)
    return removed
