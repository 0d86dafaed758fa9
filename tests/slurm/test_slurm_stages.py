"""The stage scripts on the local cluster: slurm/prep.sbatch, and slurm/submit.sh's failure chain."""

from __future__ import annotations

import json

import pytest
from slurm_helpers import CPU_ARGS, PREP_CPU_ARGS, REPO, read_log, submit

pytestmark = pytest.mark.slurm


def test_prep_sbatch_builds_the_data_folder(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    job = slurm_cluster.sbatch([*PREP_CPU_ARGS, "--time=3", f"--output={tmp_path}/%x-%j.out",
                                str(REPO / "slurm" / "prep.sbatch"), "tiny", f"run_dir={run}", "synth.n_pairs=64"])
    info = slurm_cluster.wait(job, timeout=150)
    log = read_log(tmp_path / f"midpo-prep-{job}.out")
    assert info["JobState"] == "COMPLETED", log
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    rows = manifest["splits"]["train"]["rows"] + manifest["splits"]["eval"]["rows"]
    assert rows > 0 and rows + manifest["rows"]["rejected"] == 64, manifest
    for split in ("train", "eval"):
        assert (run / "data" / split / "dataset_info.json").exists() or any((run / "data" / split).iterdir())
    assert "midpo prep: finished" in log, log


def test_failing_stage_fails_its_job_and_cancels_the_dependents(slurm_cluster, tmp_path):
    """Bad input paths: prep exits non-zero with a message naming the path; ref and train never start."""
    missing = tmp_path / "no-such-dir"
    jobs = submit(slurm_cluster, "tiny", [f"run_dir={tmp_path / 'run'}", f"data.inputs=[{missing}/pairs.jsonl]",
                                          f"data.tokenizer={missing}/tokenizer"], tmp_path)
    seen: dict[str, list[str]] = {s: [] for s in jobs}
    prep = slurm_cluster.wait(jobs["prep"], timeout=120, seen=seen["prep"])
    log = read_log(tmp_path / f"midpo-prep-{jobs['prep']}.out")
    assert prep["JobState"] == "FAILED", log
    assert prep["ExitCode"].split(":")[0] != "0", prep
    error = [line for line in log.splitlines() if line.startswith("midpo prep: error:")]
    assert error and str(missing) in error[0], log
    for stage in ("ref", "train"):
        info = slurm_cluster.wait(jobs[stage], timeout=60, seen=seen[stage])
        assert info["JobState"] == "CANCELLED", (stage, info)
        assert info["Reason"] == "DependencyNeverSatisfied", (stage, info)
        assert "RUNNING" not in seen[stage], (stage, seen[stage])
        assert not (tmp_path / f"midpo-{stage}-{jobs[stage]}.out").exists()


def test_time_limit_signal_reaches_the_step_and_too_short_a_limit_does_not_requeue(slurm_cluster, tmp_path):
    """train.sbatch's own `--signal=B:USR1@300`, sent by Slurm (not by the test): with --time=5 it is due at
    once. The trap forwards it to every task of the step; since it came before MIDPO_MIN_RUNTIME the job
    fails with a message instead of requeueing itself forever. The stage is a stub interpreter."""
    stub = tmp_path / "stub-python"
    stub.write_text('#!/bin/bash\ntrap \'echo "stub task $SLURM_PROCID: SIGUSR1"; exit 0\' USR1\n'
                    'echo "stub task $SLURM_PROCID: $*"\nfor i in $(seq 240); do sleep 0.5; done\nexit 3\n')
    stub.chmod(0o755)
    job = slurm_cluster.sbatch(["-N", "2", *CPU_ARGS, "--time=5", f"--output={tmp_path}/%x-%j.out",
                                str(REPO / "slurm" / "train.sbatch"), "tiny", f"run_dir={tmp_path / 'run'}"],
                               env=slurm_cluster.env(MIDPO_PYTHON=str(stub)))
    info = slurm_cluster.wait(job, timeout=150)
    log = read_log(tmp_path / f"midpo-train-{job}.out")
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, log)
    assert "stub task 0: SIGUSR1" in log and "stub task 1: SIGUSR1" in log, log
    assert "(< MIDPO_MIN_RUNTIME=60)" in log and "not requeueing" in log, log
