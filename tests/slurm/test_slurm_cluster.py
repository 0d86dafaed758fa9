"""The local 2-node cluster itself, and rank wiring from Slurm's environment alone."""

from __future__ import annotations

import textwrap

import pytest
from slurm_helpers import read_log

pytestmark = pytest.mark.slurm


def test_two_node_job_runs_one_task_per_node(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch([
        "-N", "2", "--ntasks-per-node=1", "--time=1", f"--output={out}",
        "--wrap", 'srun --kill-on-bad-exit=1 bash -c "echo task \\$SLURM_PROCID on \\$SLURMD_NODENAME"',
    ])
    info = slurm_cluster.wait(job, timeout=60)
    log = read_log(out)
    assert info["JobState"] == "COMPLETED", log
    tasks = sorted(line.split()[1:] for line in log.splitlines() if line.startswith("task "))
    assert tasks == [["0", "on", "n1"], ["1", "on", "n2"]], log


def test_srun_gloo_all_reduce_from_slurm_env(slurm_cluster, tmp_path):
    """2 srun tasks on 2 nodes meet through midpo.runtime.dist.init_distributed(): no RANK/MASTER_ADDR given."""
    script = tmp_path / "allreduce.py"
    script.write_text(textwrap.dedent("""
        import os
        import torch
        import torch.distributed as dist
        from midpo.runtime.dist import cleanup, init_distributed

        rank, world, local = init_distributed(timeout_minutes=1)
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        print(f"rank={rank} world={world} local={local} sum={t.item():g} node={os.environ['SLURMD_NODENAME']} "
              f"master={os.environ['MASTER_ADDR']} backend={dist.get_backend()}", flush=True)
        cleanup()
    """))
    out = tmp_path / "job.out"
    env = slurm_cluster.env()
    job = slurm_cluster.sbatch([
        "-N", "2", "--ntasks-per-node=1", "--time=2", f"--output={out}",
        "--wrap", f"srun --kill-on-bad-exit=1 {env['MIDPO_PYTHON']} {script}",
    ], env=env)
    info = slurm_cluster.wait(job, timeout=120)
    log = read_log(out)
    assert info["JobState"] == "COMPLETED", log
    lines = sorted(line for line in log.splitlines() if line.startswith("rank="))
    assert lines == [
        "rank=0 world=2 local=0 sum=3 node=n1 master=n1 backend=gloo",
        "rank=1 world=2 local=0 sum=3 node=n2 master=n1 backend=gloo",
    ], log
