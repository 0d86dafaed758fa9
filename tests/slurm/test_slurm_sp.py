"""MIDPO_SP -> the stage's sequence_parallel override (slurm/lib.sh midpo_sp_override), without a cluster."""

from __future__ import annotations

import os
import subprocess

from slurm_helpers import REPO


def _override(k: str, tasks: int, per_node: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MIDPO_SP": k, "SLURM_NTASKS": str(tasks), "SLURM_NTASKS_PER_NODE": per_node}
    return subprocess.run(["bash", "-c", f"source {REPO}/slurm/lib.sh && midpo_sp_override train.sequence_parallel"],
                          env=env, capture_output=True, text=True, timeout=30)


def test_sp_size_becomes_the_override_and_is_checked():
    ok = _override("4", 16, "8(x2)")
    assert ok.returncode == 0 and ok.stdout.strip() == "train.sequence_parallel=4" and not ok.stderr
    assert _override("1", 16, "8").stdout == ""  # off: no override
    across = _override("4", 12, "6")
    assert across.returncode == 0 and "span nodes" in across.stderr  # runs, warned
    bad = _override("3", 16, "8")
    assert bad.returncode == 1 and "MIDPO_SP=3 does not divide the job's 16 tasks" in bad.stderr
    assert "positive integer" in _override("x", 16, "8").stderr
