"""The lockstep, resumable chunk runner of the offline stages (`midpo ref`, `midpo weights`).

A stage describes itself as a `StageSpec` (output folder and schema, the plan its result depends on, a
`score(rows) -> records` function); `run_stage` does the rest, on every rank:
- rows are cut into fixed chunks of `rows_per_shard`; each finished chunk is written atomically under
  `<out_dir>/.work/`, so a killed run resumes at the first missing chunk (with any world size);
- inside a chunk, rows are spread over ranks by token count and grouped into micro-batches under the
  `micro_batch_tokens` budget (packed, or length-bucketed padded). Every rank runs the same number of
  forwards per chunk (short ranks score a dummy batch and drop it) and the same collectives, so uneven
  data cannot hang ZeRO-3 all-gathers or the per-chunk gather;
- rank 0 merges the chunks, checks every row against the data (id, token hash, one value per response
  token) and the values (runtime.cache.check_values), publishes `<out_dir>/<split>/` with its content
  hashes, and writes `<out_dir>/manifest.json` LAST: its presence means the output is complete.
An up-to-date check (same plan, intact files) skips the work; `force` rebuilds; damaged input data is refused.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from midpo.errors import MidpoError
from midpo.runtime import dist as pdist
from midpo.runtime.cache import row_tokens_hash
from midpo.runtime.files import atomic_file, atomic_write_json, publish_dir, temp_dir_for
from midpo.runtime.fingerprint import hash_json
from midpo.runtime.integrity import HASHES, hash_split, split_damage
from midpo.runtime.prepared import DataNotReady, load_split, verify_data

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WORK_DIR = ".work"


class StageError(MidpoError, RuntimeError):
    """An input or partial output a chunked stage cannot use; the message names file/row and reason."""


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
# the runner


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
    # rank 0, after each chunk it published to the work folder (argument: chunks written so far in this run):
    # the seam tests use to stop a run at a known point (tests/support/faults.py)
    on_chunk: Callable[[int], None] | None = None
    # sequence parallelism (runtime.seqpar.SeqGroups): rows go to SP groups, every rank of a group scores the same
    # micro-batches (its columns of them) and the group's first rank hands the records in
    seq_groups: object | None = None


def _chunk_path(work: Path, split: str, c: int, n: int) -> Path:
    return work / split / f"chunk-{c:05d}-of-{n:05d}.arrow"


def write_table(table: pa.Table, path: Path) -> None:
    """One Arrow IPC file, written atomically (runtime.files.atomic_file)."""
    with atomic_file(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


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


def run_split(spec: StageSpec, split: str, data) -> dict:
    """Compute every missing chunk of one split, then (rank 0) merge, verify and publish it."""
    from tqdm import tqdm

    from midpo.runtime.seqpar import data_parallel

    rank, world = pdist.rank(), pdist.world_size()
    sp = spec.seq_groups
    dp_world, dp_rank = data_parallel(sp, world, rank)
    work = spec.out_dir / WORK_DIR
    n_rows = len(data)
    chunks = chunk_ranges(n_rows, spec.rows_per_shard)
    pending = [c for c, _ in enumerate(chunks) if not _chunk_path(work, split, c, len(chunks)).exists()]
    pending = pdist.broadcast_object(pending)  # rank 0's view of the shared folder decides, so all ranks agree
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
        parts = assign_to_ranks(costs[start:end], dp_world)
        mine = [start + i for i in parts[dp_rank]]
        batches = plan_micro_batches(mine, costs, spec.micro_batch_tokens, spec.packing)
        n_steps = pdist.all_max(len(batches))  # every rank runs n_steps forwards: no collective can hang
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
                spec.score(dummy)  # padding work: same forward, result dropped (a whole SP group pads together)
        gathered = pdist.gather_objects(records if sp is None or sp.rank == 0 else [])  # a group's rows once
        if rank == 0:
            allrec = sorted((r for part in gathered for r in part), key=lambda r: r["_row"])
            if [r["_row"] for r in allrec] != list(range(start, end)):
                raise StageError(f"{spec.name} {split} chunk {c}: gathered rows do not cover {start}..{end}")
            write_table(records_to_table(allrec, spec.schema), _chunk_path(work, split, c, len(chunks)))
            bar.update(real(start, end) - shown)  # the other ranks' tokens of this chunk
            bar.set_postfix(chunk=f"{c + 1}/{len(chunks)}", refresh=False)
            written += 1
            if spec.on_chunk is not None:
                spec.on_chunk(written)
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
            raise StageError(f"{path} missing after all ranks finished: refusing to publish {split}")
        t = _read_table(path)
        if t.schema != spec.schema:
            raise StageError(f"{path}: schema {t.schema} differs from the expected {spec.schema}")
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
        raise StageError(f"{where}: {len(table)} rows but the data split has {len(data)}")
    ids = table.column("id").to_pylist()
    hashes = table.column("tokens_hash").to_pylist()
    data_ids = data["id"]
    for i, (a, b) in enumerate(zip(ids, data_ids, strict=True)):
        if a != b:
            raise StageError(f"{where}: row {i} has id {a!r}, data has {b!r}")
    for i, row in enumerate(data):
        if hashes[i] != row_tokens_hash(row):
            raise StageError(f"{where}: row {i} (id {row['id']}) token hash differs from the data's")
    per_token = [(side, name) for side in ("chosen", "rejected") for name in (f"{side}_ref_logps", f"{side}_weights")
                 if name in table.column_names]
    for side, name in per_token:
        got = table.column(name).combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        want = np.fromiter((len(x) for x in data[f"{side}_ids"]), dtype=np.int64, count=len(data))
        bad = np.nonzero(got != want)[0]
        if len(bad):
            i = int(bad[0])
            raise StageError(f"{where}: row {i} (id {data_ids[i]}) has {got[i]} {name} values for "
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
    skip = pdist.broadcast_object(_check_input_and_output(spec, data_dir, splits, force) if pdist.is_main() else None)
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


