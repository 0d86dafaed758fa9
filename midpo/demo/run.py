"""`midpo run`: every stage of the pipeline on one machine, then a summary.

    midpo run                                   # the embedded tiny default (recipes/tiny.yaml)
    midpo run --config RECIPE --nproc 2 train.max_steps=50

Stages, each skipped when its output's fingerprint already matches (so a re-run resumes):
synth (when data.inputs is empty) -> prep -> sft (when sft.steps > 0) -> [sample on-policy pairs -> prep
them, when onpolicy.enabled] -> ref (N processes)
-> train (N processes, DeepSpeed; ZeRO stage and layout chosen by `auto`) -> generation eval of the reference vs the trained policy
on held-out prompts of the verifiable task -> summary table (and `<run_dir>/summary.json`).

The distributed stages run as their own `midpo ref|train --nproc N` processes (torchrun on this
machine), exactly as a user would launch them; this module only orders them and reads their outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from midpo.config import Config, load_config
from midpo.runtime.files import atomic_write_json
from midpo.runtime.layout import RunLayout

log = logging.getLogger(__name__)


def _stage(name: str) -> None:
    print(f"\n=== midpo run: {name} ===", flush=True)


_LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                  "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"}


def _launch(command: str, cfg_path: Path, nproc: int) -> None:
    """Run `midpo COMMAND --config CFG --nproc N` as a child process; fail loudly with its exit code."""
    cmd = [sys.executable, "-m", "midpo.cli", command, "--config", str(cfg_path), "--nproc", str(nproc)]
    log.info("running %s", " ".join(cmd))
    # `midpo run` launches its own process groups on this machine: rank/rendezvous variables inherited
    # from a surrounding launcher or process group (e.g. a MASTER_PORT still held by the parent) would
    # make the stage skip torchrun or collide on the port.
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise SystemExit(f"midpo run: stage `{command}` failed with exit code {rc} (command: {' '.join(cmd)})")


def _read_last_eval(run_dir: Path) -> dict:
    """The trainer's final eval metrics (held-out reward accuracy etc.), from its state file."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return {}
    step_dir = run_dir / "checkpoints" / latest.read_text().strip()
    for name in ("trainer_state.json", "state.json"):
        p = step_dir / name
        if p.exists():
            hist = json.loads(p.read_text()).get("eval_history") or []
            return hist[-1] if hist else {}
    return {}


def format_table(rows: list[tuple[str, str, str]]) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    line = f"+-{'-' * w0}-+-{'-' * w1}-+-{'-' * w2}-+"
    out = [line]
    for i, (a, b, c) in enumerate(rows):
        out.append(f"| {a:<{w0}} | {b:>{w1}} | {c:>{w2}} |")
        if i == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out)


def _timed(timings: dict[str, float], name: str, title: str, fn, *args):
    _stage(title)
    t = time.time()
    out = fn(*args)
    timings[name] = time.time() - t
    print(f"--- {name}: {timings[name]:.0f}s", flush=True)
    return out


def prepare_base(cfg: Config, nproc: int, timings: dict[str, float]) -> Path:
    """synth (when data.inputs is empty) -> prep -> sft (when sft.steps > 0) -> [sample + prep] -> ref: everything
    the training stage reads, at the paths every stage resolves alike (runtime.layout); returns the run config."""
    from midpo.data.prepare import prepare
    from midpo.demo.sft import train_sft
    from midpo.demo.synthetic import build_tiny_default
    from midpo.runtime.layout import claim_run

    layout = claim_run(cfg)  # records the run's paths in <run_dir>/config.yaml (or checks them against it)
    if not cfg.data.inputs:
        _timed(timings, "synth", "synth (embedded tiny default)", build_tiny_default, layout.synth, cfg.synth)
    # with on-policy pairs the given pairs only feed SFT (layout.sft_data); layout.data, which the ref and train
    # stages read, is then made from the sampled pairs
    if cfg.sft.steps > 0 or not cfg.onpolicy.enabled:
        _timed(timings, "prep", "prep", prepare, cfg.data, cfg.data.inputs or layout.default_inputs, layout.tokenizer,
               layout.sft_data)
    if cfg.sft.steps > 0:
        _timed(timings, "sft", f"sft ({cfg.sft.steps} steps, batch {cfg.sft.batch_size}, 1 process)",
               train_sft, cfg, layout.sft_data, layout.init_model, layout.sft)
    if cfg.onpolicy.enabled:
        from midpo.demo.onpolicy import PAIRS, default_paths, sample_pairs

        model, prompts, out = default_paths(cfg)
        _timed(timings, "sample", f"sample (on-policy pairs: {cfg.onpolicy.samples} answers per prompt, checked)",
               sample_pairs, model, prompts, out, cfg.onpolicy, cfg.seed, cfg.sft.num_threads)
        _timed(timings, "prep_onpolicy", "prep (on-policy pairs)", prepare, cfg.data, [str(out / PAIRS)],
               layout.tokenizer, layout.data)
    _timed(timings, "ref", f"ref ({nproc} processes)", _launch, "ref", layout.config, nproc)
    return layout.config


