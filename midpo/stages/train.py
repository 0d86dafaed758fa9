"""Stage 3 (`midpo train`): DeepSpeed preference training from the reference cache.

Launch (all read the same recipe; `key.sub=value` tokens override it):

    midpo train --config RECIPE [--nproc N] [key.sub=value ...]        # one machine; N>1 spawns torchrun
    torchrun --nproc_per_node N -m midpo.stages.train --config RECIPE [overrides]
    deepspeed --num_gpus N --module midpo.stages.train --config RECIPE [overrides]
    srun --ntasks N python -m midpo.stages.train --config RECIPE [overrides]   # ranks from the Slurm environment

On a CPU-only machine the same code runs with DeepSpeed's `cpu` accelerator and gloo.

Inputs (midpo.runtime.layout): `<run_dir>/data/{train,eval}` (stage 1), `<run_dir>/ref/{train,eval}` (stage 2;
refused when its data/tokenizer/reference fingerprints differ), the policy. Outputs: `<run_dir>/checkpoints/
step-NNNNNNN/` + `latest`, `<run_dir>/tensorboard/`, `<run_dir>/logs/{train_metrics,consumed_rows}.jsonl`,
`<run_dir>/export/` (HF folder) at the end. A run resumes automatically from `checkpoints/latest` when its config
differs from the checkpoint's only in keys a resume may change (midpo.config.RESUME_MUTABLE), on any number of
processes; `--force` starts it over. SIGTERM/SIGUSR1 (Slurm preemption) checkpoint at the next step boundary and
exit 0. The loop itself: midpo.train.trainer.Trainer; one step: midpo.train.step.train_step.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch.distributed as dist

from midpo.config import Config
from midpo.runtime import dist as pdist
from midpo.train.trainer import Trainer, TrainError  # noqa: F401  (TrainError: the stage's user errors)


def main(cfg: Config, force: bool = False, callbacks=()) -> dict:
    """Set up, train, evaluate, checkpoint, export, clean up. Returns a summary (rank 0's view).
    `force`: start the run over instead of resuming; `callbacks`: midpo.train.callbacks.Callback."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    owned = not dist.is_initialized()  # a caller's process group is the caller's to destroy
    pdist.init_distributed()
    trainer = Trainer(cfg, force=force, callbacks=callbacks)
    try:
        summary = trainer.setup().fit()
        pdist.barrier()  # every rank done before any tears down (gloo aborts a rank whose peer closed first)
        return summary
    finally:
        trainer.close()
        if owned:
            pdist.cleanup()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe (YAML path or name in recipes/)")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (N>1 spawns torchrun)")
    parser.add_argument("--force", action="store_true",
                        help="start the run over: remove its checkpoints, training logs, tensorboard/ and export/ "
                             "(only what midpo wrote) and train from step 0 with this config, instead of resuming")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed


def run(args: argparse.Namespace, callbacks=()) -> int:
    from midpo.runtime.launch import run_or_spawn

    # a MidpoError: one `midpo train: error:` line (runtime.launch.run_stage)
    return run_or_spawn(args, "midpo.stages.train", lambda cfg: main(cfg, force=args.force, callbacks=callbacks))


if __name__ == "__main__":
    from midpo.runtime.launch import stage_cli

    sys.exit(stage_cli("train", add_arguments, run))
