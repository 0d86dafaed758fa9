"""The `slurm` tier: a real 2-node Slurm cluster on this machine (tests/slurm/cluster.sh).

The session fixture starts the cluster once (unless one is already up, which it then leaves up) and
stops it at the end. Where the cluster cannot come up it SKIPS locally (not root, Slurm not installed:
run tests/slurm/install.sh) but FAILS under CI=true: a test skipped in CI is a test that does not exist.

Jobs run with the test's own interpreter (MIDPO_PYTHON=sys.executable) and CPU-only overrides
(`--gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=1`: each test node has one CPU).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from slurm_helpers import REPO, SLURM_CONF, STATE_DIR, SlurmCluster

CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"


def _cannot_run(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"slurm tier cannot run under CI: {reason}", pytrace=False)
    pytest.skip(f"slurm tier: {reason}")


def _cluster(cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), cmd], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "MIDPO_SLURM_DIR": STATE_DIR})


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        _cannot_run("needs root (slurmd runs jobs as their owners); run the tests as root")
    missing = [c for c in ("sbatch", "slurmctld", "slurmd", "munged", "scontrol") if shutil.which(c) is None]
    if missing:
        _cannot_run(f"{', '.join(missing)} not installed: run tests/slurm/install.sh")
    already_up = _cluster("status", timeout=30).returncode == 0
    if not already_up:
        r = _cluster("start")
        if r.returncode != 0:
            _cluster("stop")
            _cannot_run(f"cluster.sh start failed:\n{r.stdout}\n{r.stderr}")
    os.environ["SLURM_CONF"] = SLURM_CONF
    try:
        yield SlurmCluster()
    finally:
        if not already_up:
            _cluster("stop")


@pytest.fixture(autouse=True)
def _slurm_marked(request):
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm_cluster")
