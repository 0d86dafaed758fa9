"""The stages run by hand, one process each (as Slurm runs them), after `midpo sft` on the tiny recipe: they
agree on every path (midpo.runtime.layout). Before the layout, `midpo ref` scored `model.reference or
model.policy or synth/model` while `midpo train` started from `<run_dir>/sft`: the cache belonged to another
model than the one trained."""

from __future__ import annotations

import json
import subprocess

import pytest
from train_helpers import ok, run_midpo

pytestmark = pytest.mark.slow

SMALL = ["synth.n_pairs=96", "synth.n_eval_prompts=4", "synth.hidden_size=16", "synth.intermediate_size=32",
         "synth.num_layers=1", "synth.num_heads=2", "synth.num_kv_heads=1", "sft.steps=4", "sft.batch_size=8",
         "onpolicy.enabled=false", "data.eval_fraction=0.1", "train.max_steps=2", "train.micro_batch_size=4",
         "train.peak_flops=1e11"]


def midpo(*args: str) -> subprocess.CompletedProcess:
    return run_midpo(*args, timeout=300)


@pytest.fixture(scope="module")
def by_hand(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("by_hand") / "run"
    common = ["--config", "tiny", f"run_dir={run}", *SMALL]
    logs = {stage: ok(midpo(stage, *common)) for stage in ("synth", "prep", "sft", "ref", "train")}
    logs["export"] = ok(midpo("export", *common, "--out", str(run.parent / "export_cli")))
    return {"run": run, "common": common, "logs": logs}


def test_every_stage_uses_the_paths_the_layout_resolves(by_hand):
    import yaml

    from midpo.config import load_config
    from midpo.runtime.layout import RunLayout
    from midpo.runtime.models import model_fingerprint, tokenizer_fingerprint

    run = by_hand["run"]
    cfg = load_config("tiny", [f"run_dir={run}", *SMALL])
    layout = RunLayout.resolve(cfg)
    assert (layout.policy, layout.reference, layout.tokenizer) == (run / "sft", run / "sft", run / "synth" / "model")
    recorded = yaml.safe_load((run / "config.yaml").read_text())["layout"]
    assert recorded == layout.to_dict() and recorded["policy"] == "<run_dir>/sft"

    sft = json.loads((run / "sft" / "sft_manifest.json").read_text())
    assert sft["init"] == str(run / "synth" / "model")  # SFT started from the initial model ...
    data = json.loads((run / "data" / "manifest.json").read_text())
    assert data["tokenizer"]["fingerprint"] == tokenizer_fingerprint(run / "synth" / "model")  # ... prep's tokenizer
    ref = json.loads((run / "ref" / "manifest.json").read_text())
    assert ref["reference_path"] == str(run / "sft")  # the cache scored the SFT model ...
    assert ref["reference_fingerprint"] == model_fingerprint(run / "sft")
    state = json.loads((run / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["inputs"]["reference"] == model_fingerprint(run / "sft")
    log = by_hand["logs"]["train"].stderr
    assert "start-of-run probe passed" in log  # ... and training started from it (policy == reference == cache)
    for folder in (run / "export", run.parent / "export_cli"):  # the trained policy, with prep's tokenizer
        assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 1
        assert tokenizer_fingerprint(folder) == tokenizer_fingerprint(run / "synth" / "model")


def test_a_stage_whose_recipe_resolves_other_paths_is_refused(by_hand):
    run = by_hand["run"]
    before = (run / "config.yaml").read_bytes()
    proc = midpo("train", *by_hand["common"], f"model.reference={run / 'synth' / 'model'}")
    assert proc.returncode == 1
    assert "records this run's paths" in proc.stderr and "reference: '<run_dir>/sft' ->" in proc.stderr, proc.stderr
    assert (run / "config.yaml").read_bytes() == before
