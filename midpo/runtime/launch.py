"""Process lifetime under `--nproc N` (torchrun on one machine): a killed launcher takes its workers with it.

    midpo train --nproc N        # `midpo` (the launcher) -> torchrun's agent (this module) -> N workers

torchrun starts every worker in a session of its own, so a signal to the launcher's process group never
reaches them, and a launcher killed with SIGKILL left the agent and the workers running (killed during start-up,
the workers waited 23 minutes for a rendezvous store that had gone). Each process is tied to the one above it:
- launcher -> agent: `launch_torchrun` (below) starts the agent in a session of its own and forwards
  SIGTERM/SIGINT/SIGHUP to it (`forward_signals`); the agent asks the kernel for SIGTERM when the launcher dies
  (PR_SET_PDEATHSIG: a SIGKILL of the launcher cannot skip it), and on SIGTERM torchrun stops its workers
  (SIGTERM, then SIGKILL after 30 s).
- agent -> workers: each worker asks for SIGKILL when the agent dies (`worker_dies_with_agent`, called by
  `stage_cli`); the agent passes its pid down, so a worker whose agent died while it was still
  starting (before it could ask) goes at once.
The agent part imports only the standard library, so the agent ties itself to the launcher before anything slow.
Linux only (prctl); elsewhere the forwarding still works and the death signals are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
AGENT_PID_ENV = "MIDPO_TORCHRUN_AGENT_PID"  # set by the agent for its workers
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def die_with_parent(sig: int, parent: int | None = None) -> bool:
    """Have the kernel send `sig` to this process when its parent dies (PR_SET_PDEATHSIG). `parent`: the pid the
    parent must have; if it is gone already (this process was re-parented before it asked), take `sig` now.
    The signal follows the parent THREAD that started this process: launcher and agent start theirs from the
    main thread. False where unsupported (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def worker_dies_with_agent() -> None:
    """In a worker started by torchrun: SIGKILL when the agent dies (its ranks would wait for a store and peers
    that are gone; nothing is left to save). Checked against the agent's pid when `agent_main` started it."""
    agent = os.environ.pop(AGENT_PID_ENV, None)  # popped: the worker's own children have another parent
    if agent is not None:
        die_with_parent(signal.SIGKILL, int(agent))
    elif "TORCHELASTIC_RUN_ID" in os.environ:  # a plain `torchrun` agent
        die_with_parent(signal.SIGKILL)


@contextlib.contextmanager
def forward_signals(pgid: int, signals: tuple[signal.Signals, ...] = FORWARDED) -> Iterator[None]:
    """While the block runs, SIGTERM/SIGINT/SIGHUP to this process go to process group `pgid` instead (the
    agent's: it then stops its workers and exits, and the caller's wait returns its exit code)."""
    def forward(signum, frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)

    old = {}
    try:
        for s in signals:
            old[s] = signal.signal(s, forward)
    except ValueError:  # not the main thread: no handlers; the death signals still tie the processes together
        pass
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def agent_command(launcher_pid: int, torchrun_args: list[str]) -> list[str]:
    """The command line that runs torchrun's agent tied to `launcher_pid`."""
    return [sys.executable, "-m", "midpo.runtime.launch", str(launcher_pid), *torchrun_args]


def agent_main(argv: list[str]) -> int:
    """`python -m midpo.runtime.launch LAUNCHER_PID TORCHRUN_ARGS...`: torchrun's agent, in this process. A worker that
    fails has said why (`midpo <stage>: error: ...`, or its traceback): exit with its code, without torchrun's own
    traceback of ChildFailedError; a stop signal exits 128 + its number."""
    die_with_parent(signal.SIGTERM, int(argv[0]))  # SIGTERM: torchrun then stops its workers
    os.environ[AGENT_PID_ENV] = str(os.getpid())  # the workers inherit it
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv[1:]))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code if code < 0 else 1  # -N: killed by signal N
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


# ---------------------------------------------------------------------------------------------
# launching a stage: `midpo <stage> --nproc N` and `python -m midpo.stages.<stage>` (what torchrun/srun run)


