"""Helpers for the slurm tier: submit, inspect and wait for jobs on the local test cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = os.environ.get("MIDPO_SLURM_DIR", "/tmp/midpo-slurm")
SLURM_CONF = f"{STATE_DIR}/slurm.conf"

# sbatch flags that fit the test nodes (1 CPU, no GPU) for the GPU-shaped #SBATCH defaults.
CPU_ARGS = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"]
PREP_CPU_ARGS = ["--cpus-per-task=1"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
# Launcher variables that must not leak from the test process into jobs (they would mask Slurm's).
_LEAKY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


class SlurmCluster:
    repo = REPO

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _LEAKY}
        env.update(SLURM_CONF=SLURM_CONF, MIDPO_PYTHON=sys.executable, MIDPO_REPO=str(REPO))
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(extra)
        return env

    def sbatch(self, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        r = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=60,
                           env=env or self.env(), cwd=cwd or REPO)
        assert r.returncode == 0, f"sbatch {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
        return int(r.stdout.strip().split(";")[0])

    def show(self, job: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, ExitCode, Restarts, NodeList, ...)."""
        r = subprocess.run(["scontrol", "-o", "show", "job", str(job)], capture_output=True, text=True, timeout=30,
                           env=self.env())
        assert r.returncode == 0, r.stderr
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait(self, job: int, timeout: float, *, until=None, seen: list[str] | None = None) -> dict[str, str]:
        """Poll until the job is terminal (or `until(info)` holds); `seen` collects every state observed."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.show(job)
            if seen is not None and (not seen or seen[-1] != info["JobState"]):
                seen.append(info["JobState"])
            if (until(info) if until else info["JobState"] in TERMINAL):
                return info
            if time.monotonic() > deadline:
                self.cancel(job)
                raise AssertionError(f"job {job} still {info['JobState']} ({info.get('Reason')}) after {timeout} s")
            time.sleep(0.5)

    def cancel(self, job: int) -> None:
        subprocess.run(["scancel", str(job)], capture_output=True, timeout=30, env=self.env())


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<no log at {path}>"


def submit(slurm_cluster: SlurmCluster, recipe: str, overrides: list[str], logs: Path, *, time_min: int = 5,
           **env: str) -> dict[str, int]:
    """slurm/submit.sh with the test nodes' CPU-only flags; returns {stage: job id}."""
    env = slurm_cluster.env(
        MIDPO_SBATCH_ARGS=f"--time={time_min} --output={logs}/%x-%j.out",
        MIDPO_PREP_ARGS=" ".join(PREP_CPU_ARGS),
        MIDPO_REF_ARGS=" ".join(["-N", "2", *CPU_ARGS]),
        MIDPO_TRAIN_ARGS=" ".join(["-N", "2", *CPU_ARGS]),
        **env,
    )
    r = subprocess.run([str(REPO / "slurm" / "submit.sh"), recipe, *overrides], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = {stage: int(job) for stage, job in (line.split() for line in r.stdout.splitlines())}
    assert list(jobs) == env.get("MIDPO_STAGES", "prep ref train").split(), r.stdout
    return jobs
