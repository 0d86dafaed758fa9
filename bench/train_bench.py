"""Training throughput: midpo (`midpo.stages.train`, cached reference) vs TRL's DPOTrainer.

Not a test; prints a table. Same Llama (hidden 256, 4 layers, 8 heads, 4 kv heads, vocab 2048), same
data (512 sorting pairs, ~120 tokens per sequence), micro-batch 8, same step count, same threads.

    pip install trl==1.16.0              # bench-only extra, never a runtime dependency
    PYTHONPATH=. python bench/train_bench.py [--steps 24] [--threads 2] [--skip-trl] [--rows default]

The first midpo row is the default recipe with nothing set by hand (train.ds_config / train.layout `auto`,
model.dtype and attention auto): issue #18's goal is that row >= 2x TRL's default and >= 1.3x TRL with
precompute_ref_log_probs, in pairs/s, in the same invocation. The other rows pin a ZeRO stage and layout.

midpo numbers come from its own logs (<run>/logs/train_metrics.jsonl: pairs/s, tokens/s, MFU against a
measured fp32 GEMM peak), averaged over steps after the first `--warmup` ones; world size 1 uses
`--threads` threads, world size 2 one thread per process (same cores). TRL numbers are per-step times
from a callback (end of step to end of step), over the same steps. Neither side's number includes its
reference pass (midpo: the `midpo ref` stage; TRL precompute: DPOTrainer.__init__).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT = "midpo default recipe (no flags: auto)"
sys.path.insert(0, str(REPO))
VOCAB, BOS, EOS, PAD = 2048, 1, 2, 0
N_PAIRS, MICRO = 512, 8


def build_model(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, VOCAB)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(str(path))
    return path


def sorting_pairs(n: int, seed: int = 0) -> list[dict]:
    """Prompt: a list of numbers; chosen: sorted; rejected: sorted with two items swapped. ~120 tokens/sequence."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(50, 70))
        items = rng.integers(10, VOCAB, size=k).tolist()
        good = sorted(items)
        bad = list(good)
        a, b = rng.choice(k, size=2, replace=False)
        bad[a], bad[b] = bad[b], bad[a]
        rows.append({"id": f"sort-{i:05d}", "prompt_ids": [BOS, 3, *items, 4], "chosen_ids": [*good, EOS],
                     "rejected_ids": [*bad, EOS]})
    return rows


