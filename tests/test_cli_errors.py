"""One error style for every stage (midpo.cli.run_stage): a user error (a MidpoError) is one line on stderr,
`midpo <stage>: error: <message>`, exit code 1, no traceback; under torchrun each failing rank prints its line
with its rank, and torchrun adds no traceback of its own; usage errors exit 2; a bug keeps its traceback.

train and export run in this process through `midpo.cli.main` (train on the session's process group, which
it leaves alone); ref, torchrun and the bug run as real `midpo` processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import (  # noqa: F401
    REPO,
    clean_env,
    launcher_env_dropped,
    make_model,
    make_rows,
    process_group,
    recipe_text,
    write_data,
)

from midpo.cli import main

pytestmark = pytest.mark.usefixtures("process_group", "launcher_env_dropped")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A model, and a run folder whose data has a reference cache built for other inputs (a manifest only)."""
    from midpo.runtime.models import tokenizer_fingerprint as tokenizer_fp

    root = tmp_path_factory.mktemp("cli_errors")
    model = make_model(root / "model")
    write_data(root / "run" / "data", {"train": make_rows(8, 1), "eval": make_rows(4, 2)}, tokenizer_fp(model))
    (root / "run" / "ref").mkdir()
    (root / "run" / "ref" / "manifest.json").write_text(json.dumps(
        {"data_fingerprint": "other", "tokenizer_fingerprint": "other", "reference_fingerprint": "other",
         "splits": {"train": {"rows": 8}, "eval": {"rows": 4}}}))
    return root


def recipe(root: Path, name: str, run: str = "run") -> str:
    path = root / f"{name}.yaml"
    path.write_text(recipe_text(root / run, root / "model"))
    return str(path)


def _one_error_line(err: str, stage: str, *needles: str) -> None:
    lines = [x for x in err.splitlines() if x.startswith(f"midpo {stage}: error: ")]
    assert len(lines) == 1, err[-3000:]
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, run, needles", [
    (["train", "train.bogus=1"], "run", ["unknown config key(s) train.bogus"]),  # a key the recipe may not have
    (["train", "model.policy=null"], "empty", ["model.policy is not set"]),  # a key it must have
    (["train"], "empty", ["data/train not found", "midpo prep"]),  # no data folder
    (["train"], "run", ["was built for other inputs", "data fingerprint differs", "midpo ref"]),  # cache mismatch
    (["export", "--checkpoint", "{root}/run/checkpoints/step-0000009"], "run", ["does not exist"]),
    (["export"], "run", ["no checkpoint", "train first"]),
])
def test_user_errors_are_one_line_without_traceback(root, capsys, argv, run, needles):
    cmd = [a.format(root=root) for a in argv]
    code = main([cmd[0], "--config", recipe(root, "r", run), *cmd[1:]])
    assert code == 1
    _one_error_line(capsys.readouterr().err, cmd[0], *needles)


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export"])  # --config is required
    assert e.value.code == 2
    assert "required: --config" in capsys.readouterr().err


def _midpo(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "midpo.cli", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ref_user_error_in_a_real_process(root):
    """A missing reference model folder (model.policy): one line, exit 1."""
    proc = _midpo("ref", "--config", recipe(root, "r", "run"), f"model.policy={root}/nowhere")
    assert proc.returncode == 1, proc.stderr[-3000:]
    _one_error_line(proc.stderr, "ref", f"{root}/nowhere")


def test_user_error_under_torchrun_names_each_rank(root):
    """`midpo ref --nproc 2` without data: each rank prints its line with its rank; exit 1; no traceback from the
    workers or from torchrun's agent."""
    proc = _midpo("ref", "--config", recipe(root, "r_empty", "empty"), "--nproc", "2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = sorted(x for x in proc.stderr.splitlines() if x.startswith("midpo ref: error: "))
    assert [x.split("]")[0] for x in lines] == ["midpo ref: error: [rank 0", "midpo ref: error: [rank 1"], lines
    assert all("no manifest.json" in x for x in lines)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_a_bug_keeps_its_traceback(root):
    """Not a MidpoError (a ZeroDivisionError raised inside the export stage): the traceback is printed."""
    bug = ("import sys, midpo.runtime.checkpoint as c; c.latest_checkpoint = lambda root: 1 / 0; "
           "from midpo.cli import main; sys.exit(main(['export', *sys.argv[1:]]))")
    proc = _midpo("--config", recipe(root, "r", "run"), code=bug)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "ZeroDivisionError" in proc.stderr
    assert "midpo export: error" not in proc.stderr
