"""Stage 1's work (`midpo prep`, midpo.stages.prep): raw preference files -> validated, tokenized, sharded Arrow.

    <out>/train/, <out>/eval/   datasets.save_to_disk folders: id, prompt_ids, chosen_ids, rejected_ids
    <out>/rejects.jsonl         every unusable row: file, row, reason, detail
    <out>/manifest.json         written last; its `fingerprint` covers inputs, tokenizer and settings

The whole folder is built under a temp name and renamed when complete. A re-run whose fingerprint
matches the existing manifest, and whose split files match the content hashes and row counts recorded
in it, does nothing; a changed input, tokenizer or setting, a damaged or edited output, or `--force`
rebuilds.
Inputs are streamed in chunks (bounded in rows and bytes, and in flight), so memory does not grow
with the input, except for the dedup set (16-byte ids: ~80 bytes per kept row); one over-long row
costs its own text, never a tokenization of it (see midpo/data/tokenization.py).

Refused before any work: an empty input file, an output folder that holds an input or that midpo did
not write (midpo/runtime/files.py), and a data.max_length over the model's positions when the
tokenizer folder (or the recipe's model folder) holds the model's config.json.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from midpo.config import DataConfig
from midpo.data import formats as fmts
from midpo.data.shards import COLUMNS, EXTRA_COLUMNS, SplitWriter
from midpo.data.sources import InputError, Source, decode_json_row, file_size, iter_rows, resolve_inputs
from midpo.data.tokenization import Encoded, EncodeSettings, PairEncoder, Rejected, extra_end_ids, is_eval
from midpo.errors import MidpoError
from midpo.runtime.files import atomic_write_json, check_replaceable, publish_dir, temp_dir_for
from midpo.runtime.fingerprint import hash_file, hash_json
from midpo.runtime.integrity import split_damage
from midpo.runtime.models import tokenizer_files, tokenizer_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the output for the same inputs and settings changes
CHUNK_ROWS = 512  # rows per work unit sent to a tokenizer worker
CHUNK_BYTES = 16 << 20  # ... and at most this many bytes of raw JSON lines (a chunk holds at least one row)
DETAIL_CHARS = 500  # a reject's detail is clipped: it may quote a huge field
DETECT_PEEK_ROWS = 200  # rows read to auto-detect a file's format
EXAMPLES_PER_REASON = 3
# DataConfig fields that change the output (num_proc and max_reject_fraction do not)
OUTPUT_SETTINGS = ("format", "max_prompt_tokens", "max_length", "prompt_overflow", "response_overflow",
                   "eval_fraction", "shard_rows", "dedup", "system_prompt", "columns", "split", "eval_split",
                   "pairing", "min_score_margin", "seed", "mix")


class PrepError(MidpoError, RuntimeError):
    """The stage cannot produce a trustworthy output (e.g. too many rejected rows)."""


# ---------------------------------------------------------------------------------------------
# fingerprints


def source_fingerprint(src: Source) -> dict[str, Any]:
    # content only (names, sizes, hashes): moving a run folder does not invalidate it
    return {
        "kind": src.kind,
        "files": [{"name": f.name, "size": file_size(f), "sha256": hash_file(f)} for f in src.files],
    }


# ---------------------------------------------------------------------------------------------
# inputs: data.inputs or data.mix -> groups of Sources, each read by a ReadPlan


@dataclass
class Input:
    """One data.inputs path (or glob) or one data.mix entry: its sources and how they are read and mixed."""

    name: str
    sources: list[Source]
    format: str
    columns: dict[str, str]
    pairing: str
    min_score_margin: float
    weight: float | None = None
    max_rows: int | None = None
    where: str = "data"  # the config entry it comes from, for messages


def plan_inputs(cfg: DataConfig, inputs: list[str]) -> list[Input]:
    """The inputs with their settings (a data.mix entry's keys over data.*); errors name the entry."""
    entries = cfg.mix or [{"path": spec} for spec in inputs]
    if not entries:
        raise InputError("no inputs given")
    out = []
    for i, e in enumerate(entries):
        where = f"data.mix[{i}]" if cfg.mix else "data"
        get = lambda k, e=e: e.get(k) if e.get(k) is not None else getattr(cfg, k)  # noqa: E731
        fmt = get("format")
        if fmt != "auto":
            fmts.get_format(fmt)  # unknown name -> error listing the registry
        columns = {**cfg.columns, **(e.get("columns") or {})}
        fmts.check_columns(columns, f"{where}.columns")
        sources = resolve_inputs([e["path"]], get("split"), get("eval_split"))
        out.append(Input(e["path"], sources, fmt, columns, get("pairing"), float(get("min_score_margin")),
                         e.get("weight"), e.get("max_rows"), where))
    seen: dict[Path, str] = {}
    for inp in out:
        for src in inp.sources:
            key = src.path.resolve() / (src.split or "")
            if key in seen:
                raise InputError(f"input {src.describe()} is listed twice ({seen[key]!r} and {inp.name!r})")
            seen[key] = inp.name
    return out


def _detect(src: Source, rows: Iterator[tuple[int, Any]], inp: Input, seed: int) -> tuple[fmts.ReadPlan, bool, Iterator]:
    """(the ReadPlan, was the format detected, the same row stream including the rows peeked at). Ambiguous or
    unknown rows are an InputError naming the flag that settles them."""
    plan = lambda name: fmts.ReadPlan(name, tuple(sorted(fmts.effective_columns(name, inp.columns).items())),  # noqa: E731
                                      inp.pairing, inp.min_score_margin, seed)
    flag = "--format NAME (data.format)" if inp.where == "data" else f"format: NAME in {inp.where}"
    if inp.format != "auto":
        return plan(inp.format), False, rows
    peeked = []
    first_keys = None
    for row_no, payload in rows:
        peeked.append((row_no, payload))
        value = decode_json_row(payload) if isinstance(payload, bytes) else payload
        if isinstance(value, dict):
            first_keys = first_keys or sorted(map(str, value))
            names = fmts.detect_formats(value, inp.columns)
            if len(names) > 1:
                raise InputError(
                    f"{src.describe()}: row {row_no} fits several formats ({', '.join(names)}; fields: "
                    f"{sorted(map(str, value))}); pass {flag} to say which (e.g. {names[0]})")
            if names:
                return plan(names[0]), True, itertools.chain(peeked, rows)
        if len(peeked) >= DETECT_PEEK_ROWS:
            break
    if not peeked:
        return plan("standard"), True, iter(())  # an empty file: nothing to read, any format will do
    raise InputError(
        f"{src.describe()}: cannot detect the preference format from its first {len(peeked)} row(s) "
        f"(first object's fields: {first_keys or 'none readable'}). Known formats: "
        + "; ".join(f"{f.name} = {f.description}" for f in fmts.FORMATS.values())
        + f". Pass {flag} to force one, and --columns field=column,... (data.columns) when the column names differ.")


def _chunks(rows: Iterator[tuple[int, Any]], stats: dict) -> Iterator[list[tuple[int, Any]]]:
    chunk: list[tuple[int, Any]] = []
    size = 0
    for row_no, payload in rows:
        if payload is None:
            stats["blank_lines"] += 1
            continue
        stats["rows_read"] += 1
        chunk.append((row_no, payload))
        size += len(payload) if isinstance(payload, bytes) else 0
        if len(chunk) >= CHUNK_ROWS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _check_not_empty(src: Source) -> None:
    """An input with no rows at all is a mistake (a wrong file, a failed export), not a dataset."""
    if all(payload is None for _, payload in iter_rows(src)):  # stops at the first row
        raise InputError(f"input {src.path} holds no rows (an empty file, or only blank lines)")


def _check_positions(max_length: int, model_dirs: tuple[str | Path, ...]) -> None:
    """Refuse a data.max_length over the positions of a model whose folder is known (the tokenizer folder is
    often the model folder; the recipe names the policy): the pairs could never be trained on whole."""
    from midpo.runtime.models import folder_max_positions, positions_problem

    for folder in model_dirs:
        problem = positions_problem(max_length, folder_max_positions(folder), what="data.max_length", model=folder)
        if problem:
            raise PrepError(problem)


def _keep_rejects(rejects: Path, out: Path, inputs: tuple[Path, ...]) -> Path:
    """Copy a failed run's rejects.jsonl beside `out`, never over a file midpo did not write (or an input)."""
    resolved = {Path(p).resolve() for p in inputs}
    for n in itertools.count():
        dest = out.parent / f"{out.name}.rejects{'' if n == 0 else f'.{n}'}.jsonl"
        if not dest.exists() or (dest.resolve() not in resolved and _is_rejects_file(dest)):
            shutil.copyfile(rejects, dest)
            return dest
    raise AssertionError("unreachable")


def _is_rejects_file(path: Path) -> bool:
    """True when `path` is a rejects.jsonl that midpo wrote (each line {file, row, reason, detail})."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline(1 << 16)
        return path.is_file() and (not first or set(json.loads(first)) == {"file", "row", "reason", "detail"})
    except (OSError, ValueError, TypeError):
        return False


class _Runner:
    """Runs chunks in-process (num_proc=1) or on spawned workers with a bounded queue, in order."""

    def __init__(self, encoder: PairEncoder, tokenizer_dir: str, settings: EncodeSettings, num_proc: int):
        from midpo.data import tokenization

        self.num_proc = max(1, int(num_proc))
        self.pool = None
        if self.num_proc == 1:
            self._fn = encoder.process
        else:
            import multiprocessing as mp

            # spawn, not fork: the parent may hold tokenizers/torch threads that fork would corrupt
            self.pool = mp.get_context("spawn").Pool(
                self.num_proc, initializer=tokenization.worker_init,
                initargs=(tokenizer_dir, json.dumps(dataclasses.asdict(settings))))

    def map(self, jobs: Iterator[tuple[str, str, list]]) -> Iterator[tuple[tuple[str, str, list], list]]:
        if self.pool is None:
            for job in jobs:
                yield job, self._fn(*job)
            return
        from midpo.data import tokenization

        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append((job, self.pool.apply_async(tokenization.worker_process, job)))
            if len(pending) >= 2 * self.num_proc:  # bounded: memory stays flat however big the input
                j, res = pending.popleft()
                yield j, res.get()
        while pending:
            j, res = pending.popleft()
            yield j, res.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


# ---------------------------------------------------------------------------------------------
# the work


def _settings(cfg: DataConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in OUTPUT_SETTINGS}


def _is_complete(out: Path, fingerprint: str) -> dict | None:
    """The existing manifest when `out` is complete for `fingerprint` and its files are as recorded
    (content hashes, row counts); damage is logged, and the caller rebuilds."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not (manifest.get("complete") and manifest.get("fingerprint") == fingerprint):
        return None
    for split in ("train", "eval"):
        damage = split_damage(out / split, manifest.get("splits", {}).get(split), out / "manifest.json")
        if damage:
            log.warning("prep: %s; rebuilding %s", damage, out)
            return None
    return manifest


def prepare(cfg: DataConfig, inputs: list[str], tokenizer_dir: str | Path, out_dir: str | Path, *,
            model_dirs: tuple[str | Path, ...] = (), force: bool = False) -> dict:
    """Run stage 1; returns the manifest. Raises InputError (unreadable or empty input, undetectable or ambiguous
    format), PrepError (too many rejects, max_length over the model's positions), OutputDirError (an output folder
    midpo may not replace) or ValueError (bad tokenizer); a bad row never raises.
    inputs: files, globs or folders (ignored when data.mix lists the inputs).
    model_dirs: folders of the models that will train on the data (the tokenizer folder is checked too).
    force: rebuild even when `out_dir` is complete and intact for the same fingerprint."""
    out = Path(out_dir)
    tokenizer_dir = str(tokenizer_dir)
    if cfg.format != "auto":
        fmts.get_format(cfg.format)  # unknown name -> error listing the registry
    if not Path(tokenizer_dir).is_dir():
        raise InputError(f"tokenizer folder {tokenizer_dir} does not exist")
    groups = plan_inputs(cfg, list(inputs))
    sources = [(gi, g, src) for gi, g in enumerate(groups) for src in g.sources]
    input_files = tuple(f for _, _, s in sources for f in s.files)
    check_replaceable(out, inputs=input_files)  # before any work
    _check_positions(cfg.max_length, (tokenizer_dir, *model_dirs))
    for _, _, src in sources:
        _check_not_empty(src)
    tok_fp = {"files": tokenizer_files(tokenizer_dir), "fingerprint": tokenizer_fingerprint(tokenizer_dir)}
    src_fps = [source_fingerprint(s) for _, _, s in sources]
    fp_parts = {"format_version": FORMAT_VERSION, "tokenizer": tok_fp["fingerprint"], "sources": src_fps,
                "settings": _settings(cfg)}
    ends = extra_end_ids(tokenizer_dir)  # generation_config.json's turn ends: they cut responses too
    if ends:  # only then, so a tokenizer folder and its model's folder keep one fingerprint
        fp_parts["turn_end_ids"] = ends
    fingerprint = hash_json(fp_parts)
    done = None if force else _is_complete(out, fingerprint)
    if done is not None:
        log.info("prep: %s is up to date (fingerprint %s; files match their hashes); nothing to do", out,
                 fingerprint[:12])
        return done
    if force:
        log.info("prep: --force: rebuilding %s", out)

    settings = EncodeSettings(cfg.max_prompt_tokens, cfg.max_length, cfg.prompt_overflow,
                              cfg.response_overflow, cfg.system_prompt)
    encoder = PairEncoder(tokenizer_dir, settings)  # also validates the tokenizer before any work
    tmp = temp_dir_for(out, "prep")
    runner = None
    try:
        (tmp / "stage").mkdir(parents=True)
        reject_counts: collections.Counter = collections.Counter()
        examples: dict[str, list] = collections.defaultdict(list)
        seen: set[int] = set()
        trunc = {"prompts_truncated": 0, "responses_truncated": 0}
        longest = 0  # prompt + longer response, in tokens: what a model's positions must cover
        src_stats: list[dict] = []
        metas_seen: set[str] = set()
        runner = _Runner(encoder, tokenizer_dir, settings, cfg.num_proc)
        from tqdm.auto import tqdm

        bar = tqdm(desc="prep", unit="rows", mininterval=1.0, dynamic_ncols=True)
        started = time.perf_counter()
        with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as rej_f:

            def reject(file: str, row: int, reason: str, detail: str, stats: dict) -> None:
                rec = {"file": file, "row": row, "reason": reason, "detail": detail[:DETAIL_CHARS]}
                rej_f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                reject_counts[reason] += 1
                stats["rows_rejected"] += 1
                stats["rejected_by_reason"][reason] = stats["rejected_by_reason"].get(reason, 0) + 1
                if len(examples[reason]) < EXAMPLES_PER_REASON:
                    examples[reason].append(rec)

            # pass 1: every source -> its valid pairs, staged (Arrow on disk, memory stays flat)
            for k, ((gi, g, src), fp) in enumerate(zip(sources, src_fps)):
                stats = {"path": str(src.path), **({"split": src.split} if src.split else {}),
                         **({"eval_split": True} if src.eval else {}), "input": g.name, "input_index": gi, **fp,
                         "fingerprint": hash_json(fp)[:16], "rows_read": 0, "rows_kept": 0, "rows_rejected": 0,
                         "blank_lines": 0, "rejected_by_reason": {}}
                plan, detected, rows = _detect(src, iter_rows(src), g, cfg.seed)
                cols = dict(plan.columns)
                stats.update(format=plan.format, format_detected=detected, columns=cols)
                if plan.format in fmts.RATED:
                    stats.update(pairing=plan.pairing, min_score_margin=plan.min_score_margin)
                log.info("prep: reading %s as %s (%s; columns %s)", src.describe(), plan.format,
                         "detected" if detected else "as set", ", ".join(f"{f}={c}" for f, c in cols.items()) or "-")
                stage = _Stage(tmp / "stage" / f"{k}.arrow")
                rows_before = stats["rows_read"]
                results_n = 0
                jobs = ((str(src.path), plan, chunk) for chunk in _chunks(rows, stats))
                for (_, _, chunk), results in runner.map(jobs):
                    results_n += len(results)
                    for res in results:
                        if isinstance(res, Rejected):
                            reject(str(src.path), res.row, res.reason, res.detail, stats)
                            continue
                        assert isinstance(res, Encoded)
                        key = int(res.id, 16)
                        if cfg.dedup and key in seen:
                            reject(str(src.path), res.row, "duplicate", f"pair id {res.id} seen earlier", stats)
                            continue
                        if cfg.dedup:
                            seen.add(key)
                        stage.add(res)
                        trunc["prompts_truncated"] += res.prompt_truncated
                        trunc["responses_truncated"] += res.responses_truncated
                        longest = max(longest, len(res.prompt_ids) + max(len(res.chosen_ids), len(res.rejected_ids)))
                        stats["rows_kept"] += 1
                    stage.flush()
                    bar.update(len(chunk))
                stage.close()
                metas_seen |= stage.metas
                stats["extra_pairs"] = results_n - (stats["rows_read"] - rows_before)
                stats["stage"] = stage
                src_stats.append(stats)
        bar.close()
        runner.close()
        runner = None

        # pass 2: the mix's selection, the eval split, the final shards
        selections = _select(groups, src_stats, cfg)
        extra = tuple(c for c in fmts.META_COLUMNS if c in metas_seen) + (("source",) if len(groups) > 1 else ())
        writers = {s: SplitWriter(tmp / s, cfg.shard_rows, extra) for s in ("train", "eval")}
        for k, stats in enumerate(src_stats):
            stage = stats.pop("stage")
            sel = selections[k]
            n_out = {"train": 0, "eval": 0}
            for start, batch in stage.batches():
                n = batch.num_rows
                keep = sel.keep[start:start + n] if sel.keep is not None else None
                ids = batch.column("id").to_pylist()
                to_eval = [sel.eval_all or (not sel.no_eval and (is_eval(x, cfg.eval_fraction) or x == sel.force_eval))
                           for x in ids]
                if len(groups) > 1:
                    batch = batch.append_column("source", pa.array([stats["input"]] * n, pa.string()))
                for split, want in (("eval", True), ("train", False)):
                    mask = [t == want and (keep is None or bool(keep[j])) for j, t in enumerate(to_eval)]
                    if any(mask):
                        part = batch.filter(pa.array(mask))
                        writers[split].write_batch(part)
                        n_out[split] += part.num_rows
            stage.remove()
            stats["rows_dropped_by_mix"] = stats["rows_kept"] - n_out["train"] - n_out["eval"]
            stats["rows_kept"] = n_out["train"] + n_out["eval"]
            stats["rows_train"], stats["rows_eval"] = n_out["train"], n_out["eval"]
            assert stats["rows_read"] + stats["extra_pairs"] == (stats["rows_kept"] + stats["rows_rejected"]
                                                                 + stats["rows_dropped_by_mix"]), stats
        elapsed = time.perf_counter() - started

        read = sum(s["rows_read"] for s in src_stats)
        kept = sum(s["rows_kept"] for s in src_stats)
        extra_pairs = sum(s["extra_pairs"] for s in src_stats)
        dropped = sum(s["rows_dropped_by_mix"] for s in src_stats)
        rejected = sum(reject_counts.values())
        assert read + extra_pairs == kept + rejected + dropped, (read, extra_pairs, kept, rejected, dropped)
        units = read + extra_pairs  # every row, or every pair a rated row made, is kept, rejected or mixed out
        # Duplicates are not broken input (the first copy is kept): they are reported (duplicate_fraction)
        # but do not count toward data.max_reject_fraction, which bounds unusable rows only.
        duplicates = reject_counts.get("duplicate", 0)
        bad = rejected - duplicates
        if units and bad / units > cfg.max_reject_fraction:
            kept_rejects = _keep_rejects(tmp / "rejects.jsonl", out, input_files)
            top = [(r, n) for r, n in reject_counts.most_common() if r != "duplicate"][:3]
            lines = [f"  {r}: {n} rows ({fmts.REJECT_REASONS[r]}); e.g. " + "; ".join(
                f"{e['file']} row {e['row']}: {e['detail']}" for e in examples[r][:2]) for r, n in top]
            raise PrepError(
                f"prep: {bad} of {units} rows ({bad / units:.1%}) are unusable, over data.max_reject_fraction="
                f"{cfg.max_reject_fraction:.1%} (duplicates are not counted: {duplicates} rows). Top reasons:\n"
                + "\n".join(lines) + f"\nAll rejected rows: {kept_rejects}. No output was written to {out}.")

        splits = {s: w.close(hash_json([fingerprint, s])) for s, w in writers.items()}
        shutil.rmtree(tmp / "stage")
        rows_rec = {"read": read, "kept": kept, "rejected": rejected}
        if extra_pairs:
            rows_rec["extra_pairs"] = extra_pairs  # rated lists: pairs made beyond one per row
        if dropped:
            rows_rec["dropped_by_mix"] = dropped
        manifest = {
            "format_version": FORMAT_VERSION,
            "complete": True,
            "fingerprint": fingerprint,
            "created_unix": int(time.time()),  # informational; not part of the fingerprint
            "tokenizer": {"path": tokenizer_dir, **tok_fp, **_tokenizer_info(encoder)},
            "settings": _settings(cfg),
            "truncation": {
                "max_prompt_tokens": cfg.max_prompt_tokens,
                "max_length": cfg.max_length,
                "prompt_overflow": cfg.prompt_overflow,
                "prompt_truncation_side": "left (keeps the end and the leading BOS)",
                "response_overflow": cfg.response_overflow,
                "response_truncation_side": "right (a cut response does not end in EOS)",
                **trunc,
            },
            "columns": {"id": "string", "prompt_ids": "list<int32>", "chosen_ids": "list<int32>",
                        "rejected_ids": "list<int32>", **{c: EXTRA_COLUMNS[c] for c in extra}},
            "sources": src_stats,
            "rows": rows_rec,
            "longest_pair_tokens": longest,
            "splits": splits,
            "rejects": {
                "file": "rejects.jsonl",
                "by_reason": dict(sorted(reject_counts.items())),
                # the threshold (data.max_reject_fraction) applies to unusable rows; duplicates are reported apart
                "unusable_fraction": round(bad / units, 6) if units else 0.0,
                "duplicate_fraction": round(duplicates / units, 6) if units else 0.0,
                "explanations": {r: fmts.REJECT_REASONS[r] for r in sorted(reject_counts)},
                "examples": {r: examples[r] for r in sorted(examples)},
            },
            "elapsed_s": round(elapsed, 3),
        }
        if cfg.mix:
            manifest["mix"] = _mix_record(groups, src_stats, selections)
        atomic_write_json(tmp / "manifest.json", manifest)  # last: marks the folder complete
        publish_dir(tmp, out)
    except BaseException:
        if runner is not None and runner.pool is not None:
            runner.pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prep: %d rows read, %d kept (train %d, eval %d), %d rejected %s in %.1fs -> %s",
             read, kept, splits["train"]["rows"], splits["eval"]["rows"], rejected,
             dict(reject_counts) or "", elapsed, out)
    log.info("prep: %.1f%% of rows unusable (limit data.max_reject_fraction=%.1f%%), %.1f%% duplicates (not counted "
             "toward the limit); longest pair %d tokens (data.max_length %d)", 100 * bad / max(units, 1),
             100 * cfg.max_reject_fraction, 100 * duplicates / max(units, 1), longest, cfg.max_length)
    if splits["eval"]["rows"] == 0:
        log.warning("prep: the eval split is empty (data.eval_fraction=%s, %d rows kept): training will run without "
                    "evaluation", cfg.eval_fraction, kept)
    return manifest


