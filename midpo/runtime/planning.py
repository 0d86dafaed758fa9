"""What the planner (midpo.core.plan) needs from a run: the model's shape, the prepared data's lengths and the
settings a recipe resolves to (ZeRO stage, buckets, layout, prior network). `midpo plan` and the trainer's
start-of-run prediction read them here, so both predict the same run the same way."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

from midpo.config import DS_CONFIGS_DIR, Config, ConfigError
from midpo.core.auto import Pick, choose_layout, choose_zero
from midpo.core.plan import GIB, ModelShape, Settings, lora_targets

MIN_BUCKET = 2 ** 24  # runtime.ds_config's floor of the "auto" bucket sizes (kept equal by a test)
SAMPLE_PAIRS = 8192  # pairs of the train split the planner lays into micro-batches (shuffled, seeded)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def model_shape(cfg: Config, policy: Path, model_config: str | Path | None = None) -> tuple[ModelShape, str]:
    """The policy's shape and where it came from: `model_config` (a config.json or a folder holding one), else
    the policy folder's config.json, else (the embedded default before `midpo synth`) the synth section."""
    for cand in ([Path(model_config)] if model_config else []) + [policy]:
        f = cand / "config.json" if cand.is_dir() else cand
        if f.is_file():
            return ModelShape.from_hf(json.loads(f.read_text())), str(f)
        if model_config:
            raise ConfigError(f"--model-config {model_config}: no config.json there")
    if cfg.model.policy:
        raise ConfigError(f"model.policy {cfg.model.policy}: no config.json (pass --model-config)")
    s = cfg.synth
    return (ModelShape(vocab=s.vocab_size, hidden=s.hidden_size, intermediate=s.intermediate_size,
                       layers=s.num_layers, heads=s.num_heads, kv_heads=s.num_kv_heads),
            "synth section (the embedded tiny default, not built yet)")


def data_lengths(data_dir: Path, cfg: Config, seed: int = 0) -> tuple[list[tuple[int, int, int]], str]:
    """(prompt, chosen, rejected) token lengths of up to SAMPLE_PAIRS pairs of the prepared train split, in a
    seeded random order (the sampler shuffles); without prepared data, every pair at the longest the recipe
    allows (data.max_prompt_tokens prompt, the rest of data.max_length per response): an upper bound."""
    if (data_dir / "manifest.json").is_file() and (data_dir / "train").is_dir():
        from midpo.runtime.prepared import load_split

        lengths = split_lengths(load_split(data_dir, "train", verify=False))
        if lengths:
            random.Random(seed).shuffle(lengths)
            return lengths[:SAMPLE_PAIRS], f"{data_dir}/train ({len(lengths)} pairs, {min(len(lengths), SAMPLE_PAIRS)} sampled)"
    d = cfg.data
    worst = (d.max_prompt_tokens, d.max_length - d.max_prompt_tokens, d.max_length - d.max_prompt_tokens)
    return [worst] * 256, (f"no prepared data at {data_dir}: every pair at data.max_length {d.max_length} "
                           f"(prompt {d.max_prompt_tokens}), an upper bound")


