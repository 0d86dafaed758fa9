"""`midpo plan`: will a recipe fit, how fast will it run, and what to change -- before a job is submitted.

    midpo plan --config RECIPE [--gpus-per-node 8 --nodes 1 --gpu-mem 80 --host-mem GiB --gpu 989 --interconnect GBps] [--json]
    midpo plan --config RECIPE --model-config path/to/config.json    # a model not downloaded yet

Per device: peak memory term by term (weights, gradients, optimizer states under the ZeRO stage and offload,
activations for the layout and lengths, the head's logits chunk, the prior network, DeepSpeed buckets, the
allocator headroom and CUDA context) and a step-time estimate (model FLOPs at an assumed efficiency, collectives
per ZeRO stage over the interconnect), for the recipe as written and for the best settings that reach the same
global batch (ZeRO stage, optimizer offload, activation checkpointing, micro-batch x accumulation, layout).
Lengths come from the prepared train split (`<run_dir>/data`) when it exists, else the recipe's maximum.
The arithmetic and its assumptions: midpo/core/plan.py; calibration: docs/plan.md. No torch import, no device.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from midpo.config import load_config
from midpo.core import plan as P
from midpo.runtime.planning import ds_template, plan_inputs, resolve_auto, settings_from, shipped_ds_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="recipe (YAML path or name in recipes/); none: the defaults")
    p.add_argument("--gpus-per-node", type=int, default=8, help="devices per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="device memory, GiB (default 80)")
    p.add_argument("--gpu", type=float, default=989.0, help="dense bf16 peak TFLOP/s per device (H100 SXM: 989)")
    p.add_argument("--interconnect", type=float, default=0.0,
                   help="collective bandwidth per device, GB/s (default 150 in one node, 25 across nodes)")
    p.add_argument("--efficiency", type=float, default=0.4, help="achieved fraction of peak (default 0.4)")
    p.add_argument("--host-mem", type=float, default=0.0,
                   help="host memory per node, GiB: a setting fits only when its host need does too (loading, "
                   "an offloaded optimizer); default 0: the need is shown, not checked")
    p.add_argument("--attn", default=None, choices=("flash_attention_2", "sdpa", "eager"),
                   help="attention kernel (default: model.attn_implementation; auto = flash_attention_2)")
    p.add_argument("--model-config", default=None, help="a HF config.json (or its folder) instead of the policy's")
    p.add_argument("--global-batch", type=int, default=None,
                   help="pairs per optimizer step (default: the recipe's micro x accum x devices)")
    p.add_argument("--top", type=int, default=8, help="alternative settings listed (default 8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def make_plan(cfg, hw: P.Hardware, *, attn: str | None = None, model_config: Any = None,
              global_batch: int | None = None, top: int = 8) -> dict:
    """The plan as a JSON-able dict: inputs, the recipe as written, the best settings found."""
    inp = plan_inputs(cfg, model_config)
    shape, lengths = inp["shape"], inp["lengths"]
    attn = attn or ("flash_attention_2" if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation)
    dtype = "bf16" if cfg.model.dtype == "auto" else cfg.model.dtype
    asked = cfg.train.ds_config
    # train.layout / train.ds_config `auto`: chosen as the trainer would on these devices (--gpu-mem free each)
    cfg, picks = resolve_auto(cfg, shape, lengths, world=hw.world, attn=attn, dtype=dtype, cuda=True,
                              device_gib=hw.gpu_mem_gib, memory_source="--gpu-mem",
                              host_gib=hw.host_mem_gib or None, ranks_per_node=hw.gpus_per_node,
                              host_source="--host-mem")
    ds = ds_template(cfg.train.ds_config, cuda=True)
    base = settings_from(cfg, ds, world=hw.world, attn=attn, dtype=dtype, cuda=True, hidden=shape.hidden)
    written = P.evaluate(shape, base, lengths, hw)
    gb = global_batch or base.micro * base.grad_accum * base.data_parallel
    layouts = ("packed", "padded") if "flash" in attn else ("packed", "padded", "shared")
    if base.layout not in layouts:
        layouts = (*layouts, base.layout)
    found = P.search(shape, base, lengths, hw, gb, layouts)
    notes = [f"model: {inp['shape_source']} ({shape.params() / 1e9:.3f}B parameters)",
             f"lengths: {inp['lengths_source']}",
             f"attention: {attn}; dtype {dtype}; ds_config {cfg.train.ds_config}"
             + (" (auto)" if asked == "auto" else "") + f"; layout {cfg.train.layout}",
             *[f"auto: {k}={p['value']}: {p['reason']}" for k, p in picks.items()],
             "time assumes model FLOPs at --efficiency of --gpu peak; collectives overlap compute under "
             "overlap_comm (only the excess is added); the optimizer offload's host Adam and PCIe copies add in full",
             f"a setting fits when peak x {1 + P.ALLOCATOR_HEADROOM:.2f} + {P.CUDA_CONTEXT_GIB} GiB <= --gpu-mem"
             + (f" and its host memory per node <= --host-mem {hw.host_mem_gib:g} GiB" if hw.host_mem_gib else
                "; host memory per node (x" + f"{P.HOST_BUFFER_FACTOR:g}, DeepSpeed's estimate's buffer factor) is "
                "shown, not checked: pass --host-mem")]
    return {"hardware": {"gpus_per_node": hw.gpus_per_node, "nodes": hw.nodes, "gpu_mem_gib": hw.gpu_mem_gib,
                         "host_mem_gib": hw.host_mem_gib,
                         "peak_tflops": hw.peak_tflops, "interconnect_gbps": hw.bandwidth / 1e9,
                         "efficiency": hw.efficiency},
            "global_batch": gb, "notes": notes, "as_written": written.to_json(),
            "best": [p.to_json() for p in found[:top]],
            "auto": picks,
            "suggested_overrides": overrides_for(found[0], base, dtype, legacy_layout=cfg.train.packing is not None
                                                 or cfg.train.share_prompt is not None)
            if found and found[0].fits else []}


def overrides_for(best: P.Plan, base: P.Settings, dtype: str = "bf16", legacy_layout: bool = False) -> list[str]:
    """`key=value` overrides that turn the recipe into the best plan's settings (`legacy_layout`: the recipe sets
    train.packing / train.share_prompt, so the layout is said in those)."""
    s, out = best.settings, []
    if s.zero_stage != base.zero_stage or s.offload_optimizer != base.offload_optimizer:
        out.append(f"train.ds_config={shipped_ds_config(s.zero_stage, s.offload_optimizer, dtype)}")
    if s.token_budget != base.token_budget:
        out.append(f"train.micro_batch_tokens={s.token_budget}")
    if s.micro != base.micro:
        out.append(f"train.micro_batch_size={s.micro}")
    if s.grad_accum != base.grad_accum:
        out.append(f"train.grad_accum={s.grad_accum}")
    if s.checkpointing != base.checkpointing:
        out.append(f"model.gradient_checkpointing={str(s.checkpointing).lower()}")
    if s.layout != base.layout and legacy_layout:
        if base.layout == "shared":
            out.append("train.share_prompt=false")
        out.append("train.share_prompt=true" if s.layout == "shared" else f"train.packing={str(s.layout == 'packed').lower()}")
    elif s.layout != base.layout:
        out.append(f"train.layout={s.layout}")
    return out


def render(plan: dict) -> str:
    hw = plan["hardware"]
    lines = [f"midpo plan: {hw['nodes']} node(s) x {hw['gpus_per_node']} devices, {hw['gpu_mem_gib']:g} GiB, "
             f"{hw['peak_tflops']:g} TFLOP/s at {hw['efficiency']:.0%}, {hw['interconnect_gbps']:g} GB/s; "
             f"global batch {plan['global_batch']} pairs"]
    lines += [f"  {n}" for n in plan["notes"]]
    w = plan["as_written"]
    lines += ["", f"as written ({_desc(w)}): {'FITS' if w['fits'] else 'DOES NOT FIT'} -- peak allocated "
              f"{w['peak_allocated_gib']:.1f} GiB, needs {w['needed_gib']:.1f} GiB; step {w['time']['step_s']:.3f} s, "
              f"{w['time']['pairs_per_s']:.1f} pairs/s; host {w['host_needed_gib']:.1f} GiB per node"]
    lines += [f"    {k:<32} {v:8.2f} GiB" for k, v in w["terms_gib"].items()]
    lines += [f"    {k:<32} {v:8.2f} GiB per node" for k, v in w["host_terms_gib"].items()]
    lines += ["", "best settings for the same global batch (fitting first, fastest first):",
              f"  {'stage':>5} {'offload':>7} {'ckpt':>5} {'layout':>7} {'micro':>5} {'accum':>5} {'tokens':>7} "
              f"{'steps':>5} {'needs GiB':>9} {'host GiB':>8} {'fits':>4} {'step s':>8} {'pairs/s':>8}"]
    for b in plan["best"]:
        s = b["settings"]
        lines.append(f"  {s['zero_stage']:>5} {str(s['offload_optimizer']):>7} {str(s['checkpointing']):>5} "
                     f"{s['layout']:>7} {s['micro']:>5} {s['grad_accum']:>5} {s['token_budget'] or '-':>7} "
                     f"{b['time']['micro_steps']:>5.1f} {b['needed_gib']:>9.1f} {b['host_needed_gib']:>8.0f} "
                     f"{'yes' if b['fits'] else 'no':>4} {b['time']['step_s']:>8.3f} {b['time']['pairs_per_s']:>8.1f}")
    if plan["suggested_overrides"]:
        lines += ["", "to run the best: " + " ".join(plan["suggested_overrides"])]
    return "\n".join(lines)


def _desc(p: dict) -> str:
    s = p["settings"]
    budget = f", token budget {s['token_budget']}" if s["token_budget"] else ""
    return (f"ZeRO {s['zero_stage']}{' + offload' if s['offload_optimizer'] else ''}, {s['layout']}, micro "
            f"{s['micro']} x accum {s['grad_accum']}{budget}{', checkpointing' if s['checkpointing'] else ''}")


def run(args) -> int:
    cfg = load_config(args.config, list(getattr(args, "overrides", []) or []))
    hw = P.Hardware(gpus_per_node=args.gpus_per_node, nodes=args.nodes, gpu_mem_gib=args.gpu_mem,
                    peak_tflops=args.gpu, interconnect_gbps=args.interconnect, efficiency=args.efficiency,
                    host_mem_gib=args.host_mem)
    plan = make_plan(cfg, hw, attn=args.attn, model_config=args.model_config, global_batch=args.global_batch,
                     top=args.top)
    print(json.dumps(plan, indent=1) if args.json else render(plan))
    return 0


def main(argv: list[str] | None = None) -> int:
    from midpo.runtime.launch import stage_cli

    return stage_cli("plan", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
