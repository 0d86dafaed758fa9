"""One short CUDA check of the training path at ~1B parameters (never a CI dependency).

    PYTHONPATH=. python bench/gpu_check.py                       # ~1.1B Llama (TinyLlama shape), bf16, flash-attn
    PYTHONPATH=. python bench/gpu_check.py --layers 4 --steps 5  # quicker smoke run

What it checks, in one process on one GPU (world size 1, NCCL; the ZeRO-3 engine is the one training uses):
1. packing equivalence in bf16 + flash_attention_2: per-token response log-probs of a packed batch
   (position_ids only; flash-attn varlen) == the padded batch (tolerance: mean |diff| < 2e-2, max < 0.25,
   bf16 rounding), and sequences in a packed row are isolated (changing sequence 0 leaves sequence 1's
   log-probs unchanged within 1e-3);
2. step 0 == ln 2: "cached" reference log-probs taken from the same engine, no grad, then the DPO loss of
   the first training micro-batch must be ln 2 (the policy/reference same-code-path property);
3. throughput and MFU of ZeRO-3 bf16 training steps (DPO from cached reference log-probs), for the packed
   layout as training packs it (rows capped by `row_tokens_for`) and for the padded layout:
   model FLOPs (midpo.runtime.metrics.train_flops_per_token) / time / peak, against both a measured bf16 GEMM
   peak and the nominal dense bf16 peak given by --nominal-peak (H100 SXM: 989e12);
4. with --prior-layers K: MI-DPO proper (loss.prior=learned, the marginal objective, a prior network of the
   policy's first K layers on its own ZeRO-3 engine, updated every step) on the same packed batches as the
   DPO timing: step time learned / dpo (issue goal <= 1.15 with a quarter of the layers).
Every timed step is midpo.train.step.train_step, the trainer's own step function.
Prints one JSON object; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_rows(n: int, vocab: int, gen: torch.Generator, prompt=(64, 160), resp=(96, 256)) -> list[dict]:
    def seq(lo, hi, eos):
        k = int(torch.randint(lo, hi, (1,), generator=gen))
        body = torch.randint(3, vocab, (k,), generator=gen).tolist()
        return body + [2] if eos else [1] + body

    return [{"id": f"r{i}", "prompt_ids": seq(*prompt, False), "chosen_ids": seq(*resp, True),
             "rejected_ids": seq(*resp, True)} for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--micro", type=int, default=8, help="pairs per micro-batch")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after 2 warm-up steps)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--layouts", default="packed,padded", help="layouts to time (comma-separated)")
    ap.add_argument("--prior-layers", type=int, default=0, help="also time MI-DPO with a prior of K layers")
    ap.add_argument("--nominal-peak", type=float, default=989e12, help="dense bf16 FLOP/s of the GPU")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # logic check on CPU, fp32, tiny
    a = ap.parse_args()
    if not torch.cuda.is_available() and not a.cpu_smoke:
        print("gpu_check needs CUDA", file=sys.stderr)
        return 2
    dtype, ds_name = (torch.float32, "zero3_cpu_fp32") if a.cpu_smoke else (torch.bfloat16, "zero3_bf16")

    import warnings

    from transformers import AutoModelForCausalLM, LlamaConfig

    from midpo.config import load_config
    from midpo.core.batching import collate_pairs, row_tokens_for
    from midpo.core.flops import flop_params, train_flops
    from midpo.core.logprobs import ResponseLogps
    from midpo.core.priors import build_prior
    from midpo.core.schedule import make_scheduler
    from midpo.runtime import dist as pdist
    from midpo.runtime.ds_config import ds_config_path, resolve_ds_config
    from midpo.runtime.engine import Engine, PolicyLogps, policy_logps
    from midpo.runtime.metrics import measure_peak_flops
    from midpo.runtime.models import resolve_attn
    from midpo.train.step import Objective

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    pdist.init_distributed()
    dev = pdist.device()
    attn = resolve_attn("auto")
    report: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)",
                    "attn_implementation": attn, "ok": True}
    if attn != "flash_attention_2":
        report["warning"] = "flash-attn not installed (pip install midpo[gpu]): packing runs through sdpa + 4-D mask"

    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                     num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                     max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(hf, attn_implementation=attn, dtype=dtype)
    model.config.use_cache = False
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    report["params"] = n_params
    if a.prior_layers:
        # the prior network loads its first K layers from a model folder, as in training (before ZeRO-3 partitions)
        ref_dir = Path(tempfile.mkdtemp(prefix="gpu_check_ref_"))
        model.save_pretrained(ref_dir, safe_serialization=True)

    # torch's AdamW for the policy and the prior engine: FusedAdam's JIT build (nvcc) costs minutes of a short check
    ds_json = json.loads(ds_config_path(ds_name).read_text())
    ds_json["optimizer"]["params"]["torch_adam"] = True
    ds_file = Path(tempfile.mkdtemp(prefix="gpu_check_ds_")) / f"{ds_name}_torch_adam.json"
    ds_file.write_text(json.dumps(ds_json))
    cfg = load_config(None, [f"model.dtype={'fp32' if a.cpu_smoke else 'bf16'}", f"train.ds_config={ds_file}",
                             f"train.micro_batch_size={a.micro}", "train.grad_accum=1", "train.lr=1e-5",
                             f"train.max_steps={a.steps + 2}"])
    ds = resolve_ds_config(cfg, world_size=1, hidden_size=a.hidden)
    engine = Engine.build(PolicyLogps(model), ds,
                          lr_scheduler=lambda opt: make_scheduler(opt, a.steps + 2, 0.0, "constant"))
    gen = torch.Generator().manual_seed(0)

    # --- 1. packing equivalence (bf16 + flash) and isolation ---
    rows = random_rows(4, a.vocab, gen)
    engine.eval()
    with torch.no_grad():
        packed = policy_logps(engine, collate_pairs(rows, layout="packed", pad_id=0).to(dev))
        padded = policy_logps(engine, collate_pairs(rows, layout="padded", pad_id=0).to(dev))
        diffs = torch.cat([(packed.chosen - padded.chosen).abs()[packed.chosen_mask],
                           (packed.rejected - padded.rejected).abs()[packed.rejected_mask]]).double()
        changed = [dict(rows[0], chosen_ids=[(t * 7 + 3) % (a.vocab - 3) + 3 for t in rows[0]["chosen_ids"][:-1]]
                        + [2])] + rows[1:]
        iso = policy_logps(engine, collate_pairs(changed, layout="packed", pad_id=0).to(dev))
        iso_diff = (iso.chosen[1:] - packed.chosen[1:]).abs()[packed.chosen_mask[1:]].max().item()
    report["packing"] = {"mean_abs_diff": diffs.mean().item(), "max_abs_diff": diffs.max().item(),
                         "isolation_max_diff": iso_diff}
    if not (diffs.mean() < 2e-2 and diffs.max() < 0.25 and iso_diff < 1e-3):
        report["ok"] = False

    # --- 2./3. step 0 == ln 2 with "cached" reference log-probs from the same engine, then timed ZeRO-3 steps.
    # Timed per layout: "packed" as training packs (rows capped by row_tokens_for: one row under flash-attn,
    # DENSE_MASK_ROW_TOKENS under sdpa's 4-D mask) and "padded" (2B rows, sdpa's own causal kernels).
    cfg_loss = load_config(None, ["loss.prior=dpo", "loss.beta=0.1"]).loss
    dpo = Objective(build_prior(cfg_loss), cfg_loss)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    body_n, head_n = flop_params(model)
    measured_peak = measure_peak_flops(dtype, dev, n=1024 if a.cpu_smoke else 8192, seconds=2.0)
    report["measured_bf16_peak"] = measured_peak
    row_tokens = row_tokens_for(engine)
    report["packed_row_tokens"] = row_tokens
    dpo_batches = {}
    for layout in a.layouts.split(","):
        batches = []
        for _ in range(a.steps + 2):
            r = random_rows(a.micro, a.vocab, gen)
            b = collate_pairs(r, layout=layout, pad_id=0, max_row_tokens=row_tokens if layout == "packed" else None)
            b = b.to(dev)
            engine.eval()
            with torch.no_grad():
                ref = policy_logps(engine, b)
            batches.append((b, ResponseLogps(ref.chosen.float(), ref.chosen_mask, ref.rejected.float(),
                                             ref.rejected_mask)))
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        times, tokens, logit_tokens, attn_ctx, first_loss = dpo_steps(engine, batches, dpo, sync)
        dpo_batches[layout] = batches
        report[f"step0_loss_{layout}"] = first_loss  # references are re-scored by the current policy: ln 2 both
        if not abs(first_loss - math.log(2)) < 1e-3:
            report["ok"] = False
        dt, tok = sum(times), sum(tokens)
        flops = train_flops(body_n, head_n, a.layers, a.hidden, tok, logit_tokens, attn_ctx)
        report[f"throughput_{layout}"] = {
            "pairs_per_s": a.micro * len(times) / dt, "tokens_per_s": tok / dt, "step_s": dt / len(times),
            "mfu_vs_measured": flops / dt / measured_peak, "mfu_vs_nominal": flops / dt / a.nominal_peak,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "step_s_each": [round(t, 4) for t in times],
        }
    if a.prior_layers:
        layout = "packed" if "packed" in dpo_batches else next(iter(dpo_batches))
        try:
            mi = report["mi_dpo"] = time_mi_dpo(a, engine, cfg, hf, ref_dir, dpo_batches[layout], sync)
            # DPO again on the same batches after MI-DPO: the first DPO timing includes the process's warm-up
            # (allocator growth, kernel selection), which would flatter MI-DPO; the ratio uses both DPO timings.
            after = dpo_steps(engine, dpo_batches[layout], dpo, sync)[0]
            before = report[f"throughput_{layout}"]["step_s"]
            mi["dpo_after_step_s"] = sum(after) / len(after)
            mi["dpo_after_step_s_each"] = [round(t, 4) for t in after]
            mi["step_ratio_vs_dpo_before"] = mi["step_s"] / before
            mi["step_ratio_vs_dpo_after"] = mi["step_s"] / mi["dpo_after_step_s"]
            mi["layout"] = layout
        except Exception as e:  # keep the DPO numbers of a short device run
            report["mi_dpo"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            report["ok"] = False
    print(json.dumps(report, indent=1))
    pdist.cleanup()
    return 0 if report["ok"] else 1


def timed_steps(engine, obj, batches: list, sync) -> tuple[list[float], float]:
    """One optimizer step (midpo.train.step.train_step, the trainer's own) per batch -> (seconds of each step after
    the first 2, the first step's loss). The device is synchronized around every step."""
    from midpo.train.step import MicroBatch, train_step

    engine.train()
    times, first_loss = [], None
    for i, (b, ref) in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        res = train_step(engine, obj, [MicroBatch(b, ref, None, None, [])], i + 1)
        sync()
        if i == 0:
            total, count = res.sums["loss"]
            first_loss = total / count
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return times, first_loss


def dpo_steps(engine, batches: list, obj, sync) -> tuple[list[float], list[int], int, float, float]:
    """DPO training steps from the batches' "cached" reference log-probs -> (seconds of each step after the
    first 2, real tokens of those steps, their response (logit) tokens, their attention context
    (PairBatch.attention_context), the first step's loss)."""
    times, first_loss = timed_steps(engine, obj, batches, sync)
    timed = [b for b, _ in batches[2:]]
    tokens = [int(b.seq_lens.sum()) for b in timed]  # real tokens: padding is not work done
    logit_tokens = sum(b.target_index.numel() for b in timed)
    return times, tokens, logit_tokens, sum(b.attention_context for b in timed), first_loss


def time_mi_dpo(a, engine, cfg, hf, ref_dir: Path, batches: list, sync) -> dict:
    """Training steps of loss.prior=learned on `batches` (the DPO timing's), as the trainer runs them: the policy
    and the prior network (its first K layers, on its own ZeRO-3 engine, updated every step) in train_step."""
    import dataclasses

    from midpo.config import load_config
    from midpo.core.priors import build_prior
    from midpo.train.prior_engine import build_prior_network
    from midpo.train.step import Objective

    lcfg = load_config(None, ["loss.prior=learned", "loss.beta=0.1", f"prior_net.num_layers={a.prior_layers}"])
    cfg = dataclasses.replace(cfg, prior_net=lcfg.prior_net)
    prior_net = build_prior_network(cfg, init_path=ref_dir, policy_config=hf, world_size=1, pad_id=0, beta=0.1)
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    times, first_loss = timed_steps(engine, Objective(build_prior(lcfg.loss), lcfg.loss, prior_net=prior_net),
                                    batches, sync)
    return {"prior_layers": a.prior_layers, "objective": cfg.prior_net.objective, "step0_loss": first_loss,
            "step_s": sum(times) / len(times), "step_s_each": [round(t, 4) for t in times],
            "pairs_per_s": a.micro * len(times) / sum(times),
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


if __name__ == "__main__":
    sys.exit(main())
