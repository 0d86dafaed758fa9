"""Stage 2 (`midpo ref`): the offline per-token reference log-prob cache.

Launch (all read the same recipe; `key.sub=value` tokens override it):

    midpo ref --config RECIPE [--nproc N] [key.sub=value ...]          # one machine; N>1 spawns torchrun
    torchrun --nproc_per_node N -m midpo.stages.ref --config RECIPE [overrides]
    deepspeed --num_gpus N --module midpo.stages.ref --config RECIPE [overrides]
    srun --ntasks N python -m midpo.stages.ref --config RECIPE [overrides]   # dist.init_distributed reads Slurm

Inputs: `<run_dir>/data/{train,eval}` (stage 1) and the reference model
(`model.reference`, else `model.policy`, else `<run_dir>/synth/model`). Output: `<run_dir>/ref/<split>/`
(Arrow, same row order as the data; columns in `REF_COLUMNS`, plus the top-k columns when `ref.topk > 0`)
and `<run_dir>/ref/manifest.json`, written LAST: its presence means the cache is complete. Per split
it records the row count and the content hash of every file (`midpo.runtime.integrity`).

How it runs:
- Rows are cut into fixed chunks of `ref.rows_per_shard`; each finished chunk is written atomically
  under `<run_dir>/ref/.work/`, so a killed run resumes at the first missing chunk (with any world size).
- Inside a chunk, rows are spread over ranks by token count and grouped into micro-batches under the
  `ref.micro_batch_tokens` budget (packed, or length-bucketed padded). Every rank runs the same number
  of forwards per chunk (short ranks forward a dummy batch and drop it) and the same collectives, so
  uneven data cannot hang ZeRO-3 all-gathers or the per-chunk gather.
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

Test hook: MIDPO_TEST_PAUSE_AFTER_CHUNKS=n makes rank 0 stop (sleep) after writing n chunks, so a test
can SIGKILL the whole process group at a known point.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from midpo.config import Config, load_config, save_config, to_dict
from midpo.errors import MidpoError
from midpo.runtime import dist as pdist
from midpo.runtime.files import publish_dir, temp_dir_for
from midpo.runtime.fingerprint import atomic_write_json, hash_json, hash_token_ids
from midpo.runtime.integrity import HASHES, hash_split, split_damage
from midpo.runtime.prepared import SPLITS, DataNotReady, load_split, read_manifest, verify_data

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PAUSE_ENV = "MIDPO_TEST_PAUSE_AFTER_CHUNKS"
WORK_DIR = ".work"

# Output columns (the trainer reads these through midpo.runtime.cache).
REF_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("tokens_hash", pa.string()),
    ("chosen_ref_logps", pa.list_(pa.float32())),
    ("rejected_ref_logps", pa.list_(pa.float32())),
    ("chosen_ref_logp_sum", pa.float64()),
    ("rejected_ref_logp_sum", pa.float64()),
])
TOPK_SCHEMA = pa.schema([
    (f"{side}_{name}", typ)
    for side in ("chosen", "rejected")
    for name, typ in (("ref_topk_logps", pa.list_(pa.list_(pa.float32()))),
                      ("ref_topk_ids", pa.list_(pa.list_(pa.int32()))),
                      ("ref_tail_logmass", pa.list_(pa.float32())))
])


class ReferenceStageError(MidpoError, RuntimeError):
    """An input or partial output the stage cannot use; the message names file/row and reason."""


# ---------------------------------------------------------------------------------------------
# paths and inputs


def resolve_paths(cfg: Config) -> tuple[Path, Path, Path]:
    """(data_dir, ref_dir, reference model folder) of a run."""
    run = cfg.run_path
    model = cfg.model.reference or cfg.model.policy or str(run / "synth" / "model")
    return run / "data", run / "ref", Path(model)


def data_fingerprints(manifest: dict, data_dir: Path) -> tuple[str, str]:
    """(data fingerprint, tokenizer fingerprint) from a stage-1 manifest."""
    data_fp = manifest.get("fingerprint")
    tok_fp = (manifest.get("tokenizer") or {}).get("fingerprint")
    if not data_fp or not tok_fp:
        raise ReferenceStageError(f"{Path(data_dir) / 'manifest.json'}: no `fingerprint` or `tokenizer.fingerprint`")
    return str(data_fp), str(tok_fp)


def available_splits(manifest: dict) -> list[str]:
    return [s for s in SPLITS if s in manifest.get("splits", {})]


# ---------------------------------------------------------------------------------------------
# planning (pure): chunks, rank assignment, micro-batches under a token budget


def chunk_ranges(n_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows_per_shard, n_rows)) for s in range(0, n_rows, rows_per_shard)]


def pair_cost(p: int, c: int, r: int, packing: bool) -> int:
    """Tokens one pair occupies in a forward: prompt twice + both responses (packed), or 2 x longer side."""
    return 2 * p + c + r if packing else 2 * (p + max(c, r))


def assign_to_ranks(costs: Sequence[int], world: int) -> list[list[int]]:
    """Greedy longest-first balancing of a chunk's rows over ranks (deterministic)."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [0] * world
    parts: list[list[int]] = [[] for _ in range(world)]
    for i in order:
        r = min(range(world), key=lambda k: (loads[k], k))
        parts[r].append(i)
        loads[r] += costs[i]
    return parts


