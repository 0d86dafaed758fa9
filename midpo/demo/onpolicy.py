"""`midpo sample`: on-policy preference pairs from the model's own answers, labelled by a checker.

    midpo sample --config tiny            # <run_dir>/sft answers <run_dir>/synth/onpolicy_prompts.jsonl
    python -m midpo.demo.onpolicy --config tiny onpolicy.samples=8

For every training prompt of a verifiable task the start model (the SFT reference) answers
`onpolicy.samples` times at `onpolicy.temperature`; the task checker labels each answer. A pair is
(chosen = a correct answer, rejected = one of the model's own wrong answers). With `onpolicy.chosen:
sample` (default) chosen is one of the model's own correct samples and prompts without one are
skipped, so both sides are on-policy; `sample_or_gold` falls back to the checker's solution and
`gold` always takes it (an off-policy chosen: its log-prob is far below the samples', and DPO then
tends to lower both). Rejected answers are the reference's real mistakes rather than
synthetic ones, which is what makes DPO move probability away from errors the model actually makes
(the "on-policy" or rejection-sampling recipe of RSO / iterative DPO).

Prompts whose samples are all correct carry no preference signal and are skipped; every skip is
counted by reason in `<out>/onpolicy_manifest.json`. The output is a standard-format JSONL
(`prompt`, `chosen`, `rejected` + the task record), which `midpo prep` reads like any other input.
Written under a temporary name and renamed; an output whose manifest matches is reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import Counter
from pathlib import Path

import torch

from midpo.config import Config, OnPolicyConfig, load_config
from midpo.demo.evaluate import answer_token_budget, generate_answers, read_prompts
from midpo.demo.task import check_answer, render_answer, solve
from midpo.runtime.files import atomic_write_json, check_replaceable, publish_dir, temp_dir_for
from midpo.runtime.fingerprint import hash_file, hash_json
from midpo.runtime.models import model_fingerprint

log = logging.getLogger(__name__)
MANIFEST = "onpolicy_manifest.json"
PAIRS = "pairs.jsonl"


def build_pairs(records: list[dict], answers: list[list[str]], cfg: OnPolicyConfig, seed: int) -> tuple[list[dict], Counter]:
    """Pure pair construction: `answers[i]` are the samples of `records[i]`. Returns (rows, counts),
    where counts explains every prompt that produced no pair and every pair that was made."""
    rng = random.Random(seed)
    rows: list[dict] = []
    counts: Counter = Counter()
    for rec, samples in zip(records, answers):
        gold = render_answer(solve(rec))
        labels = [check_answer(rec, s) for s in samples]
        right = [s for s, ok in zip(samples, labels) if ok]
        # distinct wrong answers, most frequent first: the model's most probable mistakes
        wrong = [s for s, _ in Counter(s for s, ok in zip(samples, labels) if not ok and s.strip()).most_common()]
        empty = sum(1 for s in samples if not s.strip())
        counts["empty_answers"] += empty
        counts["correct_answers"] += len(right)
        if not wrong:
            counts["skipped_all_correct" if right else "skipped_only_empty_answers"] += 1
            continue
        if cfg.chosen == "sample" and not right:
            counts["skipped_no_correct_sample"] += 1
            continue
        for rejected in wrong[: cfg.pairs_per_prompt]:
            if cfg.chosen != "gold" and right:
                chosen, source = rng.choice(right), "sample"
            else:
                chosen, source = gold, "gold"
            counts[f"pairs_chosen_{source}"] += 1
            rows.append({"prompt": rec["prompt"], "chosen": chosen, "rejected": rejected, "error_kind": "on_policy",
                         **{k: rec[k] for k in ("task", "kind", "items")}})
    counts["pairs"] = len(rows)
    counts["prompts"] = len(records)
    return rows, counts


def sample_pairs(model_dir: str | Path, prompts_path: str | Path, out_dir: str | Path, cfg: OnPolicyConfig,
                 seed: int = 0, num_threads: int = 1) -> dict:
    """Sample, check, write `<out_dir>/pairs.jsonl` + manifest (reused when the manifest matches)."""
    from midpo.config import ModelConfig
    from midpo.runtime.models import load_model, load_tokenizer

    model_dir, prompts_path, out_dir = Path(model_dir), Path(prompts_path), Path(out_dir)
    key = hash_json({"model": model_fingerprint(model_dir), "prompts": hash_file(prompts_path),
                     "cfg": vars(cfg), "seed": seed})
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists() and (out_dir / PAIRS).exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == key:
            log.info("sample: %s is complete for this model and prompts; reusing it", out_dir)
            return manifest
    check_replaceable(out_dir, inputs=(prompts_path, model_dir))  # before the work: never over a user's folder
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    records = read_prompts(prompts_path, cfg.max_prompts if cfg.max_prompts > 0 else None)
    bad = [i for i, r in enumerate(records) if not all(k in r for k in ("prompt", "task", "kind", "items"))]
    if bad:
        raise ValueError(f"{prompts_path}: row {bad[0]} has no task record (prompt, task, kind, items): "
                         "on-policy sampling needs a checker-labelled task")
    # one row per distinct prompt: a prompt that appears in several pairs is sampled once
    seen: set[str] = set()
    records = [r for r in records if not (r["prompt"] in seen or seen.add(r["prompt"]))]
    model = load_model(model_dir, ModelConfig(attn_implementation="sdpa"), train=False)
    tok = load_tokenizer(model_dir)
    budget = answer_token_budget(tok, [{"answer": render_answer(solve(r))} for r in records])
    prompts = [r["prompt"] for r in records]
    log.info("sample: %d prompts x %d samples at T=%.2f from %s", len(prompts), cfg.samples, cfg.temperature, model_dir)
    # every prompt's k samples in one generate call (repeated prompts), seeded per round for reproducibility
    per_prompt: list[list[str]] = [[] for _ in records]
    for k in range(cfg.samples):
        outs = generate_answers(model, tok, prompts, do_sample=True, temperature=cfg.temperature,
                                seed=seed * 1000 + k, max_new_tokens=budget, batch_size=cfg.batch_size)
        for i, a in enumerate(outs):
            per_prompt[i].append(a)
    rows, counts = build_pairs(records, per_prompt, cfg, seed)
    sample_acc = counts["correct_answers"] / max(1, len(records) * cfg.samples)
    if not rows:
        raise ValueError(f"sample: no pairs from {len(records)} prompts of {prompts_path} (the model answered every "
                         f"sample correctly or not at all: {dict(counts)}); raise onpolicy.temperature or samples")
    tmp = temp_dir_for(out_dir, "sample")
    with open(tmp / PAIRS, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    manifest = {"key": key, "model": str(model_dir), "prompts_file": str(prompts_path), "samples": cfg.samples,
                "temperature": cfg.temperature, "sample_accuracy": sample_acc, "counts": dict(sorted(counts.items()))}
    atomic_write_json(tmp / MANIFEST, manifest)  # written last: its presence means the pairs are complete
    publish_dir(tmp, out_dir)  # the whole folder at once, and only over a folder midpo wrote
    log.info("sample: %d pairs from %d prompts (sample accuracy %.3f): %s", len(rows), len(records), sample_acc,
             dict(sorted(counts.items())))
    return manifest


def default_paths(cfg: Config) -> tuple[Path, Path, Path]:
    """(model, prompts file, output folder) of a run: the policy preference training starts from (the SFT model,
    else model.policy) answers `onpolicy.prompts` (default: the embedded default's fresh prompts, unseen by SFT),
    into <run_dir>/onpolicy."""
    from midpo.runtime.layout import RunLayout

    layout = RunLayout.resolve(cfg)
    prompts = Path(cfg.onpolicy.prompts) if cfg.onpolicy.prompts else layout.synth / "onpolicy_prompts.jsonl"
    return layout.policy, prompts, layout.onpolicy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="recipe YAML or a name in recipes/ (default: tiny)")
    parser.add_argument("--model", help="model folder that answers (default: <run_dir>/sft)")
    parser.add_argument("--prompts", help="JSONL with prompt + task record (default: onpolicy.prompts)")
    parser.add_argument("--out", help="output folder (default: <run_dir>/onpolicy)")


def run(args) -> int:
    cfg: Config = load_config(args.config, args.overrides)
    model, prompts, out = default_paths(cfg)
    manifest = sample_pairs(args.model or model, args.prompts or prompts, args.out or out, cfg.onpolicy,
                            seed=cfg.seed, num_threads=cfg.sft.num_threads)
    print(json.dumps(manifest["counts"], indent=2))
    return 0


if __name__ == "__main__":
    import sys

    from midpo.runtime.launch import stage_cli

    sys.exit(stage_cli("sample", add_arguments, run))
