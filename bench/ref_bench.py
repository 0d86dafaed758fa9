"""Throughput of the reference stage (`midpo ref`) vs a plain `torch.no_grad()` loop, and packed vs padded.

    PYTHONPATH=. python bench/ref_bench.py                      # hidden 256, 4 layers, vocab 2048, 512 pairs
    PYTHONPATH=. python bench/ref_bench.py --pairs 128 --budgets 2048

Both sides score the same pairs with the same fp32 model and count the same real tokens (prompt twice +
both responses, padding excluded). The plain loop is what a script would do: batches of --plain-batch
pairs in data order, right-padded, one forward, full log_softmax, gather. The stage number is the
whole single-process `main(cfg)` (model load, planning, forwards, chunk writes, merge + verify,
manifest), so it is the conservative side of the comparison; the process's first call (one-time deepspeed
import and set-up) is timed separately and printed. Prints one table; not run by CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(root: Path, pairs: int, hidden: int, layers: int, vocab: int, seed: int = 0) -> tuple[Path, Path]:
    """Model folder + a stage-1 style data folder (train split only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from midpo.data.shards import write_split
    from midpo.runtime.files import atomic_write_json
    from midpo.runtime.fingerprint import hash_json

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model", safe_serialization=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(pairs):  # lengths spread like chat data: short and long prompts, uneven responses
        p = [1] + rng.integers(3, vocab, int(rng.integers(16, 160))).tolist()
        c, r = (rng.integers(3, vocab, int(rng.integers(8, 160))).tolist() + [2] for _ in range(2))
        rows.append({"id": f"b{i:05d}", "prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    data = root / "run" / "data"
    record = write_split(data / "train", rows, max(1, pairs), hash_json(["bench", pairs, seed]))
    manifest = {"complete": True, "tokenizer": {"fingerprint": "bench"}, "splits": {"train": record}}
    manifest["fingerprint"] = hash_json(manifest)
    atomic_write_json(data / "manifest.json", manifest)
    return root / "model", data


def real_tokens(rows) -> int:
    return sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)


def plain_loop(model_dir: Path, rows: list[dict], batch: int) -> float:
    """Seconds for a plain padded no-grad loop in data order."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(rows), batch):
            part = rows[s:s + batch]
            seqs = [r["prompt_ids"] + r[k] for k in ("chosen_ids", "rejected_ids") for r in part]
            T = max(map(len, seqs))
            ids = torch.zeros(len(seqs), T, dtype=torch.long)
            mask = torch.zeros(len(seqs), T, dtype=torch.long)
            for i, q in enumerate(seqs):
                ids[i, :len(q)] = torch.tensor(q)
                mask[i, :len(q)] = 1
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # (2B, T, V)
            _ = logp[:, :-1].gather(-1, ids[:, 1:, None])  # per-token log-probs (response slicing is free)
    return time.perf_counter() - t0


def stage(model_dir: Path, data_dir: Path, out_root: Path, *, packing: bool, budget: int) -> float:
    """Seconds of the whole single-process stage (`midpo.stages.ref.main`)."""
    from midpo.config import load_config
    from midpo.runtime.dist import free_port
    from midpo.stages.ref import main

    run = out_root / f"run-{'packed' if packing else 'padded'}-{budget}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "data").symlink_to(data_dir)
    cfg = load_config(None, [f"run_dir={run}", f"model.reference={model_dir}", "model.dtype=fp32",
                             "model.attn_implementation=sdpa", f"ref.packing={str(packing).lower()}",
                             f"ref.micro_batch_tokens={budget}", "ref.rows_per_shard=256"])
    os.environ["MASTER_PORT"] = str(free_port())
    t0 = time.perf_counter()
    main(cfg)
    return time.perf_counter() - t0


def main_cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--plain-batch", type=int, default=8, help="pairs per batch of the plain loop")
    ap.add_argument("--budgets", type=int, nargs="+", default=[1024, 4096], help="ref.micro_batch_tokens to try")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from datasets import load_from_disk

    with tempfile.TemporaryDirectory(prefix="ref_bench_") as tmp:
        root = Path(tmp)
        model_dir, data_dir = build(root, args.pairs, args.hidden, args.layers, args.vocab)
        rows = load_from_disk(str(data_dir / "train")).to_list()
        n_tok = real_tokens(rows)
        print(f"model hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.pairs} pairs, "
              f"{n_tok} real tokens; {args.threads} threads")
        results = [(f"plain no_grad loop (padded, batch {args.plain_batch}, data order)",
                    plain_loop(model_dir, rows, args.plain_batch))]
        # The first stage call in a process also pays one-time costs (deepspeed import, process group, its
        # shm comm op build): measured once, shown, and kept out of the comparison.
        warm = stage(model_dir, data_dir, root, packing=False, budget=args.budgets[0])
        print(f"first stage call (one-time imports and set-up included, not compared): {warm:.2f} s")
        for budget in args.budgets:
            for packing in (False, True):
                name = f"stage {'packed' if packing else 'padded (length-bucketed)'}, budget {budget}"
                results.append((name, stage(model_dir, data_dir, root, packing=packing, budget=budget)))
        base = results[0][1]
        print(f"{'run':58s} {'seconds':>8s} {'tok/s':>9s} {'vs plain':>9s}")
        for name, sec in results:
            print(f"{name:58s} {sec:8.2f} {n_tok / sec:9.0f} {base / sec:8.2f}x")


if __name__ == "__main__":
    main_cli()