def plan_micro_batches(idx: Sequence[int], costs: Sequence[int], budget: int, packing: bool) -> list[list[int]]:
    """Group rows (longest first) into micro-batches whose forward size stays within `budget` tokens.

    Packed: the sum of pair costs. Padded: n_pairs * the largest pair cost (length bucketing: sorted
    lengths waste little padding). A single pair over budget gets a batch of its own.
    """
    order = sorted(idx, key=lambda i: (-costs[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        c = costs[i]
        new = used + c if packing else (len(cur) + 1) * max(c, costs[cur[0]] if cur else 0)
        if cur and new > budget:
            batches.append(cur)
            cur, new = [], c
        cur.append(i)
        used = new
    if cur:
        batches.append(cur)
    return batches


# ---------------------------------------------------------------------------------------------
# scoring one micro-batch (the forward shared with the trainer)


def score_reference_rows(model, rows: list[dict], *, packing: bool, pad_id: int, topk: int = 0) -> list[dict]:
    """Per-row reference columns for one micro-batch of pairs (the trainer's forward, no grad)."""
    from midpo.core.batching import collate_pairs, row_tokens_for
    from midpo.core.logprobs import response_logps, split_flat

    batch = collate_pairs(rows, layout="packed" if packing else "padded", pad_id=pad_id,
                          max_row_tokens=row_tokens_for(model)).to(_model_device(model))
    with torch.no_grad():
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
                raise ReferenceStageError(f"row {row['id']}: {side} has {n} tokens but the forward returned {lens[i]}")
            rec[f"{side}_ref_logps"] = lp[i, :n]
            rec[f"{side}_ref_logp_sum"] = float(lp[i, :n].astype(np.float64).sum())
            if topk > 0:
                vals, idx, tail = tk[side]
                rec[f"{side}_ref_topk_logps"] = vals[i, :n]
                rec[f"{side}_ref_topk_ids"] = idx[i, :n]
                rec[f"{side}_ref_tail_logmass"] = tail[i, :n]
        result.append(rec)
    return result


def row_tokens_hash(row: dict) -> str:
    return hash_token_ids(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# the sharded, resumable, lockstep engine (shared with midpo.stages.weights)


@dataclass
class StageSpec:
    """What a chunked stage computes and where it writes."""

    name: str  # for logs and errors
    out_dir: Path  # <out_dir>/<split>/, <out_dir>/manifest.json, <out_dir>/.work/
    schema: pa.Schema
    plan: dict  # everything the result depends on; a change invalidates partial chunks
    score: Callable[[list[dict]], list[dict]]  # rows -> per-row output records
    packing: bool
    micro_batch_tokens: int
    rows_per_shard: int


def _bcast(obj: Any) -> Any:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_max(value: int) -> int:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.long, device=pdist.device() if pdist.backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _gather(obj: Any) -> list[Any] | None:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _chunk_path(work: Path, split: str, c: int, n: int) -> Path:
    return work / split / f"chunk-{c:05d}-of-{n:05d}.arrow"


def _write_table_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def _read_table(path: Path) -> pa.Table:
    with pa.memory_map(str(path), "r") as src:
        return pa.ipc.open_file(src).read_all()


def records_to_table(records: list[dict], schema: pa.Schema) -> pa.Table:
    cols = {}
    for f in schema:
        vals = [r[f.name] for r in records]
        if pa.types.is_list(f.type) and pa.types.is_list(f.type.value_type):
            vals = [np.asarray(v).tolist() for v in vals]  # nested lists: let arrow cast
        cols[f.name] = pa.array(vals, type=f.type)
    return pa.table(cols, schema=schema)


def output_damage(out_dir: Path, manifest: dict) -> str | None:
    """What is wrong with a complete output's split folders against its manifest (hashes, rows), or None."""
    for split, record in manifest.get("splits", {}).items():
        damage = split_damage(out_dir / split, record, out_dir / "manifest.json")
        if damage:
            return damage
    return None


def prepare_out_dir(spec: StageSpec, force: bool = False) -> bool:
    """Rank 0: True if a complete, intact output with the same plan already exists (skip). Otherwise make
    the folder look incomplete (manifest removed first) and keep partial chunks only if their plan matches
    (none with `force`)."""
    out, work = spec.out_dir, spec.out_dir / WORK_DIR
    manifest = out / "manifest.json"
    plan_fp = hash_json(spec.plan)
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("plan_fingerprint") != plan_fp:
            log.warning("%s: %s was built for a different plan; rebuilding", spec.name, manifest)
        elif force:
            log.warning("%s: --force: rebuilding %s", spec.name, out)
        elif (damage := output_damage(out, old)) is not None:
            log.warning("%s: %s; rebuilding", spec.name, damage)
        else:
            return True
        manifest.unlink()
    if force and work.exists():
        shutil.rmtree(work)  # our own partial chunks: a forced rebuild recomputes everything
    plan_file = work / "plan.json"
    if work.exists():
        old_plan = json.loads(plan_file.read_text()) if plan_file.exists() else None
        if old_plan != {"plan_fingerprint": plan_fp, "plan": json.loads(json.dumps(spec.plan, default=str))}:
            log.warning("%s: discarding partial chunks in %s (built for a different plan)", spec.name, work)
            shutil.rmtree(work)
    if not plan_file.exists():
        atomic_write_json(plan_file, {"plan_fingerprint": plan_fp, "plan": spec.plan})
    return False


def _pause_hook(written: int) -> None:
    limit = os.environ.get(PAUSE_ENV)
    if limit and written >= int(limit):
        log.warning("%s=%s reached: pausing for the test to kill this process group", PAUSE_ENV, limit)
        while True:
            time.sleep(60)


def run_split(spec: StageSpec, split: str, data) -> dict:
    """Compute every missing chunk of one split, then (rank 0) merge, verify and publish it."""
    from tqdm import tqdm

    rank, world = pdist.rank(), pdist.world_size()
    work = spec.out_dir / WORK_DIR
    n_rows = len(data)
    chunks = chunk_ranges(n_rows, spec.rows_per_shard)
    pending = [c for c, _ in enumerate(chunks) if not _chunk_path(work, split, c, len(chunks)).exists()]
    pending = _bcast(pending)  # rank 0's view of the shared folder decides, so all ranks agree
    lengths = {k: np.fromiter((len(x) for x in data[k]), dtype=np.int64, count=n_rows)
               for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    costs = [pair_cost(p, c, r, spec.packing)
             for p, c, r in zip(lengths["prompt_ids"], lengths["chosen_ids"], lengths["rejected_ids"], strict=True)]
    real = lambda a, b: int(2 * lengths["prompt_ids"][a:b].sum() + lengths["chosen_ids"][a:b].sum()  # noqa: E731
                            + lengths["rejected_ids"][a:b].sum())
    total_tokens = sum(real(*chunks[c]) for c in pending)
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=f"{spec.name} {split}",
               disable=rank != 0 or not pending, mininterval=1.0, smoothing=0.1)
    if len(pending) < len(chunks):
        pdist.print0(f"{spec.name} {split}: resuming, {len(chunks) - len(pending)}/{len(chunks)} chunks already done")
    written = 0
    for c in pending:
        start, end = chunks[c]
        parts = assign_to_ranks(costs[start:end], world)
        mine = [start + i for i in parts[rank]]
        batches = plan_micro_batches(mine, costs, spec.micro_batch_tokens, spec.packing)
        n_steps = _all_max(len(batches))  # every rank runs n_steps forwards: no collective can hang
        dummy = [data[start]]
        records: list[dict] = []
        shown = 0  # tokens of this chunk already on rank 0's bar
        for step in range(n_steps):
            if step < len(batches):
                idx = batches[step]
                rows = data.select(idx).to_list() if len(idx) > 1 else [data[idx[0]]]
                out = spec.score(rows)
                for i, rec in zip(idx, out, strict=True):
                    rec["_row"] = i
                records.extend(out)
                if rank == 0:
                    n_tok = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
                    bar.update(n_tok)
                    shown += n_tok
            else:
                spec.score(dummy)  # padding work: same forward, result dropped
        gathered = _gather(records)
        if rank == 0:
            allrec = sorted((r for part in gathered for r in part), key=lambda r: r["_row"])
            if [r["_row"] for r in allrec] != list(range(start, end)):
                raise ReferenceStageError(f"{spec.name} {split} chunk {c}: gathered rows do not cover {start}..{end}")
            _write_table_atomic(records_to_table(allrec, spec.schema), _chunk_path(work, split, c, len(chunks)))
            bar.update(real(start, end) - shown)  # the other ranks' tokens of this chunk
            bar.set_postfix(chunk=f"{c + 1}/{len(chunks)}", refresh=False)
            written += 1
            _pause_hook(written)
    bar.close()
    pdist.barrier()
    info: dict = {}
    if rank == 0:
        info = merge_split(spec, split, data, len(chunks))
    pdist.barrier()
    return info


def merge_split(spec: StageSpec, split: str, data, n_chunks: int) -> dict:
    """Concatenate chunks, check every row against the data (id, tokens_hash, lengths), publish atomically."""
    from datasets import Dataset

    work = spec.out_dir / WORK_DIR
    tables = []
    for c in range(n_chunks):
        path = _chunk_path(work, split, c, n_chunks)
        if not path.exists():
            raise ReferenceStageError(f"{path} missing after all ranks finished: refusing to publish {split}")
        t = _read_table(path)
        if t.schema != spec.schema:
            raise ReferenceStageError(f"{path}: schema {t.schema} differs from the expected {spec.schema}")
        tables.append(t)
    table = pa.concat_tables(tables) if tables else spec.schema.empty_table()
    verify_against_data(table, data, where=f"{spec.out_dir / WORK_DIR / split}")
    from midpo.runtime.cache import check_values  # (ref_cache imports this module)

    check_values(table, where=str(work / split), split=split,
                 fix=f"not published. The forward produced it (bf16/fp16 overflow? try model.dtype=fp32) or a chunk "
                 f"under {work} is damaged; re-run `midpo {spec.name} --force`")
    tmp = temp_dir_for(spec.out_dir / split, spec.name)
    # an empty split as one empty shard: datasets writes 0 shards for 0 rows, which load_from_disk cannot read
    Dataset(table).save_to_disk(str(tmp), num_shards=1 if len(table) == 0 else None)
    hashes = hash_split(tmp)  # the manifest (written last) records them; every reader re-checks them
    publish_dir(tmp, spec.out_dir / split)
    return {"rows": len(table), "chosen_tokens": int(sum(len(x) for x in data["chosen_ids"])),
            "rejected_tokens": int(sum(len(x) for x in data["rejected_ids"])), "chunks": n_chunks, HASHES: hashes}


def verify_against_data(table: pa.Table, data, where: str) -> None:
    """Same rows, same order: ids equal, token hashes equal, one value per response token."""
    if len(table) != len(data):
        raise ReferenceStageError(f"{where}: {len(table)} rows but the data split has {len(data)}")
    ids = table.column("id").to_pylist()
    hashes = table.column("tokens_hash").to_pylist()
    data_ids = data["id"]
    for i, (a, b) in enumerate(zip(ids, data_ids, strict=True)):
        if a != b:
            raise ReferenceStageError(f"{where}: row {i} has id {a!r}, data has {b!r}")
    for i, row in enumerate(data):
        if hashes[i] != row_tokens_hash(row):
            raise ReferenceStageError(f"{where}: row {i} (id {row['id']}) token hash differs from the data's")
    per_token = [(side, name) for side in ("chosen", "rejected") for name in (f"{side}_ref_logps", f"{side}_weights")
                 if name in table.column_names]
    for side, name in per_token:
        got = table.column(name).combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        want = np.fromiter((len(x) for x in data[f"{side}_ids"]), dtype=np.int64, count=len(data))
        bad = np.nonzero(got != want)[0]
        if len(bad):
            i = int(bad[0])
            raise ReferenceStageError(f"{where}: row {i} (id {data_ids[i]}) has {got[i]} {name} values for "
                                      f"{want[i]} {side} tokens")


def _check_input_and_output(spec: StageSpec, data_dir: Path, splits: list[str], force: bool) -> bool | Exception:
    """Rank 0: the input data must be intact (raised: the stage cannot rebuild it), then the skip decision."""
    try:
        verify_data(data_dir, splits)
    except DataNotReady as e:
        return e
    return prepare_out_dir(spec, force)


def run_stage(spec: StageSpec, data_dir: Path, splits: list[str], manifest_extra: dict,
              force: bool = False) -> dict | None:
    """All splits, then the manifest (rank 0, last). Returns the manifest (None if skipped as complete).
    force: rebuild even when the output is complete and intact."""
    skip = _bcast(_check_input_and_output(spec, data_dir, splits, force) if pdist.is_main() else None)
    if isinstance(skip, Exception):
        raise skip  # on every rank, so none waits in a collective
    if skip:
        pdist.print0(f"{spec.name}: {spec.out_dir / 'manifest.json'} is complete for this plan; nothing to do")
        return None
    pdist.barrier()
    t0 = time.time()
    split_info = {}
    for split in splits:
        data = load_split(data_dir, split, verify=False)  # rank 0 verified every split just above
        split_info[split] = run_split(spec, split, data)
    manifest = None
    if pdist.is_main():
        manifest = {"format_version": FORMAT_VERSION, "stage": spec.name, "plan_fingerprint": hash_json(spec.plan),
                    **spec.plan, **manifest_extra, "splits": split_info,
                    "world_size": pdist.world_size(), "seconds": round(time.time() - t0, 3)}
        atomic_write_json(spec.out_dir / "manifest.json", manifest)  # last: marks the cache complete
        shutil.rmtree(spec.out_dir / WORK_DIR, ignore_errors=True)
        counts = ", ".join(f"{s}: {i['rows']} rows" for s, i in split_info.items())
        pdist.print0(f"{spec.name}: wrote {spec.out_dir} ({counts})")
    pdist.barrier()
    return manifest


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
        "attn_implementation": resolve_attn(cfg.model.attn_implementation),
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
            raise ReferenceStageError(problem)


def pad_id_of(model) -> int:
    cfg = model.config
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(cfg, name, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def main(cfg: Config, splits: list[str] | None = None, force: bool = False) -> dict | None:
    """Set up, build the cache for every split, write the manifest, clean up. force: rebuild a complete cache."""
    data_dir, ref_dir, model_path = resolve_paths(cfg)
    pdist.init_distributed()
    try:
        splits = splits or available_splits(read_manifest(data_dir))
        if not splits:
            raise ReferenceStageError(f"{data_dir}: no train/ or eval/ split; run `midpo prep` first")
        plan = reference_plan(cfg, data_dir, model_path)
        check_positions(data_dir, splits, model_path)
        model = load_reference(model_path, cfg)
        pad_id = pad_id_of(model)
        schema = pa.schema(list(REF_SCHEMA) + (list(TOPK_SCHEMA) if cfg.ref.topk > 0 else []))
        spec = StageSpec(
            name="ref", out_dir=ref_dir, schema=schema, plan=plan,
            score=lambda rows: score_reference_rows(model, rows, packing=cfg.ref.packing, pad_id=pad_id,
                                                    topk=cfg.ref.topk),
            packing=cfg.ref.packing, micro_batch_tokens=cfg.ref.micro_batch_tokens,
            rows_per_shard=cfg.ref.rows_per_shard,
        )
        if pdist.is_main():
            save_config(cfg, ref_dir / "config.yaml")
        extra = {"reference_path": str(model_path), "packing": cfg.ref.packing, "zero3": cfg.ref.zero3,
                 "micro_batch_tokens": cfg.ref.micro_batch_tokens, "config": to_dict(cfg.ref),
                 "vocab_size": getattr(model.config, "vocab_size", None)}  # top-k ids are checked against it
        return run_stage(spec, data_dir, splits, extra, force)
    finally:
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


def launch_torchrun(module: str, argv: list[str], nproc: int) -> int:
    """Re-run `module` under torchrun with nproc processes on this machine; its exit code. The agent runs in a
    session of its own, gets this process's SIGTERM/SIGINT/SIGHUP and dies with it even on SIGKILL; its workers
    die with the agent (midpo.runtime.launch)."""
    from midpo.runtime.launch import agent_command, forward_signals

    cmd = agent_command(os.getpid(), ["--standalone", f"--nproc_per_node={nproc}", "-m", module, *argv])
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, start_new_session=True)
    with forward_signals(proc.pid):
        code = proc.wait()
    return 128 - code if code < 0 else code  # -N: the agent died of signal N (the shell's 128 + N)


def run_module(args: argparse.Namespace, module: str, main_fn: Callable[..., Any]) -> int:
    """`run` of a chunked stage: spawn torchrun for --nproc N > 1 (unless already launched), else run here."""
    cfg = load_config(args.config, getattr(args, "overrides", []))
    force = bool(getattr(args, "force", False))
    if args.nproc > 1 and "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        argv = ([f"--config={args.config}"] if args.config else []) + [f"--split={s}" for s in args.split or []]
        argv += ["--force"] if force else []
        return launch_torchrun(module, argv + list(getattr(args, "overrides", [])), args.nproc)
    main_fn(cfg, args.split, force=force)
    return 0


def run(args: argparse.Namespace) -> int:
    return run_module(args, "midpo.stages.ref", main)


def cli(argv: list[str] | None = None, *, add=add_arguments, runner=run, prog: str = "midpo.stages.ref") -> int:
    from midpo.cli import add_config_epilog, run_stage, split_overrides, stage_name
    from midpo.runtime.launch import worker_dies_with_agent

    worker_dies_with_agent()  # under torchrun: never outlive the agent (midpo.runtime.launch)
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(prog=prog)
    add(parser)
    add_config_epilog(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(rest)
    pdist.env_from_slurm()  # under srun, RANK comes from SLURM_PROCID: map it before naming the rank in logs
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s [rank {os.environ.get('RANK', '0')}] %(name)s: %(message)s")
    args.overrides = overrides
    return run_stage(stage_name(prog), lambda: runner(args))


if __name__ == "__main__":
    sys.exit(cli())
