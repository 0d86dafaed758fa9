"""LoRA (`model.lora`) vs full fine-tuning: peak memory and step time, in one invocation. Not a test; prints a table.

The bench model and data of bench/train_bench.py (Llama h256 L4 8h/4kv, vocab 2048, 512 sorting pairs of
~120 tokens, micro-batch 8), one process, the same ds_config for both runs (default zero3_cpu_fp32). Each run is
its own process (`midpo.stages.train.main` in a child), so its peak is its own:
- memory: the optimizer's state (Adam's moments, walked on the live optimizer),
  the resident set after setup and its maximum during the steps (sampled at each micro-step's loss and step
  end), the child's peak resident set (ru_maxrss) and, on CUDA, torch.cuda.max_memory_allocated. On CPU the
  resident set is mostly libraries (a child that only imports and loads the model is printed as the baseline);
  the bench model is small (~4M parameters), so its weights and optimizer state are tens of MB of it;
- step time: per-step times from the run's logs/train_metrics.jsonl (pairs/s), after the first --warmup steps.

    PYTHONPATH=. python bench/lora_bench.py [--steps 12] [--rank 16] [--threads 2] [--ds-config zero3_cpu_fp32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_bench import MICRO, build_base, env, fresh_run, step_rates  # noqa: E402


def _rss_mb() -> float:
    """This process's current resident set (/proc/self/statm), MB."""
    import os

    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _optimizer_mb(ds_engine) -> float:
    """Bytes of the optimizer's state tensors (Adam's two moments per trained parameter), walked on the live
    optimizer, not estimated. (ZeRO-3's fp32 master partition, one more copy of the trained parameters, sits
    outside the torch optimizer between steps and is not counted.)"""
    import torch

    opt = ds_engine.optimizer
    opt = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
    total = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return total / 2 ** 20


def child(recipe: str, baseline: bool) -> None:
    """In the child process: train (or only load the model), then print the memory numbers as one JSON line."""
    import torch

    from midpo.config import load_config
    from midpo.runtime import dist as pdist
    from midpo.train.callbacks import Callback

    cfg = load_config(recipe)
    out: dict = {}
    if baseline:
        from midpo.runtime.models import load_model

        load_model(cfg.model.policy, cfg.model, train=True)
    else:
        from midpo.train.trainer import Trainer

        class RssProbe(Callback):  # the resident set during the steps (forward done, after each step)
            def __init__(self):
                self.max = 0.0

            def on_micro_loss(self, step, micro, loss):
                self.max = max(self.max, _rss_mb())
                return loss

            def on_step_end(self, step):
                self.max = max(self.max, _rss_mb())

        probe = RssProbe()
        pdist.init_distributed()
        trainer = Trainer(cfg, callbacks=[probe]).setup()
        out["after_setup_rss_mb"] = _rss_mb()
        trainer.fit()
        out["optimizer_mb"] = _optimizer_mb(trainer.policy.ds)
        out["trainable_m"] = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.policy.module.parameters()
                                 if p.requires_grad) / 1e6
        out["during_steps_max_rss_mb"] = probe.max
        trainer.close()
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("PEAKS " + json.dumps(out))


def run(root: Path, model: Path, name: str, a, lora_rank: int, baseline: bool = False) -> dict:
    out = fresh_run(root, name)
    recipe = out / "recipe.yaml"
    lora = f"  lora:\n    r: {lora_rank}\n    alpha: {2 * lora_rank}\n" if lora_rank else ""
    recipe.write_text(
        f"run_dir: {out}\nmodel:\n  policy: {model}\n  dtype: auto\n  attn_implementation: sdpa\n{lora}"
        f"loss:\n  prior: dpo\n  beta: 0.1\ntrain:\n  micro_batch_size: {MICRO}\n  grad_accum: 1\n"
        f"  max_steps: {a.steps}\n  lr: 1.0e-4\n  packing: false\n  export_at_end: false\n  save_every: 0\n"
        f"  ds_config: {a.ds_config}\n  keep_last: 1\n  peak_flops: 1.0e11\n  probe_rows: 0\n")
    proc = subprocess.run([sys.executable, __file__, "--child", str(recipe)] + (["--baseline"] if baseline else []),
                          env=env(a.threads), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    peaks = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("PEAKS "))[len("PEAKS "):])
    if baseline:
        return peaks
    rows = [json.loads(x) for x in (out / "logs" / "train_metrics.jsonl").read_text().splitlines()][a.warmup:]
    rates = step_rates(rows, MICRO)
    return {**peaks, "step_ms": float(np.mean(rates["step_ms"])), "median_step_ms": float(np.median(rates["step_ms"])),
            "pairs_per_s": rates["pairs_per_s"], "final_loss": rows[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ds-config", default="zero3_cpu_fp32")
    ap.add_argument("--root", default=None)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.baseline)
        return

    root = Path(a.root or tempfile.mkdtemp(prefix="midpo_lora_bench_"))
    model, _ = build_base(root, a.threads)
    from transformers import AutoModelForCausalLM

    from midpo.config import LoraSettings
    from midpo.runtime.lora import apply_lora

    m = AutoModelForCausalLM.from_pretrained(str(model))
    n_all = sum(p.numel() for p in m.parameters())
    apply_lora(m, LoraSettings(r=a.rank, alpha=2.0 * a.rank))
    n_lora = sum(p.numel() for p in m.parameters() if p.requires_grad)
    base = run(root, model, "baseline", a, 0, baseline=True)
    res = {"full": run(root, model, "full", a, 0), f"lora r={a.rank}": run(root, model, "lora", a, a.rank)}
    print(f"bench model: {n_all / 1e6:.2f}M parameters; LoRA r={a.rank} all-linear: {n_lora / 1e6:.3f}M trainable "
          f"({100 * n_lora / n_all:.1f}%); {a.ds_config}, 1 process, {a.threads} threads, micro-batch {MICRO}, "
          f"{a.steps} steps (first {a.warmup} dropped)")
    print(f"baseline (import + load the model, no training): peak RSS {base['maxrss_mb']:.0f} MB")
    print(f"{'run':14s} {'Adam MiB':>12s} {'RSS setup':>9s} {'RSS steps':>9s} {'peak RSS':>8s} {'cuda MB':>8s} "
          f"{'step ms':>8s} {'median':>7s} {'pairs/s':>8s}")
    for k, v in res.items():
        cuda = f"{v['cuda_peak_mb']:.0f}" if "cuda_peak_mb" in v else "-"
        print(f"{k:14s} {v['optimizer_mb']:12.1f} {v['after_setup_rss_mb']:9.0f} {v['during_steps_max_rss_mb']:9.0f} "
              f"{v['maxrss_mb']:8.0f} {cuda:>8s} {v['step_ms']:8.1f} {v['median_step_ms']:7.1f} {v['pairs_per_s']:8.1f}")
    f, lo = res["full"], res[f"lora r={a.rank}"]
    print(f"LoRA / full: Adam state {lo['optimizer_mb'] / f['optimizer_mb']:.3f}x, RSS during steps "
          f"{lo['during_steps_max_rss_mb'] / f['during_steps_max_rss_mb']:.2f}x, peak RSS "
          f"{lo['maxrss_mb'] / f['maxrss_mb']:.2f}x, step time {lo['step_ms'] / f['step_ms']:.2f}x"
          + (f", CUDA peak {lo['cuda_peak_mb'] / f['cuda_peak_mb']:.2f}x" if "cuda_peak_mb" in f else ""))
    print(json.dumps({"baseline": base, **res}, indent=1))


if __name__ == "__main__":
    main()
