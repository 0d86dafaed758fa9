"""The small-scale experiment: DPO variants and MI-DPO from the same SFT model, data and reference.

    python bench/experiment.py --out runs/experiment                       # recipe `tiny`, 3 seeds
    python bench/experiment.py --out runs/exp --seeds 0 1 2 --methods dpo mi_dpo-marginal train.max_steps=40

One shared base (synth -> prep -> sft -> on-policy pairs -> prep -> ref with a top-k cache for TDPO,
as `midpo run` builds it) is built once in
`<out>/base`; each method x seed gets `<out>/runs/<method>-s<seed>` whose synth/data/sft/ref are
symlinks to the base (their fingerprints match, so the training stage accepts them), then trains
with `midpo train --nproc N` and is scored by generation on the held-out prompts. Writes
`<out>/results.json`, `<out>/results.md` (mean and 95% interval over seeds) and PNG plots
(`learning_curves.png`, `accuracy_by_method.png`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from midpo.cli import split_overrides  # noqa: E402
from midpo.config import load_config  # noqa: E402
from midpo.runtime.files import save_config

METHODS: dict[str, list[str]] = {
    "dpo": ["loss.prior=dpo"],
    "simpo": ["loss.prior=simpo"],
    "rdpo": ["loss.prior=rdpo", "loss.options.r=0.1"],  # R-DPO has no official default length coefficient
    "tdpo": ["loss.prior=tdpo"],
    "mi_dpo-marginal": ["loss.prior=learned", "prior_net.objective=marginal"],
    "mi_dpo-joint": ["loss.prior=learned", "prior_net.objective=joint", "prior_net.anchor=nll"],
}
SHARED = ("synth", "sft_data", "sft", "onpolicy", "data", "ref")
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and half-width of the t-based 95% interval over seeds."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, T95.get(len(xs), 1.96) * sd / math.sqrt(len(xs))


def read_metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "logs" / "train_metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def link_base(base: Path, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        dst = run_dir / name
        if (base / name).exists() and not dst.exists():
            os.symlink((base / name).resolve(), dst)


def run_one(base_cfg_path: Path, out: Path, method: str, seed: int, overrides: list[str], nproc: int,
            n_prompts: int, sampled: bool) -> dict:
    from midpo.demo.evaluate import evaluate_model, paired_difference
    from midpo.demo.run import _launch, _read_last_eval

    base = base_cfg_path.parent
    run_dir = out / "runs" / f"{method}-s{seed}"
    result_file = run_dir / "result.json"
    cfg = load_config(base_cfg_path, [*overrides, *METHODS[method], f"run_dir={run_dir}", f"seed={seed}",
                                      f"train.seed={seed}"])
    if result_file.exists():
        # a finished run is reused only for the same settings: never report an old run under new overrides
        old = load_config(run_dir / "config.yaml", []) if (run_dir / "config.yaml").exists() else None
        if old is None or dataclasses.asdict(old) != dataclasses.asdict(cfg):
            raise SystemExit(f"{run_dir} holds a finished run with other settings than {' '.join(overrides) or 'none'}"
                             f" ({run_dir / 'config.yaml'}): pass another --out, or delete that folder")
        return json.loads(result_file.read_text())
    link_base(base, run_dir)
    cfg_path = save_config(cfg, run_dir / "config.yaml")
    print(f"\n=== experiment: {method} seed {seed} -> {run_dir} ===", flush=True)
    t = time.time()
    _launch("train", cfg_path, nproc)
    train_s = time.time() - t
    prompts = base / "synth" / "eval_prompts.jsonl"
    ev = evaluate_model(run_dir / "export", prompts, n=n_prompts, sampled=sampled, seed=seed)
    ref_eval = json.loads((out / "reference_eval.json").read_text())
    metrics = read_metrics(run_dir)
    losses = [m["loss"] for m in metrics if "loss" in m]
    res = {"method": method, "seed": seed, "train_seconds": round(train_s, 1),
           "greedy/accuracy": ev["greedy/accuracy"], "greedy/by_task": ev["greedy/by_task"],
           "paired_gain": paired_difference(ref_eval["greedy/scores"], ev["greedy/scores"]),
           "heldout": _read_last_eval(run_dir), "final_loss": losses[-1] if losses else None}
    if sampled:
        res["sampled/accuracy"] = ev["sampled/accuracy"]
    result_file.write_text(json.dumps(res, indent=2))
    g = res["paired_gain"]
    print(f"--- {method} s{seed}: greedy acc {res['greedy/accuracy']:.3f} (gain {g['diff']:+.3f} ± {g['ci95']:.3f}), "
          f"held-out reward acc {res['heldout'].get('rewards/accuracies', float('nan')):.3f}, train {train_s:.0f}s",
          flush=True)
    return res


def table(results: list[dict], ref_eval: dict, methods: list[str]) -> str:
    lines = ["| method | seeds | greedy task acc (95% CI) | gain vs ref (paired, mean over seeds) | "
             "held-out reward acc (95% CI) | final train loss | train wall s / run |",
             "|---|---|---|---|---|---|---|",
             f"| reference (SFT) | - | {ref_eval['greedy/accuracy']:.3f} ± {ref_eval['greedy/ci95']:.3f} (prompts) "
             "| - | - | - | - |"]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        acc = mean_ci([r["greedy/accuracy"] for r in rs])
        gain = mean_ci([r["paired_gain"]["diff"] for r in rs])
        rew = mean_ci([r["heldout"].get("rewards/accuracies", float("nan")) for r in rs])
        loss = mean_ci([r["final_loss"] for r in rs])
        wall = mean_ci([r["train_seconds"] for r in rs])
        lines.append(f"| {m} | {len(rs)} | {acc[0]:.3f} ± {acc[1]:.3f} | {gain[0]:+.3f} ± {gain[1]:.3f} | "
                     f"{rew[0]:.3f} ± {rew[1]:.3f} | {loss[0]:.3f} ± {loss[1]:.3f} | {wall[0]:.0f} |")
    return "\n".join(lines)


def plots(out: Path, results: list[dict], ref_eval: dict, methods: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(methods):
        for r in [r for r in results if r["method"] == m]:
            metrics = read_metrics(out / "runs" / f"{m}-s{r['seed']}")
            steps = [x.get("step", j) for j, x in enumerate(metrics)]
            for ax, key in zip(axes, ("loss", "rewards/accuracies")):
                ys = [x.get(key, float("nan")) for x in metrics]
                ax.plot(steps, ys, color=f"C{i}", alpha=0.7, label=m if r["seed"] == min(
                    x["seed"] for x in results if x["method"] == m) else None)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="training reward accuracy", xlabel="step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p = out / "learning_curves.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [m for m in methods if any(r["method"] == m for r in results)]
    for i, m in enumerate(names):
        accs = [r["greedy/accuracy"] for r in results if r["method"] == m]
        mu, ci = mean_ci(accs)
        ax.bar(i, mu, yerr=0 if math.isnan(ci) else ci, color=f"C{i}", alpha=0.8, capsize=4)
        ax.scatter([i] * len(accs), accs, color="k", s=10, zorder=3)
    ax.axhline(ref_eval["greedy/accuracy"], color="gray", ls="--", label="reference (SFT)")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set(ylabel="greedy task accuracy (held-out)", title="task accuracy by method (mean, 95% CI over seeds)")
    ax.legend()
    fig.tight_layout()
    p = out / "accuracy_by_method.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)
    return written


def main(argv: list[str] | None = None) -> int:
    import logging
    import platform
    import shutil

    import torch

    from midpo.demo.evaluate import evaluate_model
    from midpo.demo.run import prepare_base

    argv, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--out", default="runs/experiment")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--eval-prompts", type=int, default=500)
    p.add_argument("--topk", type=int, default=8, help="reference top-k cache for TDPO (ref.topk)")
    p.add_argument("--sampled", action="store_true", help="also score sampled answers")
    p.add_argument("--base-from", help="a finished `midpo run` folder of the same recipe: copy its synth, data, SFT "
                   "and on-policy pairs into <out>/base (fingerprints match, so those stages are skipped; ref is "
                   "rebuilt with top-k)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.set_num_threads(1)  # generation eval of a tiny model: 1 thread (see SftConfig.num_threads)
    if args.base_from:
        for name in ("synth", "sft_data", "sft", "onpolicy", "data"):
            src, dst = Path(args.base_from) / name, out / "base" / name
            if src.exists() and not dst.exists():
                shutil.copytree(src, dst, symlinks=True)
    cfg = load_config(args.config, [*overrides, f"run_dir={out / 'base'}", f"ref.topk={args.topk}"])
    timings: dict[str, float] = {}
    cfg_path = prepare_base(cfg, args.nproc, timings)
    ref_file = out / "reference_eval.json"
    if not ref_file.exists():
        ref = evaluate_model(cfg.model.reference, out / "base" / "synth" / "eval_prompts.jsonl", n=args.eval_prompts,
                             sampled=args.sampled, seed=cfg.seed)
        ref_file.write_text(json.dumps(ref))
    ref_eval = json.loads(ref_file.read_text())
    results, failed = [], []
    for m in args.methods:
        for s in args.seeds:
            try:
                results.append(run_one(cfg_path, out, m, s, overrides, args.nproc, args.eval_prompts, args.sampled))
            except (SystemExit, Exception) as e:  # one failing method must not lose the others
                print(f"--- {m} s{s}: FAILED: {e}", flush=True)
                failed.append(f"{m} s{s}: {e}")
            (out / "results.md").write_text(table(results, ref_eval, args.methods) + "\n")  # partial, per run
    md = table(results, ref_eval, args.methods) + "".join(f"\n\nFAILED: {f}" for f in failed)
    total = time.time() - t0
    cmd = "python bench/experiment.py " + " ".join(sys.argv[1:] if argv is None else argv + overrides)
    header = (f"command: `{cmd}`\n\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
              f"load average at end {os.getloadavg()}\n\nbase stages (s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f"; total wall {total:.0f}s\n\n")
    (out / "results.md").write_text(header + md + "\n")
    (out / "results.json").write_text(json.dumps({"reference": {k: v for k, v in ref_eval.items() if "scores" not in k},
                                                  "runs": results, "seconds": total}, indent=2))
    print("\n" + header + md)
    try:
        for f in plots(out, results, ref_eval, args.methods):
            print(f"plot: {f}")
    except ImportError as e:
        print(f"no plots ({e}); install matplotlib (the dev extra)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
