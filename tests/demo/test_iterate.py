"""`midpo iterate` (midpo.demo.iterate, midpo.demo.rollout): implicit rewards against an independent forward of two
models, replay proportions, round 2's reference = round 1's export (fingerprints), and a run killed during round 2's
generation and again during its training that, rerun, ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, clean_env, export_weights, kill_tree, ok, run_midpo

from midpo.config import load_config
from midpo.demo import iterate as it
from midpo.runtime.models import model_fingerprint

FAULTS = Path(__file__).resolve().parents[1] / "support" / "faults.py"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The embedded default's tiny model (the policy) and a perturbed copy (pi_{t-1}, so implicit rewards differ)."""
    from safetensors.torch import load_file, save_file

    from midpo.config import SynthConfig
    from midpo.demo.synthetic import build_tiny_default

    root = tmp_path_factory.mktemp("iterate")
    cfg = SynthConfig(n_pairs=60, n_eval_prompts=8, n_onpolicy_prompts=12, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=2, num_kv_heads=1, max_position_embeddings=256, max_items=3)
    paths = build_tiny_default(root / "synth", cfg)
    ref = root / "prev"
    shutil.copytree(paths["model"], ref)
    g = torch.Generator().manual_seed(1)
    for f in ref.glob("*.safetensors"):
        sd = load_file(str(f))
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()}, str(f),
                  metadata={"format": "pt"})
    return {"root": root, "policy": Path(paths["model"]), "reference": ref, "pairs": Path(paths["pairs"]),
            "prompts": Path(paths["onpolicy_prompts"])}


def recipe(models, run_dir: Path) -> Path:
    text = f"""run_dir: {run_dir}
seed: 0
data:
  inputs: [{models['pairs']}]
  max_prompt_tokens: 48
  max_length: 96
  eval_fraction: 0.0
model:
  policy: {models['policy']}
  reference: {models['reference']}
  dtype: fp32
  attn_implementation: sdpa
loss:
  prior: dice
  beta: 0.1
train:
  ds_config: zero0_cpu_fp32
  micro_batch_size: 4
  max_steps: 4
  lr: 1.0e-3
  packing: false
  save_every: 1
  peak_flops: 1.0e11
  probe_rows: 0
iterate:
  start: policy
  labeller: implicit_reward
  prompts: {models['prompts']}
  samples: 3
  max_new_tokens: 12
  prompts_per_round: 8
  chunk_prompts: 2
  batch_size: 4
  length_alpha: 0.01
  replay_fraction: 0.25
  replay_inputs: [{models['pairs']}]
"""
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(text)
    return path