def launch_torchrun(module: str, argv: list[str], nproc: int) -> int:
    """Re-run `module` under torchrun with nproc processes on this machine; its exit code. The agent runs in a
    session of its own, gets this process's SIGTERM/SIGINT/SIGHUP and dies with it even on SIGKILL; its workers
    die with the agent (see the module docstring)."""
    import subprocess

    cmd = agent_command(os.getpid(), ["--standalone", f"--nproc_per_node={nproc}", "-m", module, *argv])
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, start_new_session=True)
    with forward_signals(proc.pid):
        code = proc.wait()
    return 128 - code if code < 0 else code  # -N: the agent died of signal N (the shell's 128 + N)


def under_launcher() -> bool:
    """This process is one rank of a launched group (torchrun, deepspeed, srun): never spawn another."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def relaunch_argv(args, *, splits: bool = False) -> list[str]:
    """The stage's own arguments again, for its torchrun workers: recipe, --force, [--split ...], overrides."""
    argv = [f"--config={args.config}"] if getattr(args, "config", None) else []
    if splits:
        argv += [f"--split={s}" for s in getattr(args, "split", None) or []]
    argv += ["--force"] if getattr(args, "force", False) else []
    return argv + list(getattr(args, "overrides", []))


def run_or_spawn(args, module: str, run_here, *, splits: bool = False) -> int:
    """`run` of a multi-process stage: with `--nproc N > 1` (and this process not already a rank) torchrun with N
    processes on this machine runs `module` with the same arguments; else `run_here(cfg)` runs the stage here."""
    from midpo.config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "nproc", 1) > 1 and not under_launcher():
        return launch_torchrun(module, relaunch_argv(args, splits=splits), args.nproc)
    run_here(cfg)
    return 0


def run_stage(stage: str, run) -> int:
    """Run a stage: its exit code, or 1 after printing a user error as one line (no traceback). Under torchrun
    every rank that fails prints its line, prefixed with its rank: an error seen on one rank only is not lost."""
    from midpo.errors import MidpoError

    try:
        return int(run() or 0)
    except MidpoError as e:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        where = f"[rank {os.environ.get('RANK', '?')}] " if world > 1 else ""
        # the whole line in one write (print() writes the text and the newline apart): ranks sharing a stderr
        # pipe must not interleave mid-line
        sys.stderr.write(f"midpo {stage}: error: {where}{e}\n")
        sys.stderr.flush()
        return 1


# Appended to every stage's --help: the ~100 config keys are too many for flags, so each stage points to where they
# are documented (`midpo config show`, from the fields' help in midpo/config.py) and to the override syntax.
CONFIG_EPILOG = (
    "Config keys: `midpo config show RECIPE` prints the resolved config with each key's help (`midpo config list`: "
    "the shipped recipes). Override any key on the command line as key.sub=value, e.g. train.lr=1e-5 "
    "loss.prior=simpo; precedence: defaults < recipe < overrides."
)


class _ParagraphsFormatter(argparse.HelpFormatter):
    """argparse's default formatter, except that blank lines in a description or epilog separate paragraphs (the
    default joins them all into one)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # super() with its arguments: the zero-argument form does not work inside a generator expression
        return "\n\n".join(super(_ParagraphsFormatter, self)._fill_text(p, width, indent)
                             for p in re.split(r"\n\s*\n", text.strip()))


def add_config_epilog(parser: argparse.ArgumentParser) -> None:
    """Point a stage's --help to `midpo config show` and the override syntax (after the stage's own epilog)."""
    parser.epilog = f"{parser.epilog}\n\n{CONFIG_EPILOG}" if parser.epilog else CONFIG_EPILOG
    parser.formatter_class = _ParagraphsFormatter


def stage_cli(stage: str, add_arguments, run, argv: list[str] | None = None) -> int:
    """`python -m midpo.stages.<stage> ARGS` (what torchrun, deepspeed and srun start on every rank): the same
    arguments and overrides as `midpo <stage>`, the same error style, logs prefixed with the rank."""
    from midpo.config import split_overrides
    from midpo.runtime.dist import env_from_slurm

    worker_dies_with_agent()  # under torchrun: never outlive the agent
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(prog=f"midpo {stage}")
    add_arguments(parser)
    add_config_epilog(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(rest)
    env_from_slurm()  # under srun, RANK comes from SLURM_PROCID: map it before naming the rank in logs
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s [rank {os.environ.get('RANK', '0')}] %(name)s: %(message)s")
    args.overrides = overrides
    return run_stage(stage, lambda: run(args))


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
