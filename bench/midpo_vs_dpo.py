"""Step time of MI-DPO proper (`loss.prior=learned`) vs DPO: same model, same data, same steps.

Not a test; prints a table. The model and data are bench/train_bench.py's (Llama h256, 4 layers, vocab 2048,
512 sorting pairs, micro-batch 8); the prior network is the reference's first quarter of layers
(prior_net.num_layers = 1 of 4) with the default `marginal` objective (it needs the policy logits, so the
learned run also pays for them). One process, ZeRO-3 (CPU: zero3_cpu_fp32). The runs are interleaved
(dpo, learned, dpo, learned, ...) so that load from other users of a shared machine hits both alike; every
round is reported, with the ratio of medians and of the fastest runs. Goal: learned / dpo <= 1.15.

    PYTHONPATH=. python bench/midpo_vs_dpo.py [--steps 12] [--rounds 2] [--threads 2]

Step time = seconds per optimizer step from the trainer's own logs (train_metrics.jsonl: global batch /
pairs_per_s; the window includes the prior hook's work), averaged over steps after `--warmup`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import MICRO, N_PAIRS, REPO, build_model, env, sorting_pairs, write_data  # noqa: E402

LAYERS = 4


def run(root: Path, model: Path, name: str, prior: str, steps: int, threads: int, warmup: int, tag: str) -> float:
    run_dir = root / f"{name}_{tag}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    for sub in ("data", "ref"):
        shutil.copytree(root / "base" / sub, run_dir / sub)
    extra = f"prior_net:\n  num_layers: {LAYERS // 4}\n" if prior == "learned" else ""
    recipe = run_dir / "recipe.yaml"
    recipe.write_text(
        f"run_dir: {run_dir}\nmodel:\n  policy: {model}\n  dtype: fp32\n  attn_implementation: sdpa\n"
        f"loss:\n  prior: {prior}\n  beta: 0.1\n{extra}train:\n  micro_batch_size: {MICRO}\n  grad_accum: 1\n"
        f"  max_steps: {steps}\n  lr: 1.0e-4\n  export_at_end: false\n  ds_config: zero3_cpu_fp32\n"
        f"  keep_last: 1\n  save_every: 0\n  eval_every: 0\n  log_every: 1\n  peak_flops: 1.0e11\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(recipe)], env=env(threads),
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    rows = [json.loads(x) for x in (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()][warmup:]
    return float(np.mean([MICRO / r["pairs_per_s"] for r in rows]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", default=None)
    a = ap.parse_args()

    root = Path(a.root or tempfile.mkdtemp(prefix="midpo_vs_dpo_"))
    model = build_model(root / "model")
    rows = sorting_pairs(N_PAIRS)
    from pipeline.train import tokenizer_fp

    write_data(root / "base" / "data", rows, tokenizer_fp(model))
    recipe = root / "base" / "recipe.yaml"
    recipe.write_text(f"run_dir: {root / 'base'}\nmodel:\n  policy: {model}\n  dtype: fp32\n"
                      f"  attn_implementation: sdpa\nref:\n  micro_batch_tokens: 4096\n")
    subprocess.run([sys.executable, "-m", "pipeline.reference", "--config", str(recipe)], env=env(a.threads),
                   cwd=REPO, check=True, capture_output=True)
    print(f"model: Llama h256 L{LAYERS} vocab 2048, prior = first {LAYERS // 4} layer(s); micro-batch {MICRO}; "
          f"{a.steps} steps ({a.warmup} warm-up dropped); {a.threads} threads; 1 process, ZeRO-3")
    times: dict[str, list[float]] = {"dpo": [], "learned": []}
    for r in range(a.rounds):
        for prior in ("dpo", "learned"):
            t = run(root, model, prior, prior, a.steps, a.threads, a.warmup, f"r{r}")
            times[prior].append(t)
            print(f"round {r}: {prior:8s} {t * 1000:8.1f} ms/step", flush=True)
    ratio = float(np.median(times["learned"]) / np.median(times["dpo"]))
    per_round = [lt / dt for lt, dt in zip(times["learned"], times["dpo"])]
    # On a shared machine outside load only adds time: the fastest run of each is the least disturbed.
    ratio_min = float(min(times["learned"]) / min(times["dpo"]))
    print(f"learned / dpo step time: {ratio:.3f} (median of rounds), {ratio_min:.3f} (fastest of each); per round: "
          f"{', '.join(f'{x:.3f}' for x in per_round)}; goal <= 1.15")
    print(json.dumps({"ms_per_step": {k: [round(x * 1000, 2) for x in v] for k, v in times.items()},
                      "ratio_median": ratio, "ratio_min": ratio_min, "ratio_per_round": per_round}))


if __name__ == "__main__":
    main()
