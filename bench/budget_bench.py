"""Fixed-count vs token-budget micro-batches (train.micro_batch_tokens) on long-tailed lengths, in one invocation:
peak memory (measured as bench/plan_bench.py measures it, and predicted by midpo plan) and pairs/s.

    PYTHONPATH=. python bench/budget_bench.py [--steps 6] [--budget 4096]

Both runs: the bench model of plan_bench.py, stage 0 fp32, 1 process, padded layout, global batch 16 pairs per step
(fixed: micro 16 x accum 1; budget: 16 pairs cut to --budget tokens, the loss normalized over the 16), the same
rows in the same order: 90% short pairs (prompt 16-48, responses 16-64 tokens), 10% long (prompt 64-128, responses
256-448). pairs/s: pairs / time of the steps after the first (one warm-up step).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from plan_bench import SHAPE, rss_bytes, worker_env  # noqa: E402

GLOBAL = 16


def long_tail_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        long = rng.random() < 0.1
        p = rng.randint(64, 128) if long else rng.randint(16, 48)
        c, r = ((rng.randint(256, 448), rng.randint(256, 448)) if long else (rng.randint(16, 64), rng.randint(16, 64)))
        ids = [rng.randint(3, SHAPE["vocab"] - 1) for _ in range(p + c + r)]
        out.append({"id": f"r{i}", "prompt_ids": [1] + ids[:p - 1], "chosen_ids": ids[p:p + c - 1] + [2],
                    "rejected_ids": ids[p + c:p + c + r - 1] + [2]})
    return out


def worker(a) -> None:
    import deepspeed  # noqa: F401  (before the baseline)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from midpo.config import load_config
    from midpo.core.batching import collate_pairs
    from midpo.core.budget import fill_to_budget
    from midpo.core.logprobs import ResponseLogps
    from midpo.core.priors import build_prior
    from midpo.core.schedule import make_scheduler
    from midpo.runtime import dist as pdist
    from midpo.runtime.ds_config import resolve_ds_config
    from midpo.runtime.engine import Engine, PolicyLogps, policy_logps
    from midpo.train.step import MicroBatch, Objective, train_step

    torch.set_num_threads(1)
    pdist.init_distributed()
    rows = long_tail_rows(GLOBAL * a.steps)
    steps = []
    for s in range(a.steps):
        chunk = rows[s * GLOBAL:(s + 1) * GLOBAL]
        if a.budget:
            lens = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in chunk]
            groups = [[chunk[i] for i in g] for g in fill_to_budget(lens, a.budget, "padded")]
        else:
            groups = [chunk]
        steps.append([collate_pairs(g, layout="padded", pad_id=0) for g in groups])
    hf = LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
                     num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                     num_key_value_heads=SHAPE["kv_heads"], max_position_embeddings=1024, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    cfg = load_config(None, ["model.dtype=fp32", "train.ds_config=zero0_cpu_fp32", f"train.micro_batch_size={GLOBAL}",
                             "train.grad_accum=1", "train.lr=1e-5", "loss.beta=0.1"])
    obj = Objective(build_prior(cfg.loss), cfg.loss)
    base = rss_bytes()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    engine = Engine.build(PolicyLogps(model), resolve_ds_config(cfg, world_size=1, hidden_size=SHAPE["hidden"]),
                          lr_scheduler=lambda opt: make_scheduler(opt, 100, 0.0, "constant"))
    times = []
    for i, batches in enumerate(steps):
        mbs = []
        engine.eval()
        with torch.no_grad():
            for b in batches:
                r = policy_logps(engine, b)
                mbs.append(MicroBatch(b, ResponseLogps(r.chosen, r.chosen_mask, r.rejected, r.rejected_mask), None,
                                      None, []))
        engine.train()
        t0 = time.perf_counter()
        train_step(engine, obj, mbs, i + 1, global_pairs=GLOBAL if a.budget else 0)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print("RESULT " + json.dumps({"measured_bytes": peak, "pairs_per_s": GLOBAL * (len(times) - 1) / sum(times[1:]),
                                  "micro_steps": [len(b) for b in steps]}))
    pdist.cleanup()


def predict(budget: int, steps: int) -> float:
    from midpo.core import plan as P

    rows = long_tail_rows(GLOBAL * steps)
    lengths = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    s = P.Settings(world=1, zero_stage=0, dtype_bytes=4, micro=GLOBAL, grad_accum=1, layout="padded",
                   token_budget=budget, cuda=False, reduce_bucket=0, max_live_parameters=0)
    return P.memory(P.ModelShape(**SHAPE), s, P.widest([b for st in P.rank_steps(lengths, s) for b in st])).peak


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    env = worker_env()
    results = {}
    for name, budget in (("fixed 16 pairs", 0), (f"budget {a.budget} tokens", a.budget)):
        out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(a.steps), "--budget", str(budget)],
                             env=env, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(json.dumps({"run": name, "error": out.stderr[-2000:]}))
            return 1
        r = json.loads(line[len("RESULT "):])
        r["predicted_bytes"] = predict(budget, a.steps)
        results[name] = r
        print(json.dumps({"run": name, "measured_peak_mib": round(r["measured_bytes"] / 2 ** 20, 1),
                          "predicted_peak_mib": round(r["predicted_bytes"] / 2 ** 20, 1),
                          "pairs_per_s": round(r["pairs_per_s"], 2), "micro_steps": r["micro_steps"]}), flush=True)
    f, b = results.values()
    print(json.dumps({"peak_ratio_budget_over_fixed": round(b["measured_bytes"] / f["measured_bytes"], 3),
                      "pairs_per_s_ratio_budget_over_fixed": round(b["pairs_per_s"] / f["pairs_per_s"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