# ---------------------------------------------------------------------------------------------
# staging and selection


class _Stage:
    """One source's valid pairs as an Arrow stream file (ids, scores), written chunk by chunk and read back once."""

    SCHEMA = pa.schema([("id", pa.string()), *((c, pa.list_(pa.int32())) for c in COLUMNS[1:]),
                        *((c, pa.float64()) for c in fmts.META_COLUMNS)])

    def __init__(self, path: Path):
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.SCHEMA)
        self._cols: dict[str, list] = {c: [] for c in self.SCHEMA.names}
        self.rows = 0
        self.metas: set[str] = set()  # meta columns with at least one value
        self.min_id: str | None = None

    def add(self, res: Encoded) -> None:
        c = self._cols
        c["id"].append(res.id)
        c["prompt_ids"].append(res.prompt_ids)
        c["chosen_ids"].append(res.chosen_ids)
        c["rejected_ids"].append(res.rejected_ids)
        for name, v in zip(fmts.META_COLUMNS, res.meta):
            c[name].append(v)
            if v is not None:
                self.metas.add(name)
        if self.min_id is None or res.id[:16] < self.min_id[:16]:
            self.min_id = res.id

    def flush(self) -> None:
        if self._cols["id"]:
            self._writer.write_batch(pa.RecordBatch.from_pydict(self._cols, schema=self.SCHEMA))
            self.rows += len(self._cols["id"])
            self._cols = {c: [] for c in self.SCHEMA.names}

    def close(self) -> None:
        self.flush()
        self._writer.close()
        self._sink.close()

    def batches(self) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(row offset, batch) in written order."""
        start = 0
        with pa.memory_map(str(self.path), "r") as src:
            for batch in pa.ipc.open_stream(src):
                yield start, batch
                start += batch.num_rows

    def ids(self) -> list[str]:
        out: list[str] = []
        for _, b in self.batches():
            out.extend(b.column("id").to_pylist())
        return out

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class _Selection:
    keep: Any = None  # numpy bool per staged row (None: all)
    eval_all: bool = False  # an eval_split source: all its rows are eval
    no_eval: bool = False  # a source whose input has an eval_split: none of its rows are eval
    force_eval: str | None = None  # a row sent to eval so a small input is represented (see _select)


def mix_key(seed: int, rid: str) -> int:
    """A row's place in its input's selection order: 64 bits of sha256("<seed>:<id>"), independent of the eval
    split (which uses the id's own first 64 bits)."""
    return int(hashlib.sha256(f"{seed}:{rid}".encode()).hexdigest()[:16], 16)


def mix_takes(available: list[int], weights: list[float | None], caps: list[int | None]) -> list[int]:
    """Pairs taken from each input: with weights, the largest mix whose shares are the weights' (rounded down to
    whole rows) within each input's kept pairs and cap; without, each input's kept pairs up to its cap."""
    lim = [a if c is None else min(a, c) for a, c in zip(available, caps)]
    if all(w is None for w in weights):
        return lim
    total = sum(weights)  # type: ignore[arg-type]
    shares = [w / total for w in weights]  # type: ignore[operator]
    t = min(n / s for n, s in zip(lim, shares))
    return [min(n, int(math.floor(t * s + 1e-9))) for n, s in zip(lim, shares)]


def _select(groups: list[Input], src_stats: list[dict], cfg: DataConfig) -> list[_Selection]:
    """Each source's selection: the mix (a deterministic subset of each input by mix_key, in the sizes of
    mix_takes) and its eval split: an input's eval_split source whole, else the rows is_eval picks, plus, when
    that leaves an input of two or more rows without any, its row of smallest id hash (small inputs are
    represented)."""
    import numpy as np

    sel = [_Selection() for _ in src_stats]
    by_group = [[k for k, s in enumerate(src_stats) if s["input_index"] == gi] for gi in range(len(groups))]
    avail = [sum(src_stats[k]["rows_kept"] for k in ks if not src_stats[k].get("eval_split")) for ks in by_group]
    takes = mix_takes(avail, [g.weight for g in groups], [g.max_rows for g in groups])
    for ks, n, take in zip(by_group, avail, takes):
        main = [k for k in ks if not src_stats[k].get("eval_split")]
        has_eval_split = len(main) < len(ks)
        for k in ks:
            sel[k].eval_all = bool(src_stats[k].get("eval_split"))
            sel[k].no_eval = has_eval_split and not sel[k].eval_all
        ids_by_src = None
        if take < n:
            ids_by_src = {k: src_stats[k]["stage"].ids() for k in main}
            keys = np.array([mix_key(cfg.seed, x) for k in main for x in ids_by_src[k]], dtype=np.uint64)
            order = np.argsort(keys, kind="stable")
            keep = np.zeros(len(keys), dtype=bool)
            keep[order[:take]] = True
            start = 0
            for k in main:
                sel[k].keep = keep[start:start + len(ids_by_src[k])]
                start += len(ids_by_src[k])
        if has_eval_split or cfg.eval_fraction <= 0 or take < 2:
            continue
        # the input's eval rows among those kept; none -> its kept row of smallest id hash
        cands = []
        for k in main:
            if ids_by_src is None:
                stage = src_stats[k]["stage"]
                if stage.min_id is not None:
                    cands.append((stage.min_id[:16], k, stage.min_id, _has_eval(stage, cfg.eval_fraction)))
            else:
                kept_ids = [x for x, ok in zip(ids_by_src[k], sel[k].keep) if ok]
                if kept_ids:
                    m = min(kept_ids, key=lambda x: x[:16])
                    cands.append((m[:16], k, m, any(is_eval(x, cfg.eval_fraction) for x in kept_ids)))
        if cands and not any(c[3] for c in cands):
            _, k, rid, _ = min(cands)
            sel[k].force_eval = rid
    return sel


def _has_eval(stage: _Stage, fraction: float) -> bool:
    # the smallest id hash decides: is_eval is a threshold on it
    return stage.min_id is not None and is_eval(stage.min_id, fraction)


def _mix_record(groups: list[Input], src_stats: list[dict], selections: list[_Selection]) -> list[dict]:
    out = []
    for gi, g in enumerate(groups):
        ss = [s for s in src_stats if s["input_index"] == gi]
        out.append({"input": g.name, "weight": g.weight, "max_rows": g.max_rows,
                    "rows_read": sum(s["rows_read"] for s in ss),
                    "rows_rejected": sum(s["rows_rejected"] for s in ss),
                    "rows_dropped_by_mix": sum(s["rows_dropped_by_mix"] for s in ss),
                    "rows_kept": sum(s["rows_kept"] for s in ss),
                    "rows_train": sum(s["rows_train"] for s in ss), "rows_eval": sum(s["rows_eval"] for s in ss)})
    total = sum(r["rows_kept"] for r in out)
    for r in out:
        r["share"] = round(r["rows_kept"] / total, 6) if total else 0.0
    return out


def _tokenizer_info(encoder: PairEncoder) -> dict[str, Any]:
    tok = encoder.tok
    return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


