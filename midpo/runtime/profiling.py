"""Opt-in torch.profiler window over training steps: `train.profile_steps=[A,B]` (1-based, inclusive).

Writes, per rank, `<run_dir>/logs/profile_rank<r>.txt` (operators by self time, CPU and, on CUDA, device)
and `profile_rank<r>.json` (a Chrome/Perfetto trace). A debugging aid for step-time work, never on by
default: the profiler itself slows the steps it records.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from midpo.config import check_step_window

log = logging.getLogger(__name__)

class StepProfiler:
    """Call `begin(step)` before and `end(step)` after every optimizer step (1-based step numbers)."""

    def __init__(self, out_dir: Path, rank: int, window: list[int] | tuple = ()):
        self.window = check_step_window(list(window), "train.profile_steps") if window else None
        self.out_dir, self.rank, self.prof = Path(out_dir), rank, None

    def begin(self, step: int) -> None:
        if self.window and step == self.window[0]:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

    def end(self, step: int) -> None:
        if self.prof is None or step != self.window[1]:
            return
        self.prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        text = self.prof.key_averages().table(sort_by=sort, row_limit=50)
        n = self.window[1] - self.window[0] + 1
        (self.out_dir / f"profile_rank{self.rank}.txt").write_text(f"steps {self.window[0]}-{self.window[1]} "
                                                                    f"({n} steps)\n{text}")
        self.prof.export_chrome_trace(str(self.out_dir / f"profile_rank{self.rank}.json"))
        log.info("profile of steps %d-%d written to %s", *self.window, self.out_dir)
        self.prof = None
