"""slurm/submit.sh --rounds N: the jobs it submits and their afterok chain, read from a stub `sbatch` (no cluster:
the chain is what this checks; the stages themselves are the other slurm tests' and tests/demo/test_iterate.py's)."""

from __future__ import annotations

import os
import subprocess

from slurm_helpers import REPO


def test_rounds_chain_four_jobs_per_round_each_after_the_previous(tmp_path):
    calls = tmp_path / "calls"
    stub = tmp_path / "bin" / "sbatch"
    stub.parent.mkdir()
    # each call: its arguments on one line; job ids 101, 102, ... (--parsable: "jobid;cluster")
    stub.write_text(f'#!/bin/bash\necho "$*" >> {calls}\nn=$(wc -l < {calls})\necho "$((100 + n));local"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "MIDPO_AFTER": "77",
           "MIDPO_ROUND_ARGS": "--nodes=2"}
    out = subprocess.run(["bash", str(REPO / "slurm" / "submit.sh"), "--rounds", "2", "tiny", "run_dir=/x/run"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    names = [f"r{k}-{s}" for k in (1, 2) for s in ("rollout", "ref", "train", "finish")]
    assert out.stdout.split("\n")[:-1] == [f"{n} {101 + i}" for i, n in enumerate(names)]
    lines = calls.read_text().splitlines()
    assert len(lines) == 8
    for i, (name, line) in enumerate(zip(names, lines)):
        after = 77 if i == 0 else 100 + i  # the first waits for MIDPO_AFTER, every other for the job before it
        assert f"--dependency=afterok:{after} --kill-on-invalid-dep=yes" in line, line
        assert f"--job-name=midpo-{name} --nodes=2" in line, line
        k, step = name[1:].split("-")
        assert line.endswith(f"{REPO}/slurm/round.sbatch tiny {k} {step} run_dir=/x/run"), line


def test_rounds_needs_a_count():
    out = subprocess.run(["bash", str(REPO / "slurm" / "submit.sh"), "--rounds", "x", "tiny"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "usage: submit.sh --rounds N RECIPE" in out.stderr