def run_pipeline(cfg: Config, nproc: int = 2, eval_prompts: int = 500) -> dict:
    from midpo.demo.evaluate import evaluate_model, paired_difference

    if cfg.model.lora.enabled and not cfg.export.merge_lora:  # before any work: the eval loads a full model
        from midpo.config import ConfigError

        raise ConfigError("midpo run with model.lora evaluates the merged model: set export.merge_lora=true")
    root = cfg.run_path
    synth_dir = root / "synth"
    timings: dict[str, float] = {}
    t_all = time.time()
    cfg_path = prepare_base(cfg, nproc, timings)

    _timed(timings, "train", f"train ({nproc} processes, prior={cfg.loss.prior})", _launch, "train", cfg_path, nproc)

    summary: dict = {"run_dir": str(root), "prior": cfg.loss.prior, "nproc": nproc}
    prompts = synth_dir / "eval_prompts.jsonl"
    if prompts.exists():
        _stage(f"eval (generation on {eval_prompts} held-out prompts, scored by the task checker)")
        t = time.time()
        if cfg.sft.num_threads > 0:
            import torch

            torch.set_num_threads(cfg.sft.num_threads)
        layout = RunLayout.resolve(cfg)
        before = evaluate_model(layout.reference, prompts, n=eval_prompts, sampled=True, seed=cfg.seed)
        policy = layout.export / "merged" if cfg.model.lora.enabled else layout.export  # LoRA: export/ is the adapter
        after = evaluate_model(policy, prompts, n=eval_prompts, sampled=True, seed=cfg.seed)
        timings["eval"] = time.time() - t
        print(f"--- eval: {timings['eval']:.0f}s", flush=True)
        summary["reference"], summary["policy"] = before, after
        summary["paired"] = {mode: paired_difference(before[f"{mode}/scores"], after[f"{mode}/scores"])
                             for mode in ("greedy", "sampled") if f"{mode}/scores" in before}
    else:
        log.info("eval: %s not found (data.inputs given): no generation eval, only held-out reward metrics", prompts)
    summary["train_eval"] = _read_last_eval(root)
    sft_manifest = root / "sft" / "sft_manifest.json"
    if cfg.sft.steps > 0 and sft_manifest.exists():
        sft_info = json.loads(sft_manifest.read_text())
        summary["sft"] = {k: sft_info.get(k) for k in ("steps", "first_loss", "final_loss")}
    timings["total"] = time.time() - t_all
    summary["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    atomic_write_json(root / "summary.json", summary)
    print_summary(summary)
    return summary


def verdict(paired: dict, mode: str = "greedy") -> str:
    """One line: the paired gain on the same prompts and whether its 95% interval excludes 0."""
    d = paired[mode]
    if d["significant"]:
        word = "BEATS the reference (the interval is above 0)"
    elif d["upper"] < 0:
        word = "is WORSE than the reference (the interval is below 0)"
    else:
        word = "does NOT beat the reference beyond noise (the interval includes 0)"
    return (f"{mode} task accuracy gain {d['diff']:+.3f} (95% paired interval [{d['lower']:+.3f}, {d['upper']:+.3f}], "
            f"n={d['n']}: {d['gained']} prompts gained, {d['lost']} lost): the trained policy {word}")


def print_summary(summary: dict) -> None:
    rows = [("metric", "reference", "trained policy")]
    ref, pol = summary.get("reference"), summary.get("policy")
    paired = summary.get("paired") or {}
    if ref and pol:
        for mode in ("greedy", "sampled"):
            if f"{mode}/accuracy" in ref:
                rows.append((f"task accuracy, {mode} (n={ref['n']})",
                             f"{ref[f'{mode}/accuracy']:.3f} ± {ref[f'{mode}/ci95']:.3f}",
                             f"{pol[f'{mode}/accuracy']:.3f} ± {pol[f'{mode}/ci95']:.3f}"))
                if mode in paired:
                    d = paired[mode]
                    rows.append((f"  gain, {mode} (paired 95%)", "-", f"{d['diff']:+.3f} ± {d['ci95']:.3f}"))
                for task, acc in (ref.get(f"{mode}/by_task") or {}).items():
                    rows.append((f"  {task}, {mode}", f"{acc:.3f}", f"{pol[f'{mode}/by_task'].get(task, float('nan')):.3f}"))
                rows.append((f"partial credit, {mode}", f"{ref[f'{mode}/partial']:.3f}", f"{pol[f'{mode}/partial']:.3f}"))
    ev = summary.get("train_eval") or {}
    # the reference's implicit reward is 0 for every pair: its reward accuracy is undefined (shown as -)
    for key in ("rewards/accuracies", "rewards/margins", "loss"):
        if key in ev:
            rows.append((f"held-out {key}", "-", f"{ev[key]:.4f}"))
    print("\nmidpo run summary (" + summary["run_dir"] + f", prior={summary.get('prior')})")
    print(format_table(rows))
    if "greedy" in paired:
        print(verdict(paired, "greedy"))
    if "sampled" in paired:
        print(verdict(paired, "sampled"))
    secs = summary.get("seconds", {})
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="recipe YAML or a name in recipes/ (default: tiny)")
    parser.add_argument("--nproc", type=int, default=2, help="processes for the ref and train stages (default 2)")
    parser.add_argument("--eval-prompts", type=int, default=500,
                        help="held-out prompts for the generation eval (at most synth.n_eval_prompts; default 500)")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    run_pipeline(cfg, nproc=args.nproc, eval_prompts=args.eval_prompts)
    return 0
