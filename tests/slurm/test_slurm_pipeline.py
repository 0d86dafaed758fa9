"""The whole chain on the local 2-node cluster, with a preemption (SIGUSR1 + requeue) mid-training.

slurm/submit.sh runs prep -> ref -> train (ref and train on 2 nodes x 1 CPU task, gloo). While train is
past step 3, the test does what `#SBATCH --signal=B:USR1@300` does before a time limit:
`scancel --signal=USR1 --batch JOB`. train.sbatch forwards it to the trainer, which checkpoints and
exits 0; the script requeues the job; the restarted job resumes from checkpoints/latest. Its step
losses and exported weights must equal those of an uninterrupted run on the same data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
import torch
from slurm_helpers import CPU_ARGS, REPO, read_log, submit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# the chain has no SFT stage (sft.steps=0: the policy is the embedded default's model); 115 train rows, global batch 16
# -> 7 steps/epoch, 28 steps
OVERRIDES = ["sft.steps=0", "onpolicy.enabled=false", "synth.n_pairs=128", "train.epochs=4"]


def step_losses(run) -> dict[int, float]:
    """step -> loss from train_metrics.jsonl (a resumed run appends; the last record of a step wins)."""
    out = {}
    for line in (run / "logs" / "train_metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def exported(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted((run / "export").glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"no safetensors in {run / 'export'}"
    return tensors


def test_chain_with_requeue_resumes_to_the_uninterrupted_result(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    jobs = submit(slurm_cluster, "tiny", [f"run_dir={run}", *OVERRIDES], tmp_path, time_min=10,
                  MIDPO_MIN_RUNTIME="5")
    logs = {s: tmp_path / f"midpo-{s}-{j}.out" for s, j in jobs.items()}
    for stage in ("prep", "ref"):
        info = slurm_cluster.wait(jobs[stage], timeout=180)
        assert info["JobState"] == "COMPLETED", read_log(logs[stage])
    assert (run / "ref" / "manifest.json").exists()

    # Preempt: once training is past step 3, signal the batch shell as Slurm does before a time limit.
    metrics = run / "logs" / "train_metrics.jsonl"
    train = jobs["train"]

    def past_step_3(info):
        if info["JobState"] != "RUNNING" and info["JobState"] != "PENDING":
            return True
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 3

    info = slurm_cluster.wait(train, timeout=180, until=past_step_3)
    assert info["JobState"] == "RUNNING", read_log(logs["train"])
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(train)], check=True, env=slurm_cluster.env())

    # The job requeues itself; Slurm then holds it (BeginTime, ~2 min): release it early, but safely.
    info = slurm_cluster.wait(train, timeout=120,
                              until=lambda i: int(i["Restarts"]) >= 1 or i["JobState"] in ("COMPLETED", "FAILED"))
    assert int(info["Restarts"]) == 1, (info, read_log(logs["train"]))
    # Slurm's hold exists because the requeue revokes the job's credential on the nodes with a timestamp in
    # whole seconds, and slurmd refuses any credential of the same job that is not strictly newer. A restart
    # launched within the same second as the requeue is refused ("Job N already killed, do not launch batch
    # job"; slurmctld: "Killing non-startable batch JobId=N: Job credential revoked") and ends FAILED without
    # running. So: once the killed allocation is cleaned up (job PENDING, both nodes idle), wait until the
    # clock is past the second in which that was seen (the requeue happened no later), then release.
    for _ in range(120):
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=slurm_cluster.env(), capture_output=True,
                               text=True).stdout.split()
        if slurm_cluster.show(train)["JobState"] == "PENDING" and nodes and all(n == "idle" for n in nodes):
            time.sleep(1.1 - time.time() % 1)
            r = subprocess.run(["scontrol", "update", f"JobId={train}", "StartTime=now"], env=slurm_cluster.env(),
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stdout + r.stderr
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"requeued job {train} never PENDING on idle nodes: {slurm_cluster.show(train)}")
    info = slurm_cluster.wait(train, timeout=240)
    log = read_log(logs["train"])
    assert info["JobState"] == "COMPLETED", log
    assert "SIGUSR1 received" in log and f"requeueing job {train} (restart 1)" in log, log
    assert f"midpo train: job {train} (restart 1)" in log, log
    stopped = re.search(r"checkpointed at step (\d+)", log)
    assert stopped, log
    # The trainer saw the forwarded SIGUSR1 and checkpointed BEFORE the script requeued (not the requeue's SIGTERM).
    assert stopped.start() < log.index(f"requeueing job {train}"), log
    total = max(step_losses(run))
    assert 3 <= int(stopped.group(1)) < total == 28, (stopped.group(0), total)
    assert re.search(rf"resumed from \S*step-0*{stopped.group(1)}\b", log), log

    # The same training, uninterrupted, on a copy of the same data and reference cache.
    ref_run = tmp_path / "uninterrupted"
    for part in ("synth", "data", "ref"):
        shutil.copytree(run / part, ref_run / part)
    job = slurm_cluster.sbatch(["-N", "2", *CPU_ARGS, "--time=10", f"--output={tmp_path}/%x-%j.out",
                                str(REPO / "slurm" / "train.sbatch"), "tiny", f"run_dir={ref_run}", *OVERRIDES])
    info = slurm_cluster.wait(job, timeout=240)
    assert info["JobState"] == "COMPLETED", read_log(tmp_path / f"midpo-train-{job}.out")

    resumed, straight = step_losses(run), step_losses(ref_run)
    assert sorted(resumed) == sorted(straight) == list(range(1, 29))
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step
    a, b = exported(run), exported(ref_run)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
