"""`midpo plan`'s memory prediction against measured CPU peak memory (a bench: prints numbers, asserts nothing).

    PYTHONPATH=. python bench/plan_bench.py                 # every configuration of CONFIGS, one JSON line each
    PYTHONPATH=. python bench/plan_bench.py --only z3-2p-padded-m8
    PYTHONPATH=. python bench/plan_bench.py --only 134m-z0-2p-padded-m2 134m-z3-2p-padded-m2 134m-z3livesmall-2p-padded-m2

Method (docs/plan.md): each configuration runs in a fresh process (2 under torchrun for the 2-process ones) with
MALLOC_MMAP_THRESHOLD_=65536, so glibc serves every tensor over 64 KiB from its own mmap and returns it on free:
resident memory then follows live tensor bytes instead of the allocator's retained heap. A process records its
resident set (/proc/self/statm) after importing torch and DeepSpeed and building the batches, then builds the model
and the engine (DeepSpeed, the trainer's resolve_ds_config) and runs `--steps` optimizer steps of
midpo.train.step.train_step (the trainer's own step) on DPO with cached reference log-probs; measured = the
high-water mark of the resident set (getrusage ru_maxrss) minus that baseline, the largest over ranks. The
prediction is midpo.core.plan.memory for the same model shape, settings and micro-batches (peak allocated bytes,
without the CUDA headroom and context).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"bench": dict(vocab=8000, hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=4),
          # about the issue's 119M-parameter Llama (134M here): ZeRO-3's gathered weights against stage 0
          "134m": dict(vocab=32000, hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=12)}
SHAPE = dict(SHAPES["bench"])
LIVE_SMALL = "zero3_cpu_fp32_live_small"  # zero3_cpu_fp32 keeping ~2 layers gathered (max live / reuse 24 hidden^2)
# name: (processes, ds_config, layout, micro, prior network layers or -1[, shape])
CONFIGS = {
    "134m-z0-2p-padded-m2": (2, "zero0_cpu_fp32", "padded", 2, -1, "134m"),
    "134m-z3-2p-padded-m2": (2, "zero3_cpu_fp32", "padded", 2, -1, "134m"),
    "134m-z3livesmall-2p-padded-m2": (2, LIVE_SMALL, "padded", 2, -1, "134m"),
    "z0-1p-padded-m8": (1, "zero0_cpu_fp32", "padded", 8, -1),
    "z0-1p-shared-m8": (1, "zero0_cpu_fp32", "shared", 8, -1),
    "z2-1p-packed-m8": (1, "zero2_cpu_fp32", "packed", 8, -1),
    "z3-1p-padded-m8": (1, "zero3_cpu_fp32", "padded", 8, -1),
    "z3-1p-padded-m16": (1, "zero3_cpu_fp32", "padded", 16, -1),
    "z0-2p-padded-m8": (2, "zero0_cpu_fp32", "padded", 8, -1),
    "z2-2p-padded-m16": (2, "zero2_cpu_fp32", "padded", 16, -1),
    "z3-2p-padded-m8": (2, "zero3_cpu_fp32", "padded", 8, -1),
    "z3-2p-packed-m16": (2, "zero3_cpu_fp32", "packed", 16, -1),
    "z2-1p-padded-m8-prior": (1, "zero2_cpu_fp32", "padded", 8, 2),
}


def ds_path(name: str) -> str:
    """A shipped config name, or LIVE_SMALL written to a temporary file (for the 134m shape)."""
    if name != LIVE_SMALL:
        return name
    from midpo.config import DS_CONFIGS_DIR

    raw = json.loads((DS_CONFIGS_DIR / "zero3_cpu_fp32.json").read_text())
    live = 24 * SHAPES["134m"]["hidden"] ** 2
    raw["zero_optimization"].update(stage3_max_live_parameters=live, stage3_max_reuse_distance=live)
    p = Path(tempfile.gettempdir()) / f"{LIVE_SMALL}.json"
    p.write_text(json.dumps(raw))
    return str(p)


def rows_for(micro: int, steps: int, seed: int = 0) -> list[dict]:
    """Random pairs with long-ish responses: prompt 16-79 tokens, responses 16-191 (EOS included)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(micro * steps):
        p, c, r = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((16, 80), (16, 192), (16, 192)))
        ids = torch.randint(3, SHAPE["vocab"], (p + c + r,), generator=gen).tolist()
        out.append({"id": f"r{i}", "prompt_ids": [1] + ids[:p - 1], "chosen_ids": ids[p:p + c - 1] + [2],
                    "rejected_ids": ids[p + c:p + c + r - 1] + [2]})
    return out


