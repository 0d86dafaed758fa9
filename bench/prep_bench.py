"""Stage-1 throughput and memory: tokens/s and peak RSS of `prepare` at growing input sizes, against a plain
`datasets.map` tokenization of the same rows with the same tokenizer.

    PYTHONPATH=. python bench/prep_bench.py [--sizes 20000 200000] [--num-proc 1] [--work DIR]

Prints numbers; not a test. Each size runs in a fresh subprocess so its peak RSS (ru_maxrss) is its
own. Throughput is compared in CPU seconds (user + system, all threads, from the start of each timed part) as well as
wall seconds: on a shared machine the wall clock measures the neighbours as much as the code. Goals: peak RSS at 200k rows within 1.5x of 20k (memory flat as the input grows); prep's throughput at
least the baseline's (>= 1.0x). The baseline is what a TRL-style script does and nothing more: load the JSON lines
with `datasets`, then `map` (batched, same num_proc) the chat template over prompt, prompt+chosen and
prompt+rejected and tokenize the three texts; no validation, no rejects, no boundary check, no dedup, no shards.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak across fork+exec into
    it, so a child of a parent that holds torch would report the parent's size whatever the child does."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is


def child(pairs: str, tok: str, out: str, num_proc: int) -> None:
    from midpo.config import DataConfig
    from midpo.data.prepare import prepare

    cfg = DataConfig(max_prompt_tokens=96, max_length=160, eval_fraction=0.05, num_proc=num_proc, shard_rows=50_000)
    t0, c0 = time.perf_counter(), cpu_s()
    m = prepare(cfg, [pairs], tok, out, force=True)  # a kept output from an earlier run is rebuilt, not skipped
    dt = time.perf_counter() - t0
    toks = sum(sum(s["tokens"].values()) for s in m["splits"].values())
    # spawned workers reported separately (the largest one; ru_maxrss is KiB on Linux)
    kids_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"rows": m["rows"]["read"], "kept": m["rows"]["kept"], "seconds": dt, "tokens": toks,
                      "cpu_s": cpu_s() - c0,
                      "peak_rss_mib": peak_rss_mib(), "worker_peak_rss_mib": kids_kib / 1024}))


def baseline(pairs: str, tok_dir: str, cache: str, num_proc: int) -> None:
    t0, c0 = time.perf_counter(), cpu_s()  # from the imports on, as the prep child (which loads transformers inside prepare)
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ds = datasets.load_dataset("json", data_files=pairs, split="train", cache_dir=cache)

    def tokenize(batch):
        p, c, r = [], [], []
        for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
            msgs = [{"role": "user", "content": prompt}]
            p.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
            c.append(tok.apply_chat_template(msgs + [{"role": "assistant", "content": chosen}], tokenize=False))
            r.append(tok.apply_chat_template(msgs + [{"role": "assistant", "content": rejected}], tokenize=False))
        enc = lambda texts: tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]  # noqa: E731
        return {"prompt_ids": enc(p), "chosen_ids": enc(c), "rejected_ids": enc(r)}

    out = ds.map(tokenize, batched=True, batch_size=512, num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=ds.column_names)
    dt = time.perf_counter() - t0
    print(json.dumps({"rows": len(out), "seconds": dt, "cpu_s": cpu_s() - c0, "peak_rss_mib": peak_rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--num-proc", type=int, default=1)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--no-baseline", action="store_true", help="skip the datasets.map comparison")
    args = ap.parse_args()
    if args.child:
        child(*args.child[:3], int(args.child[3]))
        return
    if args.baseline:
        baseline(*args.baseline[:3], int(args.baseline[3]))
        return

    from midpo.config import SynthConfig
    from midpo.demo.synthetic import build_tiny_default
    from midpo.demo.task import generate_pairs

    work = Path(args.work or tempfile.mkdtemp(prefix="prep_bench_"))
    paths = build_tiny_default(work / "synth", SynthConfig(n_pairs=2000))
    results = []
    for n in args.sizes:
        pairs = work / f"pairs_{n}.jsonl"
        if not pairs.exists():
            with open(pairs, "w", encoding="utf-8") as f:  # streamed: the parent stays small too
                for row in generate_pairs(n, seed=n, tasks=["sort", "reverse", "dedupe"], min_items=3, max_items=8):
                    f.write(json.dumps(row) + "\n")
        out = work / f"data_{n}"
        cmd = [sys.executable, __file__, "--child", str(pairs), str(paths["model"]), str(out), str(args.num_proc)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["rows_per_s"] = r["rows"] / r["seconds"]
        results.append(r)
        print(f"{n:>8} rows  {r['seconds']:7.1f} s ({r['cpu_s']:.1f} CPU s)  {r['rows_per_s']:8.0f} rows/s  "
              f"{r['tokens_per_s']:9.0f} tokens/s  "
              f"peak RSS {r['peak_rss_mib']:7.1f} MiB (workers {r['worker_peak_rss_mib']:.1f} MiB)", flush=True)
        if not args.no_baseline:
            cmd = [sys.executable, __file__, "--baseline", str(pairs), str(paths["model"]), str(work / f"hf_cache_{n}"),
                   str(args.num_proc)]
            b = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            ratio, cpu_ratio = b["seconds"] / r["seconds"], b["cpu_s"] / r["cpu_s"]
            print(f"{'':>8} datasets.map baseline {b['seconds']:7.1f} s ({b['cpu_s']:.1f} CPU s, peak RSS "
                  f"{b['peak_rss_mib']:.1f} MiB): prep throughput {cpu_ratio:.2f}x the baseline in CPU time, "
                  f"{ratio:.2f}x in wall time (goal >= 1.0x): {'OK' if cpu_ratio >= 1.0 else 'MISSED'}", flush=True)
    if len(results) >= 2:
        ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
        print(f"peak RSS ratio {args.sizes[-1]} / {args.sizes[0]} rows: {ratio:.2f}x (goal <= 1.5x): "
              f"{'OK' if ratio <= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
