"""Fault injection for the suite, through midpo's one documented seam: training callbacks
(midpo.train.callbacks.Callback) and the chunk runner's `on_chunk` (midpo.runtime.chunks.StageSpec).

In-process:   midpo.stages.train.main(cfg, callbacks=[NanLoss({2}), ...])
A process:    python tests/support/faults.py train --pause-after-step 4 -- --config R [overrides]
Under torchrun, the same script path instead of `-m midpo.stages.train` (torchrun runs a script by path).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run by path: the repository's midpo

from midpo.runtime import dist as pdist  # noqa: E402
from midpo.train.callbacks import Callback  # noqa: E402

log = logging.getLogger("tests.faults")


def pause_forever(what: str) -> None:
    """Rank 0 stops here, so a test can SIGKILL the whole process group at a known point."""
    log.warning("fault injection: pausing after %s for the test to kill this process group", what)
    while True:
        time.sleep(60)


class NanLoss(Callback):
    """The first micro-step's loss of each step in `steps` becomes NaN on rank 1 (rank 0 in one process)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_micro_loss(self, step, micro, loss):
        if step in self.steps and micro == 0 and pdist.rank() == min(1, pdist.world_size() - 1):
            return loss * float("nan")
        return loss


class PauseAfterStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, step):
        if step == self.step and pdist.is_main():
            pause_forever(f"step {step}")


def pause_after_chunks(n: int):
    def on_chunk(written: int) -> None:
        if written >= n:
            pause_forever(f"{written} chunks")
    return on_chunk


def main(argv: list[str]) -> int:
    from midpo.config import load_config
    from midpo.runtime.launch import stage_cli

    split = argv.index("--")
    p = argparse.ArgumentParser(prog="faults.py")
    p.add_argument("stage", choices=("train", "ref", "iterate"))
    p.add_argument("--round", type=int, default=0, help="iterate: the round whose rollout/train the faults hit")
    p.add_argument("--nan-steps", default="")
    p.add_argument("--pause-after-step", type=int, default=0)
    p.add_argument("--pause-after-chunks", type=int, default=0)
    faults = p.parse_args(argv[:split])
    rest = argv[split + 1:]
    if faults.stage == "iterate":
        from midpo.demo import iterate

        hooks: dict = {}
        if faults.pause_after_chunks:
            hooks["on_chunk"] = pause_after_chunks(faults.pause_after_chunks)
        if faults.pause_after_step:
            hooks["callbacks"] = [PauseAfterStep(faults.pause_after_step)]

        def run_iterate(a):
            cfg = load_config(a.config, a.overrides)
            iterate.iterate(cfg, a.rounds or cfg.iterate.rounds, nproc=1, hooks={faults.round: hooks})
            return 0

        return stage_cli("iterate", iterate.add_arguments, run_iterate, rest)
    if faults.stage == "train":
        from midpo.stages import train

        callbacks = []
        if faults.nan_steps:
            callbacks.append(NanLoss(int(x) for x in faults.nan_steps.split(",")))
        if faults.pause_after_step:
            callbacks.append(PauseAfterStep(faults.pause_after_step))
        return stage_cli("train", train.add_arguments, lambda a: train.run(a, callbacks=callbacks), rest)
    from midpo.stages import ref

    on_chunk = pause_after_chunks(faults.pause_after_chunks) if faults.pause_after_chunks else None
    return stage_cli("ref", ref.add_arguments,
                     lambda a: ref.main(load_config(a.config, a.overrides), a.split, force=a.force, on_chunk=on_chunk)
                     and 0, rest)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sys.exit(main(sys.argv[1:]))