def split_lengths(data) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of every row of a prepared split (datasets.Dataset), from Arrow's
    list offsets (no row is decoded)."""
    import pyarrow.compute as pc

    if getattr(data, "_indices", None) is not None:
        data = data.flatten_indices()
    table = data.data.table if hasattr(data.data, "table") else data.data
    cols = [pc.list_value_length(table.column(c)).to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
    return list(zip(*cols))


def ds_template(name: str, cuda: bool) -> dict:
    """The ds_configs template `train.ds_config` names, as a plan for a `cuda` (or CPU) device reads it."""
    if name == "auto":
        name = "zero3_bf16" if cuda else "zero3_cpu_fp32"
    for cand in (Path(name), DS_CONFIGS_DIR / name, DS_CONFIGS_DIR / f"{name}.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    raise ConfigError(f"train.ds_config {name!r} not found")


def settings_from(cfg: Config, ds: dict, *, world: int, attn: str, dtype: str, cuda: bool,
                  hidden: int) -> Settings:
    """The planner's Settings for a recipe under DeepSpeed config `ds` (a template or a resolved config: "auto"
    buckets are filled as runtime.ds_config fills them)."""
    tc, zo = cfg.train, ds.get("zero_optimization", {}) or {}
    stage = int(zo.get("stage", 0))
    bucket = max(hidden * hidden, MIN_BUCKET)

    def num(key: str, default: float) -> float:
        v = zo.get(key, "auto")
        return float(default if v == "auto" else v)

    offload = (zo.get("offload_optimizer") or {}).get("device") not in (None, "none")
    layout = tc.layout
    if layout == "auto":
        raise ConfigError("train.layout=auto: resolve it first (resolve_auto)")
    prior = cfg.loss.prior == "learned"
    lora = cfg.model.lora
    modules = (lora.target_modules,) if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    if lora.r:
        try:
            lora_targets(modules, tuple(lora.modules_to_save))
        except ValueError as e:
            raise ConfigError(f"model.lora: {e}") from None
    full_logits = cfg.loss.prior in ("tdpo", "sparsepo") or (prior and cfg.prior_net.objective == "marginal")
    return Settings(
        world=world, zero_stage=stage, offload_optimizer=offload, dtype_bytes=DTYPE_BYTES[dtype],
        micro=tc.micro_batch_size, grad_accum=tc.grad_accum, token_budget=tc.micro_batch_tokens, layout=layout,
        attn=attn,
        checkpointing=cfg.model.gradient_checkpointing, head_chunk_tokens=tc.head_chunk_tokens,
        max_live_parameters=num("stage3_max_live_parameters", 1e9) if stage == 3 else 0.0,  # DeepSpeed's default
        max_reuse_distance=num("stage3_max_reuse_distance", 1e9) if stage == 3 else 0.0,
        prefetch_bucket=num("stage3_prefetch_bucket_size", int(0.9 * bucket)) if stage == 3 else 0.0,
        reduce_bucket=num("reduce_bucket_size", bucket) if stage in (2, 3) else 0.0,
        allgather_bucket=num("allgather_bucket_size", bucket) if stage == 2 else 0.0,
        overlap_comm=bool(zo.get("overlap_comm", False)),
        prior_layers=cfg.prior_net.num_layers if prior else -1, prior_zero_stage=cfg.prior_net.zero_stage,
        prior_conditioned=cfg.prior_net.condition_on_prompt, prior_chunk_tokens=cfg.prior_net.chunk_size,
        full_logits=full_logits, sequence_parallel=tc.sequence_parallel, lora_rank=lora.r, lora_modules=modules,
        lora_save=tuple(lora.modules_to_save), cuda=cuda)


def plan_inputs(cfg: Config, model_config: Any = None) -> dict[str, Any]:
    """Shape, lengths and where each came from, for a recipe's run folder."""
    from midpo.runtime.layout import RunLayout

    layout = RunLayout.resolve(cfg)
    shape, shape_src = model_shape(cfg, layout.policy, model_config)
    lengths, len_src = data_lengths(layout.data, cfg, seed=cfg.train.seed)
    return {"shape": shape, "shape_source": shape_src, "lengths": lengths, "lengths_source": len_src}


def predicted_peak(cfg: Config, ds: dict, hf_config: dict, data_dir: Path, *, world: int, attn: str, dtype: str,
                   cuda: bool) -> tuple[float, dict[str, float]]:
    """The plan's peak allocated bytes per device for a running trainer (its resolved DeepSpeed config, model
    config and prepared data) and the terms, for the log line beside the measured peak."""
    from midpo.core import plan as P

    shape = ModelShape.from_hf(hf_config)
    lengths, _ = data_lengths(data_dir, cfg, seed=cfg.train.seed)
    s = settings_from(cfg, ds, world=world, attn=attn, dtype=dtype, cuda=cuda, hidden=shape.hidden)
    m = P.memory(shape, s, P.widest([b for step in P.rank_steps(lengths, s) for b in step]))
    return m.peak, m.terms


# ---------------------------------------------------------------------------------------------
# `auto` (train.ds_config, train.layout): chosen from the plan (core.auto), recorded with the reason

