"""Stage edges end to end, through the `midpo` command line on the embedded tiny default (issue #14):

- an empty eval split (data.eval_fraction=0) round-trips prep -> ref -> train: ref writes it as an empty
  dataset that loads, and training runs without evaluation, saying so (it died in load_from_disk);
- pairs longer than the model's positions are refused at `midpo ref` and `midpo train` start, naming the
  numbers and the fix (they used to run on silently);
- `midpo export --out DIR` never replaces a folder midpo did not write.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from train_helpers import ok, read_jsonl, run_midpo

pytestmark = pytest.mark.slow

SMALL = ["sft.steps=0", "onpolicy.enabled=false", "synth.n_pairs=48", "synth.n_eval_prompts=4", "synth.n_onpolicy_prompts=4", "synth.hidden_size=16",
         "synth.intermediate_size=32", "synth.num_layers=1", "synth.num_heads=2", "synth.num_kv_heads=1",
         "data.eval_fraction=0", "train.max_steps=2", "train.micro_batch_size=4", "train.epochs=1",
         "train.eval_every=1", "train.save_every=0", "train.peak_flops=1e11"]


def midpo(*args: str) -> subprocess.CompletedProcess:
    return run_midpo(*args, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """synth -> prep (eval_fraction=0) -> ref -> train (eval requested every step), one process."""
    run_dir = tmp_path_factory.mktemp("edges") / "run"
    common = ["--config", "tiny", f"run_dir={run_dir}", *SMALL]
    ok(midpo("synth", *common))
    ok(midpo("prep", *common))
    ok(midpo("ref", *common))
    train = ok(midpo("train", *common))
    return {"dir": run_dir, "common": common, "train_log": train.stdout + train.stderr}


def test_empty_eval_split_round_trips_and_training_runs_without_evaluation(run):
    from midpo.runtime.cache import open_cache
    from midpo.runtime.prepared import load_split

    run_dir = run["dir"]
    data = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert data["splits"]["eval"]["rows"] == 0 and data["splits"]["train"]["rows"] == 48
    assert len(load_split(run_dir / "data", "eval")) == 0
    assert len(open_cache(run_dir / "ref", run_dir / "data", "eval")) == 0  # an empty dataset, not 0 shards
    assert "the eval split is empty" in run["train_log"] and "training runs without evaluation" in run["train_log"]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["eval_history"] == []
    assert len(read_jsonl(run_dir / "logs" / "train_metrics.jsonl")) == 2
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_pairs_longer_than_the_models_positions_are_refused_at_ref_and_train(run, tmp_path):
    run_dir = run["dir"]
    longest = json.loads((run_dir / "data" / "manifest.json").read_text())["longest_pair_tokens"]
    short = tmp_path / "short_model"  # the same model, told it has fewer positions than the data needs
    shutil.copytree(run_dir / "synth" / "model", short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": longest - 1}))
    want = (f"is {longest} tokens, but the model {short} has max_position_embeddings={longest - 1}. "
            f"Lower data.max_length to at most {longest - 1}")

    # other models are another run's paths (runtime.layout): a run folder of its own, holding this run's data
    # (and, for train, its cache: built from the same reference)
    def other_run(name: str, *subs: str) -> list[str]:
        for sub in subs:
            shutil.copytree(run_dir / sub, tmp_path / name / sub)
        return ["--config", "tiny", f"run_dir={tmp_path / name}", *SMALL]

    ref = midpo("ref", *other_run("r", "data"), f"model.reference={short}")
    assert ref.returncode != 0 and want in ref.stderr, ref.stderr[-3000:]
    assert not (tmp_path / "r" / "ref" / "manifest.json").exists()

    train = midpo("train", *other_run("t", "data", "ref"), f"model.policy={short}",
                  f"model.reference={run_dir / 'synth' / 'model'}")
    assert train.returncode == 1 and want in train.stderr, train.stderr[-3000:]


def test_export_never_replaces_a_folder_midpo_did_not_write(run, tmp_path):
    user = tmp_path / "important"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    proc = midpo("export", *run["common"], "--out", str(user))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"output folder {user} exists and was not written by midpo" in proc.stderr
    assert [p.name for p in user.iterdir()] == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".important.*"))
