"""`midpo run` end to end at reduced size (slow tier): every stage's outputs exist and the summary
carries the before/after metrics and stage timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# a 30-step SFT model rarely answers right, so the on-policy stage falls back to the solution as chosen
SMALL = ["synth.n_pairs=200", "synth.n_eval_prompts=20", "synth.n_onpolicy_prompts=60", "sft.steps=30",
         "onpolicy.samples=2", "onpolicy.chosen=sample_or_gold", "train.max_steps=4", "train.micro_batch_size=4",
         "train.probe_rows=4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("midpo_run") / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "midpo.cli", "run", "--config", "tiny", f"run_dir={out}", *SMALL,
           "--eval-prompts", "20"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"midpo run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    (out / "_stdout.txt").write_text(proc.stdout)
    return out


def test_every_stage_wrote_its_outputs(run_dir: Path) -> None:
    synth = run_dir / "synth"
    for name in ("pairs.jsonl", "eval_prompts.jsonl", "synth_manifest.json"):
        assert (synth / name).is_file(), name
    assert (synth / "model" / "config.json").is_file() and (synth / "tokenizer").is_dir()
    assert len((synth / "pairs.jsonl").read_text().splitlines()) == 200

    # SFT reads the synthetic pairs; ref and train read the on-policy pairs sampled from the SFT model
    sft_data = json.loads((run_dir / "sft_data" / "manifest.json").read_text())
    assert sft_data["rows"]["read"] == 200
    onpolicy = json.loads((run_dir / "onpolicy" / "onpolicy_manifest.json").read_text())
    pairs = (run_dir / "onpolicy" / "pairs.jsonl").read_text().splitlines()
    assert onpolicy["counts"]["prompts"] == 60 and onpolicy["counts"]["pairs"] == len(pairs) > 0
    assert onpolicy["model"] == str(run_dir / "sft")
    data = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert data["fingerprint"] and data["rows"]["read"] == len(pairs)
    assert (run_dir / "data" / "train").is_dir() and (run_dir / "data" / "eval").is_dir()

    sft = json.loads((run_dir / "sft" / "sft_manifest.json").read_text())
    assert sft["steps"] == 30 and sft["final_loss"] < sft["first_loss"]
    assert (run_dir / "sft" / "model.safetensors").is_file()

    ref = json.loads((run_dir / "ref" / "manifest.json").read_text())
    assert ref  # fingerprints of data, tokenizer and reference weights
    assert (run_dir / "ref" / "train").is_dir()

    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["eval_history"]
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    assert (run_dir / "logs" / "train_metrics.jsonl").stat().st_size > 0


def test_export_loads_with_transformers(run_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "export"))
    tok = AutoTokenizer.from_pretrained(str(run_dir / "export"))
    ids = tok.apply_chat_template([{"role": "user", "content": "sort: 3 1 2"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()


def test_summary_has_before_after_metrics_and_timings(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    for side in ("reference", "policy"):
        m = summary[side]
        assert m["n"] == 20
        for mode in ("greedy", "sampled"):
            assert 0.0 <= m[f"{mode}/accuracy"] <= 1.0
            assert len(m[f"{mode}/scores"]) == 20
            assert set(m[f"{mode}/by_task"]) <= {"sort", "reverse", "dedupe"}
    for mode in ("greedy", "sampled"):
        d = summary["paired"][mode]
        assert d["diff"] == pytest.approx(summary["policy"][f"{mode}/accuracy"] - summary["reference"][f"{mode}/accuracy"])
        assert isinstance(d["significant"], bool)
    assert "rewards/accuracies" in summary["train_eval"]
    for stage in ("synth", "prep", "sft", "sample", "prep_onpolicy", "ref", "train", "eval", "total"):
        assert summary["seconds"][stage] >= 0
    out = (run_dir / "_stdout.txt").read_text()
    assert "midpo run summary" in out and "task accuracy, greedy" in out and "stage seconds" in out
