"""Stage 2 (`midpo ref`): the offline per-token reference log-prob cache.

Launch (all read the same recipe; `key.sub=value` tokens override it):

    midpo ref --config RECIPE [--nproc N] [key.sub=value ...]          # one machine; N>1 spawns torchrun
    torchrun --nproc_per_node N -m midpo.stages.ref --config RECIPE [overrides]
    deepspeed --num_gpus N --module midpo.stages.ref --config RECIPE [overrides]
    srun --ntasks N python -m midpo.stages.ref --config RECIPE [overrides]   # dist.init_distributed reads Slurm

Inputs: `<run_dir>/data/{train,eval}` (stage 1) and the reference model (`RunLayout.reference`:
`model.reference`, else the policy training starts from: `<run_dir>/sft` after SFT, else `model.policy`,
else the embedded default). Output: `<run_dir>/ref/<split>/`
(Arrow, same row order as the data; columns in `REF_COLUMNS`, plus the top-k columns when `ref.topk > 0`)
and `<run_dir>/ref/manifest.json`, written LAST: its presence means the cache is complete. Per split
it records the row count and the content hash of every file (`midpo.runtime.integrity`).

How it runs: the chunk runner of midpo.runtime.chunks (chunks of `ref.rows_per_shard` rows, resumable;
micro-batches under the `ref.micro_batch_tokens` budget; every rank in lockstep), with this module's scorer:
- The forward is `midpo.core.logprobs.response_logps` on `midpo.core.batching.collate_pairs` batches: the
  very function the trainer uses for an online reference, so cached == online by construction.
- `ref.zero3=true` shards the reference with a ZeRO-3 engine without optimizer (for models that do
  not fit one device); data-parallelism over rows is unchanged.
- Up to date: a complete cache for the same plan whose files match their hashes and row counts is
  skipped; a damaged or edited one is rebuilt (with a warning naming the file); `--force` rebuilds
  regardless. Damaged input data (its files differ from `data/manifest.json`) is refused before any
  work, naming the file: only `midpo prep --force` can rebuild it.
- Before publishing a split, its values are checked (`midpo.runtime.cache.check_values`): a NaN or
  positive log-prob is refused, not cached.
- Top-k (`ref.topk = k > 0`): per response token the reference's k largest log-probs, their token ids
  and the log of the remaining mass. It lets TDPO-style KL terms train without an online reference,
  but it is an APPROXIMATION (a coarsened KL, a lower bound of the exact one); see
  `midpo.core.logprobs.per_token_kl_topk` and tests/runtime/test_cache.py for the measured error.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from midpo.config import Config, to_dict
from midpo.runtime import dist as pdist
from midpo.runtime.cache import REF_SCHEMA, TOPK_SCHEMA, row_tokens_hash
from midpo.runtime.chunks import StageError, StageSpec, run_stage
from midpo.runtime.files import save_config
from midpo.runtime.launch import run_or_spawn, stage_cli
from midpo.runtime.layout import claim_run_on_all_ranks
from midpo.runtime.models import pad_id_of
from midpo.runtime.prepared import SPLITS, available_splits, data_fingerprints, load_split, read_manifest

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# scoring one micro-batch (the forward shared with the trainer)


def score_reference_rows(model, rows: list[dict], *, packing: bool, pad_id: int, topk: int = 0,
                         seq_groups=None) -> list[dict]:
    """Per-row reference columns for one micro-batch of pairs (the trainer's forward, no grad). seq_groups
    (runtime.seqpar, its attention installed on `model`): every rank of the group passes the same rows and gets the
    same records (each scores its columns; the values are gathered)."""
    from midpo.core.batching import collate_pairs, row_tokens_for
    from midpo.core.logprobs import response_logps, split_flat

    k = 1 if seq_groups is None else seq_groups.size
    batch = collate_pairs(rows, layout="packed" if packing else "padded", pad_id=pad_id,
                          max_row_tokens=row_tokens_for(model), pad_to_multiple=k).to(_model_device(model))
    with torch.no_grad():
        if seq_groups is not None:
            from midpo.runtime.engine import HEAD_CHUNK_TOKENS
            from midpo.runtime.seqpar import head_calls

            calls = head_calls(batch, seq_groups.shard, HEAD_CHUNK_TOKENS)
            out = response_logps(model, batch, shard=seq_groups.shard, head_calls=calls)
        else:
            out = response_logps(model, batch, return_topk=topk)  # top-k chunk by chunk: never (N, V) logits
        tk = {}
        if topk > 0:
            per_side = zip(*(split_flat(x, batch) for x in (out.topk_values, out.topk_ids, out.tail_logmass)))
            for side, ((vals, _), (idx, _), (tail, _)) in zip(("chosen", "rejected"), per_side):  # (B,L,k) (B,L,k) (B,L)
                tk[side] = (vals.float().cpu().numpy(), idx.to(torch.int32).cpu().numpy(), tail.float().cpu().numpy())
    sides = {"chosen": (out.chosen.float().cpu().numpy(), out.chosen_mask.sum(-1).tolist()),
             "rejected": (out.rejected.float().cpu().numpy(), out.rejected_mask.sum(-1).tolist())}
    result = []
    for i, row in enumerate(rows):
        rec: dict[str, Any] = {"id": row["id"], "tokens_hash": row_tokens_hash(row)}
        for side, (lp, lens) in sides.items():
            n = len(row[f"{side}_ids"])
            if lens[i] != n:
                raise StageError(f"row {row['id']}: {side} has {n} tokens but the forward returned {lens[i]}")
            rec[f"{side}_ref_logps"] = lp[i, :n]
            rec[f"{side}_ref_logp_sum"] = float(lp[i, :n].astype(np.float64).sum())
            if topk > 0:
                vals, idx, tail = tk[side]
                rec[f"{side}_ref_topk_logps"] = vals[i, :n]
                rec[f"{side}_ref_topk_ids"] = idx[i, :n]
                rec[f"{side}_ref_tail_logmass"] = tail[i, :n]
        result.append(rec)
    return result


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# the reference stage


def load_reference(model_path: Path, cfg: Config):
    """The frozen reference, plain or as a ZeRO-3 inference engine (parameters sharded over ranks)."""
    from midpo.runtime.models import load_model, resolve_dtype

    if not cfg.ref.zero3:
        return load_model(model_path, cfg.model, device=pdist.device())
    import deepspeed

    dtype = resolve_dtype(cfg.model.dtype)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    keep = None
    if importlib.util.find_spec("accelerate") is not None:
        # While alive, from_pretrained builds the model under zero.Init: weights go straight into shards.
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)
    else:
        log.warning("accelerate not installed: each rank loads the full reference into host memory first; "
                    "deepspeed.initialize then keeps only its shard on the device")
    model = load_model(model_path, cfg.model, device="cpu" if keep is None else pdist.device())
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.module.eval()
    del keep
    return engine.module


def reference_plan(cfg: Config, data_dir: Path, model_path: Path) -> dict:
    from midpo.runtime.models import model_fingerprint, resolve_attn, resolve_dtype

    data_fp, tok_fp = data_fingerprints(read_manifest(data_dir), data_dir)
    return {
        "data_fingerprint": data_fp,
        "tokenizer_fingerprint": tok_fp,
        "reference_fingerprint": model_fingerprint(model_path),
        "dtype": str(resolve_dtype(cfg.model.dtype)).removeprefix("torch."),
        "attn_implementation": resolve_attn(cfg.model.attn_implementation, model_path),
        "topk": cfg.ref.topk,
        "rows_per_shard": cfg.ref.rows_per_shard,
    }


def check_positions(data_dir: Path, splits: list[str], model_path: Path) -> None:
    """Before loading the reference: refuse data whose longest pair runs past its positions (a RoPE model
    would score positions it was never trained on, silently)."""
    from midpo.runtime.models import folder_max_positions, longest_pair, positions_problem

    limit = folder_max_positions(model_path)
    for split in splits:
        problem = positions_problem(longest_pair(load_split(data_dir, split)), limit, model=model_path,
                                    what=f"the longest {split} pair (prompt + longer response) in {data_dir}")
        if problem:
            raise StageError(problem)


def main(cfg: Config, splits: list[str] | None = None, force: bool = False,
         on_chunk: Callable[[int], None] | None = None) -> dict | None:
    """Set up, build the cache for every split, write the manifest, clean up. force: rebuild a complete cache.
    on_chunk: called by rank 0 after each chunk it writes (runtime.chunks.StageSpec.on_chunk)."""
    owned = not torch.distributed.is_initialized()  # a caller's process group is the caller's to destroy
    pdist.init_distributed()
    try:
        layout = claim_run_on_all_ranks(cfg, needs=("reference",))
        data_dir, ref_dir, model_path = layout.data, layout.cache, layout.reference
        splits = splits or available_splits(read_manifest(data_dir))
        if not splits:
            raise StageError(f"{data_dir}: no train/ or eval/ split; run `midpo prep` first")
        plan = reference_plan(cfg, data_dir, model_path)
        check_positions(data_dir, splits, model_path)
        k = cfg.ref.sequence_parallel
        if k > 1 and cfg.ref.topk > 0:
            raise StageError(f"ref.sequence_parallel={k} with ref.topk={cfg.ref.topk}: the top-k slice needs each "
                             "position's full-vocab logits on one rank; set ref.topk=0 or ref.sequence_parallel=1")
        if pdist.world_size() % k:
            raise StageError(f"ref.sequence_parallel={k} must divide the number of processes ({pdist.world_size()})")
        from midpo.runtime.seqpar import install, setup_groups

        seq_groups = setup_groups(k)  # COLLECTIVE; None when k is 1
        model = load_reference(model_path, cfg)
        if seq_groups is not None:
            try:
                install(model, seq_groups)
            except ValueError as e:
                raise StageError(str(e)) from None
        pad_id = pad_id_of(model)
        schema = pa.schema(list(REF_SCHEMA) + (list(TOPK_SCHEMA) if cfg.ref.topk > 0 else []))
        spec = StageSpec(
            name="ref", out_dir=ref_dir, schema=schema, plan=plan,
            score=lambda rows: score_reference_rows(model, rows, packing=cfg.ref.packing, pad_id=pad_id,
                                                    topk=cfg.ref.topk, seq_groups=seq_groups),
            packing=cfg.ref.packing, micro_batch_tokens=cfg.ref.micro_batch_tokens,
            rows_per_shard=cfg.ref.rows_per_shard, on_chunk=on_chunk, seq_groups=seq_groups,
        )
        if pdist.is_main():
            save_config(cfg, ref_dir / "config.yaml")
        extra = {"reference_path": str(model_path), "packing": cfg.ref.packing, "zero3": cfg.ref.zero3,
                 "micro_batch_tokens": cfg.ref.micro_batch_tokens, "config": to_dict(cfg.ref),
                 "vocab_size": getattr(model.config, "vocab_size", None)}  # top-k ids are checked against it
        manifest = run_stage(spec, data_dir, splits, extra, force)
        pdist.barrier()  # every rank done before any tears down (gloo aborts a rank whose peer closed first)
        return manifest
    finally:
        if owned:
            pdist.cleanup()


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe (YAML path or name in recipes/)")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (N>1 spawns torchrun)")
    parser.add_argument("--split", action="append", choices=SPLITS, help="only these splits (default: all present)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even when the output is up to date (same plan, files match their hashes)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed


def run(args: argparse.Namespace) -> int:
    return run_or_spawn(args, "midpo.stages.ref", lambda cfg: main(cfg, args.split, force=args.force), splits=True)


if __name__ == "__main__":
    sys.exit(stage_cli("ref", add_arguments, run))