def write_data(data_dir: Path, rows: list[dict], tok_fp: str) -> None:
    from midpo.data.shards import write_split
    from midpo.runtime.fingerprint import hash_json

    record = write_split(data_dir / "train", rows, max(1, -(-len(rows) // 2)), hash_json([tok_fp, len(rows)]))
    manifest = {"format_version": 1, "complete": True, "tokenizer": {"fingerprint": tok_fp},
                "splits": {"train": record}}
    manifest["fingerprint"] = hash_json(manifest)
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


def build_base(root: Path, threads: int) -> tuple[Path, list[dict]]:
    """The benches' shared start: model, N_PAIRS sorting pairs as data, and their reference cache (the real
    `midpo ref` stage) under root/base; runs copy data/ and ref/ from there. -> (model folder, rows)."""
    from midpo.runtime.models import tokenizer_fingerprint as tokenizer_fp

    model = build_model(root / "model")
    rows = sorting_pairs(N_PAIRS)
    write_data(root / "base" / "data", rows, tokenizer_fp(model))
    recipe = root / "base" / "recipe.yaml"
    recipe.write_text(f"run_dir: {root / 'base'}\nmodel:\n  policy: {model}\n  dtype: fp32\n"
                      f"  attn_implementation: sdpa\nref:\n  micro_batch_tokens: 4096\n")
    subprocess.run([sys.executable, "-m", "midpo.stages.ref", "--config", str(recipe)], env=env(threads),
                   cwd=REPO, check=True, capture_output=True)
    return model, rows


def fresh_run(root: Path, name: str) -> Path:
    """An empty run folder root/name holding copies of build_base's data/ and ref/."""
    run = root / name
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    for sub in ("data", "ref"):
        shutil.copytree(root / "base" / sub, run / sub)
    return run


def env(threads: int) -> dict:
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run_midpo(root: Path, model: Path, steps: int, world: int, threads: int, layout: str, warmup: int,
              ds_config: str = "zero3_cpu_fp32", compile: bool = False, peaks: dict[int, float] | None = None,
              attn: str = "sdpa") -> dict:
    """layout: packed | padded | shared (train.layout; shared: the prompt once per pair); compile: train.compile.
    layout and ds_config "auto", attn "auto": the keys are left out of the recipe (the shipped defaults: what `auto`
    picks is read back from the run's config.yaml)."""
    run = fresh_run(root, f"midpo_w{world}_{layout}_{ds_config}{'_compiled' if compile else ''}_{attn}")
    recipe = run / "recipe.yaml"
    per_proc = threads if world == 1 else max(1, threads // world)
    model_keys = "" if attn == "auto" else f"  dtype: fp32\n  attn_implementation: {attn}\n"
    recipe.write_text(
        f"run_dir: {run}\nmodel:\n  policy: {model}\n{model_keys}"
        f"loss:\n  prior: dpo\n  beta: 0.1\ntrain:\n  micro_batch_size: {MICRO}\n  grad_accum: 1\n"
        f"  max_steps: {steps}\n  lr: 1.0e-4\n  export_at_end: false\n  keep_last: 1\n"
        + ("" if layout == "auto" else f"  layout: {layout}\n")
        + ("" if ds_config == "auto" else f"  ds_config: {ds_config}\n")
        + (f"  compile: {str(compile).lower()}\n" if compile else "")
        # one measured peak per thread count for every run: MFU comparable across runs
        + (f"  peak_flops: {peaks[per_proc]:.6g}\n" if peaks else ""))
    launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={world}"]
    t0 = time.perf_counter()
    proc = subprocess.run(launcher + ["-m", "midpo.stages.train", "--config", str(recipe)], env=env(per_proc), cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    rows = [json.loads(x) for x in (run / "logs" / "train_metrics.jsonl").read_text().splitlines()][warmup:]
    import yaml

    chosen = yaml.safe_load((run / "config.yaml").read_text())
    return {**step_rates(rows, MICRO * world), "wall_s": time.perf_counter() - t0, "threads_per_rank": per_proc,
            "ds_config": chosen["train"]["ds_config"], "layout": chosen["train"]["layout"],
            "auto": {k: v["reason"] for k, v in (chosen.get("auto") or {}).items()}}


def step_rates(rows: list[dict], global_batch: int) -> dict:
    """Per-step metric lines (log_every 1) -> rates over the whole window, as TRL's side is measured: pairs/s
    = pairs / total time (not a mean of per-step rates, which overweights fast steps); tokens/s and MFU
    weighted by step time alike."""
    step_s = np.array([global_batch / r["pairs_per_s"] for r in rows])
    total = float(step_s.sum())
    out = {k: float(np.dot([r[k] for r in rows], step_s)) / total for k in ("tokens_per_s", "mfu")}
    return {"pairs_per_s": global_batch * len(rows) / total, **out,
            "padding_fraction": float(np.mean([r["padding_fraction"] for r in rows])),
            "median_pairs_per_s": global_batch / float(np.median(step_s)),
            "step_ms": [round(x * 1000) for x in step_s]}


def run_trl(root: Path, model_dir: Path, rows: list[dict], steps: int, threads: int, precompute: bool,
            warmup: int, compile: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepClock(TrainerCallback):
        """Time at the end of every optimizer step: per-step durations, as midpo's logs give them."""

        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(model_dir))

    def text(ids):
        return " ".join(f"w{i}" if i >= 3 else ["<pad>", "<s>", "</s>"][i] for i in ids)

    # TRL adds EOS itself: hand it the response without it; the prompt without BOS (its tokenizer adds none).
    ds = Dataset.from_list([{"prompt": text(r["prompt_ids"]), "chosen": text(r["chosen_ids"][:-1]),
                             "rejected": text(r["rejected_ids"][:-1])} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(output_dir=str(root / "trl_out"), per_device_train_batch_size=MICRO, max_steps=steps,
                     learning_rate=1e-4, logging_steps=10 ** 6, report_to="none", save_strategy="no", bf16=False,
                     fp16=False, use_cpu=True, gradient_checkpointing=False, precompute_ref_log_probs=precompute,
                     max_length=512, dataloader_num_workers=0, beta=0.1, torch_compile=compile)
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    n_tok = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    # Steps after the first `warmup` ones, like midpo's averages (its first steps pay one-time costs too).
    # precompute=True: TRL 1.16 computes the reference log-probs in DPOTrainer.__init__, outside these steps --
    # as midpo's numbers exclude its reference stage (`midpo ref`): training vs training.
    steps_s = np.diff(clock.ends)[warmup - 1:]
    step_s = float(np.mean(steps_s))
    return {"pairs_per_s": MICRO / step_s, "median_pairs_per_s": MICRO / float(np.median(steps_s)), "tokens_per_s": MICRO * n_tok / len(rows) / step_s, "wall_s": wall,
            "wall_pairs_per_s": steps * MICRO / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=2, help="first steps excluded from the averages (midpo and TRL)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--rows", choices=("all", "default"), default="all",
                    help="default: only the shipped-default midpo run (no flags), the hand-tuned best (shared, stage 0, "
                    "compile) and TRL default / precompute (the issue #18 goal) -- a shorter invocation")
    ap.add_argument("--root", default=None)
    a = ap.parse_args()

    root = Path(a.root or tempfile.mkdtemp(prefix="midpo_train_bench_"))
    model, rows = build_base(root, a.threads)
    mean_len = np.mean([len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in rows])
    print(f"model: Llama h256 L4 8h/4kv vocab {VOCAB}; {N_PAIRS} pairs, mean sequence {mean_len:.0f} tokens; "
          f"micro-batch {MICRO}; {a.steps} steps; {a.threads} threads")

    import torch

    from midpo.runtime.metrics import measure_peak_flops

    def measure_peaks() -> dict[int, float]:
        """The MFU denominator: a 2048^3 fp32 GEMM per thread count a rank gets, best of 3 one-second tries
        (load from elsewhere only lowers a measurement, and a low peak would inflate MFU)."""
        out = {}
        for t in sorted({a.threads, max(1, a.threads // 2)}):
            torch.set_num_threads(t)
            out[t] = max(measure_peak_flops(torch.float32, torch.device("cpu"), seconds=1.0) for _ in range(3))
        return out

    peaks = measure_peaks()  # handed to every midpo run (train.peak_flops): one denominator for all rows
    results = {}
    # ZeRO-3 (what auto picks when the model does not fit otherwise), ZeRO-2 and stage 0 (the one-device picks: ZeRO-3 partitions nothing on
    # one process and still pays its per-parameter gathers; ZeRO-2 still copies every gradient into its flat
    # buffer, stage 0 keeps them in .grad and all-reduces them); padded = the CPU recipes' layout (sdpa's 4-D packing
    # mask has no fast CPU kernel), packed for reference, shared = train.share_prompt (the prompt computed once
    # per pair: 2P+C+R -> P+C+R tokens).
    # compiled = train.compile (torch.compile of the decoder; ZeRO <= 2): its compile time falls in the first
    # steps, which every average here drops (--warmup).
    # compiled + eager attention: Inductor then fuses the attention's mask and softmax itself, instead of
    # calling sdpa's CPU flash kernel (head_dim 32 here).
    # the default recipe: nothing set by hand (train.ds_config / train.layout auto, model.dtype / attention auto)
    results[DEFAULT] = run_midpo(root, model, a.steps, 1, a.threads, "auto", a.warmup, "auto", False, peaks, "auto")
    print(f"{DEFAULT}: auto chose ds_config {results[DEFAULT]['ds_config']}, layout {results[DEFAULT]['layout']} "
          f"({'; '.join(results[DEFAULT]['auto'].values())})", flush=True)
    configs = (((1, "shared", "zero0_cpu_fp32", True, "sdpa"),) if a.rows == "default" else (
            (1, "packed", "zero3_cpu_fp32", False, "sdpa"), (1, "padded", "zero3_cpu_fp32", False, "sdpa"),
            (1, "padded", "zero2_cpu_fp32", False, "sdpa"), (1, "shared", "zero2_cpu_fp32", False, "sdpa"),
            (1, "shared", "zero2_cpu_fp32", True, "sdpa"), (1, "shared", "zero0_cpu_fp32", False, "sdpa"),
            (1, "shared", "zero0_cpu_fp32", True, "sdpa"), (1, "shared", "zero0_cpu_fp32", True, "eager"),
            (2, "padded", "zero3_cpu_fp32", False, "sdpa"), (2, "padded", "zero2_cpu_fp32", False, "sdpa"),
            (2, "shared", "zero2_cpu_fp32", False, "sdpa"), (2, "shared", "zero2_cpu_fp32", True, "sdpa"),
            (2, "shared", "zero0_cpu_fp32", True, "sdpa")))
    for world, layout, ds, comp, attn in configs:
        name = f"midpo world={world} {layout} {ds.split('_')[0]}{' compiled' if comp else ''}"
        results[name + (f" attn={attn}" if attn != "sdpa" else "")] = run_midpo(
            root, model, a.steps, world, a.threads, layout, a.warmup, ds, comp, peaks, attn)
    if not a.skip_trl:
        # The goals are against TRL's default and precompute runs; TRL with its own torch_compile=True (the
        # Trainer compiles the whole model) is printed beside them so that compile's share of the gap is visible.
        for pre, comp in ((False, False), (True, False)) + (((True, True),) if a.rows == "all" else ()):
            results[f"TRL DPOTrainer precompute_ref={pre}{' torch_compile' if comp else ''}"] = run_trl(
                root, model, rows, a.steps, a.threads, pre, a.warmup, comp)

    # Measured again after the runs: MFU is reported against the higher of the two measurements per thread count.
    after = measure_peaks()
    final = {t: max(peaks[t], after[t]) for t in peaks}
    print("measured fp32 GEMM peak (before, after the runs): " + ", ".join(
        f"{t} thread(s) {peaks[t] / 1e9:.0f}, {after[t] / 1e9:.0f} GFLOP/s" for t in peaks))
    for v in results.values():
        if "mfu" in v:
            v["mfu"] *= peaks[v["threads_per_rank"]] / final[v["threads_per_rank"]]
    # tokens/s on one definition for every row: the data's non-pad tokens per pair, 2P+C+R (both sequences),
    # so the ratio in tokens/s equals the ratio in pairs/s; "fwd tok/s" is what midpo's forward actually ran
    # (the shared layout runs P+C+R per pair: fewer tokens for the same data).
    pair_tok = float(np.mean([2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]))
    print(f"{'run':52s} {'pairs/s':>8s} {'median':>7s} {'tok/s':>7s} {'fwd tok/s':>9s} {'MFU':>5s} {'pad':>5s}  "
          f"({pair_tok:.0f} tokens/pair; pairs/s = mean step time, median = median step time)")
    for k, v in results.items():
        mfu = f"{v['mfu']:.0%}" if "mfu" in v else "-"
        pad = f"{v['padding_fraction']:.0%}" if "padding_fraction" in v else "-"
        fwd = f"{v['tokens_per_s']:.0f}" if "mfu" in v else "-"
        print(f"{k:52s} {v['pairs_per_s']:8.1f} {v['median_pairs_per_s']:7.1f} {v['pairs_per_s'] * pair_tok:7.0f} {fwd:>9s} {mfu:>5s} {pad:>5s}")
    if not a.skip_trl:
        best = max((k for k in results if k.startswith("midpo")), key=lambda k: results[k]["pairs_per_s"])
        for row in dict.fromkeys((DEFAULT, best)):
            for pre, goal in ((False, 2.0), (True, 1.3)):
                trl = results[f"TRL DPOTrainer precompute_ref={pre}"]["pairs_per_s"]
                print(f"{row} / TRL precompute_ref={pre}: {results[row]['pairs_per_s'] / trl:.2f}x in pairs/s and "
                      f"tokens/s (goal >= {goal}x{' for the default recipe' if row == DEFAULT else ''})")
        print(f"{best}: MFU {results[best]['mfu']:.0%} of the measured fp32 GEMM peak (goal >= 50%)")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