def shipped_ds_config(stage: int, offload: bool, dtype: str) -> str | None:
    """The shipped ds_configs/ file for a ZeRO stage (offload: zero3_offload) in `dtype`; None when none ships."""
    if offload:
        return "zero3_offload" if stage == 3 and dtype == "bf16" else None
    return {"bf16": f"zero{stage}_bf16", "fp32": f"zero{stage}_cpu_fp32"}.get(dtype)


def ds_candidates(dtype: str, cuda: bool, compile: bool = False) -> list[str]:
    """train.ds_config=auto's candidates, cheapest first: stage 0, ZeRO-2, ZeRO-3, then (CUDA, bf16) ZeRO-3 with
    offload (on CPU the host is the device: offloading saves nothing). train.compile: stage <= 2 only."""
    options = [(0, False), (2, False)] + ([] if compile else [(3, False)] + ([(3, True)] if cuda else []))
    names = [shipped_ds_config(st, off, dtype) for st, off in options]
    if None in names:
        raise ConfigError(f"train.ds_config=auto: no shipped DeepSpeed config for model.dtype {dtype} "
                          f"(ds_configs/ holds bf16 and fp32 ones); name one in train.ds_config")
    return names


def device_memory_gib(cuda: bool) -> tuple[float, str]:
    """Memory this process may use, GiB, and what was read: CUDA, the device's free memory
    (torch.cuda.mem_get_info); CPU, the host's MemAvailable (/proc/meminfo) / the processes on this node
    (LOCAL_WORLD_SIZE)."""
    if cuda:
        import torch

        free, total = torch.cuda.mem_get_info()
        return free / GIB, f"free of {total / GIB:.1f} GiB on the device (torch.cuda.mem_get_info)"
    procs = ranks_per_node()
    return host_available_bytes() / procs / GIB, f"host memory available per process (MemAvailable / {procs})"


def ranks_per_node() -> int:
    """The training processes on this node (LOCAL_WORLD_SIZE; 1 without a launcher)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def host_available_bytes() -> int:
    """The node's available memory: MemAvailable (/proc/meminfo), or POSIX's free pages where there is no /proc."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_auto(cfg: Config, shape: ModelShape | None, lengths: list[tuple[int, int, int]], *, world: int,
                 attn: str, dtype: str, cuda: bool, device_gib: float, memory_source: str = "free",
                 dense_mask: bool = True, host_gib: float | None = None, ranks_per_node: int = 1,
                 host_source: str = "host memory") -> tuple[Config, dict[str, dict]]:
    """`cfg` with train.layout and train.ds_config chosen when they are `auto` (core.auto), and {key: the pick's
    value, reason and the memory of each candidate}. The layout first: the ZeRO choice is planned for it.
    `host_gib` (GPUs): the node's available host memory, shared by `ranks_per_node` processes; None: not checked.
    `shape` None (a model the plan cannot read): ZeRO-3 of the dtype, the old default, so stated."""
    tc, picks = cfg.train, {}
    layout, ds = tc.layout, tc.ds_config
    if layout == "auto":
        p = choose_layout(attn, dense_mask)
        layout, picks["train.layout"] = p.value, p.to_json()
    if ds == "auto":
        names = ds_candidates(dtype, cuda, tc.compile)
        if shape is None:
            p = Pick(names[-1] if tc.compile else shipped_ds_config(3, False, dtype) or names[-1],
                     "no memory plan for this model's config (not Llama-shaped): ZeRO-3, the safe default")
        else:
            with_layout = dataclasses.replace(cfg, train=dataclasses.replace(tc, layout=layout))
            cands = [(n, settings_from(with_layout, ds_template(n, cuda), world=world, attn=attn, dtype=dtype,
                                       cuda=cuda, hidden=shape.hidden)) for n in names]
            p = choose_zero(shape, cands, lengths, device_gib, memory_source, host_gib=host_gib,
                            ranks_per_node=ranks_per_node, host_source=host_source)
            if tc.compile:
                p = dataclasses.replace(p, reason=p.reason + " (train.compile: ZeRO-3 not a candidate)")
        ds, picks["train.ds_config"] = p.value, p.to_json()
    if not picks:
        return cfg, picks
    return dataclasses.replace(cfg, train=dataclasses.replace(tc, layout=layout, ds_config=ds)), picks
