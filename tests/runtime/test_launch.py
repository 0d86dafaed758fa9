"""A killed `midpo ref --nproc 2` launcher takes torchrun's agent and both workers with it (midpo.runtime.launch).

Killed during start-up, as in the reported hang: the launcher is killed as soon as the agent has started both
workers. Cases: SIGKILL of the launcher (the agent gets SIGTERM from the kernel and stops its workers), SIGTERM
of the launcher (forwarded to the agent), and SIGKILL of the launcher and the agent together (each worker dies
with the agent: at once if it has set its death signal, else when its start-up reaches `reference.cli`). The
data is large enough that the job would outlive the deadlines on its own (the old launcher left it running).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import REPO, clean_env, descendants, kill_tree, make_model, make_rows, recipe_text, write_data

pytestmark = pytest.mark.distributed

GONE_S = 10.0  # launcher killed or stopped: the agent stops its workers (measured: ~1 s)
GONE_WITH_AGENT_S = 60.0  # agent killed too: a worker still importing goes when it reaches reference.cli


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    from midpo.runtime.models import tokenizer_fingerprint as tokenizer_fp

    root = tmp_path_factory.mktemp("launch")
    model = make_model(root / "model")
    write_data(root / "run" / "data", {"train": make_rows(6000, 1), "eval": make_rows(10, 2)}, tokenizer_fp(model))
    (root / "recipe.yaml").write_text(recipe_text(root / "run", model))
    return root / "recipe.yaml"


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Running (a zombie has ended: only its exit status waits to be collected)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _start_until_workers(recipe: Path, log: Path) -> tuple[subprocess.Popen, int, list[int]]:
    """`midpo ref --nproc 2` in a session of its own; returns once the agent has started both workers."""
    cmd = [sys.executable, "-m", "midpo.cli", "ref", "--config", str(recipe), "--nproc", "2"]
    proc = subprocess.Popen(cmd, env=clean_env(), cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, f"launcher exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        agents = [p for p in descendants(proc.pid) if _ppid(p) == proc.pid]
        workers = descendants(agents[0]) if agents else []
        if len(workers) >= 2:
            return proc, agents[0], workers
        time.sleep(0.05)
    kill_tree(proc.pid)
    pytest.fail("torchrun did not start 2 workers")


@pytest.mark.parametrize("how", ["sigkill_launcher", "sigterm_launcher", "sigkill_launcher_and_agent"])
def test_killed_launcher_takes_agent_and_workers(recipe, tmp_path, how):
    proc, agent, workers = _start_until_workers(recipe, tmp_path / "log")
    tree = [agent, *workers]
    try:
        t0 = time.time()
        os.kill(proc.pid, signal.SIGTERM if how == "sigterm_launcher" else signal.SIGKILL)
        if how == "sigkill_launcher_and_agent":
            os.kill(agent, signal.SIGKILL)
        limit = GONE_WITH_AGENT_S if how == "sigkill_launcher_and_agent" else GONE_S
        while time.time() - t0 < limit and any(_alive(p) for p in tree):
            time.sleep(0.05)
        left = [p for p in tree if _alive(p)]
        assert not left, f"{how}: still running after {limit:.0f} s: {left} (agent {agent}, workers {workers})"
        code = proc.wait(timeout=30)
        if how == "sigterm_launcher":
            assert code == 128 + signal.SIGTERM  # the agent's exit code: stopped by the forwarded SIGTERM
        print(f"{how}: agent and workers gone {time.time() - t0:.2f} s after the kill")
    finally:
        for p in [proc.pid, *tree]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def test_a_process_whose_parent_is_already_gone_takes_its_death_signal_at_once():
    """The race `die_with_parent` closes: the parent died before the child asked for its death signal (the child
    was re-parented): the child must not run on. Here the expected parent pid is not the real one."""
    code = "import os, signal; from midpo.runtime.launch import die_with_parent; die_with_parent(signal.SIGTERM, -1)"
    proc = subprocess.run([sys.executable, "-c", code + "; print('still running')"], env=clean_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM and "still running" not in proc.stdout, proc.stderr
    ok = "import os, signal; from midpo.runtime.launch import die_with_parent; assert die_with_parent(signal.SIGTERM, "
    proc = subprocess.run([sys.executable, "-c", ok + "os.getppid()); print('still running')"], env=clean_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "still running" in proc.stdout, proc.stderr