def independent_logp(model_dir: Path, prompt: str, answer: str) -> float:
    """Sum of log pi(y_t | x, y_<t) over the answer's tokens and its EOS: the chat template, a plain forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    user = [{"role": "user", "content": prompt}]
    p = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=False)
    assert full[: len(p)] == p and full[-1] == tok.eos_token_id
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([full])).logits[0].double().log_softmax(-1)
    return float(sum(logp[t - 1, full[t]] for t in range(len(p), len(full))))


def test_implicit_rewards_equal_an_independent_forward_of_both_models(models, tmp_path) -> None:
    from midpo.demo.rollout import Labeller
    from midpo.runtime.models import load_model

    cfg = load_config(recipe(models, tmp_path / "run"), [f"iterate.implicit_reference={models['reference']}"])
    records = [{"prompt": "sort: 3 1 2", "task": "sort", "kind": "numbers", "items": ["3", "1", "2"]},
               {"prompt": "reverse: kiwi fig", "task": "reverse", "kind": "words", "items": ["kiwi", "fig"]}]
    answers = [["1 2 3", "3 2 1 1 2", ""], ["fig kiwi", "kiwi"]]
    lab = Labeller(cfg, load_model(models["policy"], cfg.model), models["policy"])
    scored = lab.score(records, answers)
    assert scored[0][2] == {"text": "", "skip": "empty"}  # no tokens: no score, never a side of a pair
    n = 0
    for rec, samples in zip(records, scored):
        for s in samples:
            if "score" not in s:
                continue
            pol = independent_logp(models["policy"], rec["prompt"], s["text"])
            ref = independent_logp(models["reference"], rec["prompt"], s["text"])
            assert s["logp"] == pytest.approx(pol, abs=1e-4) and s["ref_logp"] == pytest.approx(ref, abs=1e-4)
            assert s["score"] == s["implicit"] == pytest.approx(0.1 * (pol - ref), abs=1e-5)
            n += 1
    assert n == 4
    # the checker labels by the task; the implicit reward is still recorded, for the round's statistics
    cfg = load_config(recipe(models, tmp_path / "run"), [f"iterate.implicit_reference={models['reference']}",
                                                          "iterate.labeller=checker"])
    checked = Labeller(cfg, lab.policy, models["policy"]).score(records, answers)
    assert [[s.get("score") for s in row] for row in checked] == [[1.0, 0.0, None], [1.0, 0.0]]
    assert [[s.get("implicit") for s in row] for row in checked] == [[s.get("implicit") for s in row] for row in scored]


def test_replay_proportions_hold() -> None:
    onpolicy = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(37)]
    offline = [{"prompt": f"o{i}", "chosen": "c", "rejected": "d"} for i in range(500)]
    for fraction in (0.0, 0.2, 0.25, 0.5):
        mixed = it.mix_replay(onpolicy, offline, fraction, seed=3)
        n_off = sum(1 for r in mixed if r.get("error_kind") == "replay")
        assert mixed[: len(onpolicy)] == onpolicy and len(mixed) == len(onpolicy) + n_off
        assert abs(n_off / len(mixed) - fraction) <= 1 / len(mixed)  # the nearest count to the fraction
        assert len({r["prompt"] for r in mixed[len(onpolicy):]}) == n_off  # drawn without replacement
        assert it.mix_replay(onpolicy, offline, fraction, seed=3) == mixed  # seeded


def test_select_pairs_counts_every_prompt() -> None:
    rows = [{"prompt": "a", "samples": [{"text": "x", "score": 1.0, "length": 2}, {"text": "y", "score": 0.0, "length": 2}]},
            {"prompt": "b", "samples": [{"text": "x", "score": 0.0, "length": 2}, {"text": "z", "score": 0.0, "length": 2}]},
            {"prompt": "c", "samples": [{"text": "", "skip": "empty"}, {"text": "y", "score": 0.0, "length": 2}]}]
    pairs, stats = it.select_pairs(rows, alpha=0.0, min_margin=0.0)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("a", "x", "y")]
    c = stats["counts"]
    assert c["prompts"] == 3 and c["pairs_onpolicy"] == 1 and c["dropped_tie"] == 1 and c["dropped_too_few_samples"] == 1
    assert c["samples_empty"] == 1 and stats["means"]["chosen/score"] == 1.0


def test_round_prompts_take_blocks() -> None:
    lines = [str(i) for i in range(10)]
    assert it.round_prompts(lines, 1, 4) == ["0", "1", "2", "3"]
    assert it.round_prompts(lines, 3, 4) == ["8", "9", "0", "1"]
    assert it.round_prompts(lines, 2, 0) == lines


@pytest.fixture(scope="module")
def uninterrupted(models):
    run = models["root"] / "a"
    ok(run_midpo("iterate", "--config", str(recipe(models, run)), "--rounds", "2", timeout=400))
    return run


def test_round_two_is_trained_against_round_one_export(uninterrupted, models) -> None:
    r1 = json.loads((uninterrupted / "rounds" / "r1" / "round.json").read_text())
    r2 = json.loads((uninterrupted / "rounds" / "r2" / "round.json").read_text())
    exported = model_fingerprint(uninterrupted / "rounds" / "r1" / "export")
    assert r1["export_fingerprint"] == exported == r2["reference_fingerprint"]
    ref_manifest = json.loads((uninterrupted / "rounds" / "r2" / "ref" / "manifest.json").read_text())
    assert ref_manifest["reference_fingerprint"] == exported  # the cache really scored pi_1
    # the implicit reward divides by pi_{t-1}: the run's reference in round 1, round 1's policy in round 2
    roll = [json.loads((uninterrupted / "rounds" / f"r{k}" / "rollout" / "manifest.json").read_text()) for k in (1, 2)]
    assert roll[0]["key"]["policy"] == model_fingerprint(models["policy"])
    assert roll[0]["key"]["reference"] == model_fingerprint(models["reference"])
    assert roll[1]["key"]["policy"] == exported and roll[1]["key"]["reference"] == model_fingerprint(models["policy"])
    for r in (r1, r2):
        c = r["selection"]["counts"]
        assert c["prompts"] == 8 and c["pairs_onpolicy"] > 0
        assert c["pairs_replay"] == round(c["pairs_onpolicy"] * 0.25 / 0.75)
    assert (uninterrupted / "rounds" / "summary.json").exists()
    assert list((uninterrupted / "tensorboard" / "iterate").glob("events.*"))


def test_two_process_rollout_writes_the_one_process_samples(uninterrupted, models) -> None:
    """Round 1's rollout again on 2 processes (each answers every other prompt of a chunk, in batches of other
    rows): the same answers per prompt as the 1-process run, and the same scores (fp32 forward over other
    batches: 1e-5)."""
    r1 = uninterrupted / "rounds" / "r1"
    out = models["root"] / "two-proc" / "r1"  # the round folder name seeds the samples
    ok(subprocess.run([sys.executable, "-m", "midpo.demo.rollout", "--config", str(r1 / "recipe.yaml"), "--nproc", "2",
                       f"run_dir={out}"], env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300))
    read = lambda d: [json.loads(x) for x in (d / "rollout" / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    one, two = read(r1), read(out)
    assert [r["index"] for r in one] == [r["index"] for r in two] == list(range(8))
    for a, b in zip(one, two, strict=True):
        assert [s["text"] for s in a["samples"]] == [s["text"] for s in b["samples"]]
        for x, y in zip(a["samples"], b["samples"], strict=True):
            assert ("score" in x) == ("score" in y) and x.get("score", 0.0) == pytest.approx(y.get("score", 0.0), abs=1e-5)
    assert len({s["text"] for r in one for s in r["samples"]}) > 8  # it sampled: answers differ


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=clean_env(), cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_when(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 300) -> None:
    """Wait until `ready()` (the run paused itself at a fault), then SIGKILL its whole tree: a real crash."""
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the run exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
            if time.time() > deadline:
                pytest.fail(f"no {what} within {timeout}s")
            time.sleep(0.2)
        time.sleep(0.3)
    finally:
        kill_tree(proc.pid)
        proc.wait()


def test_killed_during_round_two_generation_and_training_ends_as_uninterrupted(uninterrupted, models) -> None:
    run = models["root"] / "b"
    shutil.copytree(uninterrupted / "rounds" / "r1", run / "rounds" / "r1")  # round 1 done (a copied run folder)
    cfg = recipe(models, run)
    r2 = run / "rounds" / "r2"
    args = ["--config", str(cfg), "--rounds", "2"]
    faults = [sys.executable, str(FAULTS), "iterate", "--round", "2"]

    log1 = run / "kill1.log"
    _kill_when(_start(faults + ["--pause-after-chunks", "1", "--", *args], log1), log1,
               lambda: "pausing after 1 chunks" in log1.read_text(), "a paused rollout")
    assert len(list((r2 / "rollout" / ".work").glob("chunk-*.jsonl"))) == 1
    assert not (r2 / "rollout" / "manifest.json").exists()

    log2 = run / "kill2.log"
    _kill_when(_start(faults + ["--pause-after-step", "2", "--", *args], log2), log2,
               lambda: "pausing after step 2" in log2.read_text(), "a paused training step")
    text = log2.read_text()
    assert "round 1 is done" in text and "rollout: resuming, 1/4 chunks already done" in text
    assert not (r2 / "round.json").exists() and (r2 / "checkpoints" / "latest").exists()

    done = ok(run_midpo("iterate", *args, timeout=400))
    assert "resum" in (done.stdout + done.stderr).lower()
    want = export_weights(uninterrupted / "rounds" / "r2" / "export")
    got = export_weights(r2 / "export")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    a = json.loads((uninterrupted / "rounds" / "r2" / "round.json").read_text())
    b = json.loads((r2 / "round.json").read_text())
    assert a["selection"] == b["selection"] and a["rollout_fingerprint"] == b["rollout_fingerprint"]


def test_reward_model_scores_equal_its_forward_on_each_text(models, tmp_path) -> None:
    """The reward_model labeller's batched (padded) scores equal the model's first logit on each text alone."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from midpo.demo.rollout import Labeller
    from midpo.runtime.models import load_model

    tok = AutoTokenizer.from_pretrained(models["policy"])
    conf = AutoConfig.from_pretrained(models["policy"], num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_config(conf).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    cfg = load_config(recipe(models, tmp_path / "run"), ["iterate.labeller=reward_model", f"iterate.reward_model={rm_dir}"])
    records = [{"prompt": "sort: 3 1 2"}, {"prompt": "reverse: kiwi fig"}]
    answers = [["1 2 3", "3 2 1 1 2 9 9"], ["fig kiwi", "kiwi"]]
    scored = Labeller(cfg, load_model(models["policy"], cfg.model), models["policy"]).score(records, answers)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    for rec, texts, row in zip(records, answers, scored):
        for text, s in zip(texts, row):
            ids = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]},
                                           {"role": "assistant", "content": text}], tokenize=True, return_dict=False)
            with torch.no_grad():
                want = float(rm(input_ids=torch.tensor([ids])).logits[0, 0])
            assert s["score"] == pytest.approx(want, abs=1e-5)
            assert "implicit" not in s  # no pi_{t-1} named: nothing to divide by