def worker_env() -> dict:
    """The measured child's environment (docs/plan.md's method): tensors over 64 KiB on their own mmap, unmapped on
    free, so the resident set follows live tensor bytes; one thread; this checkout first on the path."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
                PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(a) -> None:
    import deepspeed  # noqa: F401  (imported before the baseline: its import is not training memory)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from midpo.config import load_config
    from midpo.core.batching import collate_pairs
    from midpo.core.logprobs import ResponseLogps
    from midpo.core.priors import build_prior
    from midpo.core.schedule import make_scheduler
    from midpo.runtime import dist as pdist
    from midpo.runtime.ds_config import resolve_ds_config
    from midpo.runtime.engine import Engine, PolicyLogps, policy_logps
    from midpo.train.step import MicroBatch, Objective, train_step

    torch.set_num_threads(1)
    SHAPE.update(SHAPES[a.shape])
    pdist.init_distributed()
    rank, world = pdist.rank(), pdist.world_size()
    rows = rows_for(a.micro, a.steps, seed=rank)
    batches = [collate_pairs(rows[i:i + a.micro], layout=a.layout, pad_id=0,
                             max_row_tokens=512 if a.layout == "packed" else None)
               for i in range(0, len(rows), a.micro)]
    hf = LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
                     num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                     num_key_value_heads=SHAPE["kv_heads"], max_position_embeddings=1024, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    prior_args = []
    init_dir = None
    if a.prior_layers >= 0:
        torch.manual_seed(0)
        init_dir = Path(tempfile.mkdtemp(prefix="plan_bench_"))
        if rank == 0:
            AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa").save_pretrained(init_dir)
        pdist.barrier()
        prior_args = ["loss.prior=learned", f"prior_net.num_layers={a.prior_layers}", "prior_net.zero_stage=2"]
    cfg = load_config(None, ["model.dtype=fp32", f"train.ds_config={ds_path(a.ds_config)}", f"train.micro_batch_size={a.micro}",
                             "train.grad_accum=1", "train.lr=1e-5", "loss.beta=0.1", *prior_args])
    base = rss_bytes()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    ds = resolve_ds_config(cfg, world_size=world, hidden_size=SHAPE["hidden"])
    engine = Engine.build(PolicyLogps(model), ds, lr_scheduler=lambda opt: make_scheduler(opt, 100, 0.0, "constant"))
    prior_net = None
    if a.prior_layers >= 0:
        from midpo.train.prior_engine import build_prior_network

        prior_net = build_prior_network(cfg, init_path=init_dir, policy_config=hf, world_size=world, pad_id=0, beta=0.1)
    obj = Objective(build_prior(cfg.loss), cfg.loss, prior_net=prior_net)
    for i, b in enumerate(batches):
        engine.eval()
        with torch.no_grad():
            ref = policy_logps(engine, b)
        ref = ResponseLogps(ref.chosen, ref.chosen_mask, ref.rejected, ref.rejected_mask)
        engine.train()
        train_step(engine, obj, [MicroBatch(b, ref, None, None, [])], i + 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    got = pdist.gather_objects(peak) if world > 1 else [peak]
    if rank == 0:
        print("RESULT " + json.dumps({"measured_bytes": max(got), "per_rank": got, "ds": ds["zero_optimization"]}))
    pdist.cleanup()


def predict(name: str, steps: int) -> dict:
    from midpo.config import load_config
    from midpo.core import plan as P
    from midpo.runtime.planning import ds_template, settings_from

    procs, ds_name, layout, micro, prior, *rest = CONFIGS[name]
    SHAPE.update(SHAPES[rest[0] if rest else "bench"])
    shape = P.ModelShape(**SHAPE)
    extra = ["loss.prior=learned", f"prior_net.num_layers={prior}", "prior_net.zero_stage=2"] if prior >= 0 else []
    cfg = load_config(None, ["model.dtype=fp32", f"train.ds_config={ds_name}", f"train.micro_batch_size={micro}",
                             f"train.packing={str(layout == 'packed').lower()}",
                             f"train.share_prompt={str(layout == 'shared').lower()}", *extra])
    s = settings_from(cfg, ds_template(ds_path(ds_name), cuda=False), world=procs, attn="sdpa", dtype="fp32", cuda=False,
                      hidden=shape.hidden)
    worst = None
    for rank in range(procs):
        rows = rows_for(micro, steps, seed=rank)
        lengths = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
        m = P.memory(shape, s, P.widest(P.micro_batches(lengths, micro, layout, s.row_tokens)))
        worst = m if worst is None or m.peak > worst.peak else worst
    return {"predicted_bytes": worst.peak, "terms_mib": {k: round(v / 2 ** 20, 1) for k, v in worst.terms.items()}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ds-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layout", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--micro", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--prior-layers", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="bench", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    env = worker_env()
    for name in a.only or [c for c in CONFIGS if not c.startswith("134m")]:
        procs, ds_name, layout, micro, prior, *rest = CONFIGS[name]
        args = [__file__, "--worker", "--ds-config", ds_name, "--layout", layout, "--micro", str(micro),
                "--prior-layers", str(prior), "--steps", str(a.steps), "--shape", rest[0] if rest else "bench"]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                str(29500 + os.getpid() % 1000)] if procs > 1 else [sys.executable]) + args
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(json.dumps({"config": name, "error": out.stderr[-2000:]}))
            continue
        res = json.loads(line[len("RESULT "):])
        pred = predict(name, a.steps)
        m, p = res["measured_bytes"], pred["predicted_bytes"]
        print(json.dumps({"config": name, "measured_mib": round(m / 2 ** 20, 1), "predicted_mib": round(p / 2 ** 20, 1),
                          "error": round(p / m - 1, 3), "per_rank_mib": [round(x / 2 ** 20, 1) for x in res["per_rank"]],
                          **pred}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
