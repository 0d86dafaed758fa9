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
import itertools
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from midpo.config import DataConfig
from midpo.data import formats as fmts
from midpo.data.shards import COLUMNS, SplitWriter
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
                   "eval_fraction", "shard_rows", "dedup", "system_prompt")


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
# reading


def _detect(src: Source, rows: Iterator[tuple[int, Any]], forced: str) -> tuple[str, bool, Iterator]:
    """(format, was_detected, the same row stream including the rows peeked at)."""
    if forced != "auto":
        return forced, False, rows
    peeked = []
    first_keys = None
    for row_no, payload in rows:
        peeked.append((row_no, payload))
        value = decode_json_row(payload) if isinstance(payload, bytes) else payload
        if isinstance(value, dict):
            first_keys = first_keys or sorted(map(str, value))
            name = fmts.detect_format(value)
            if name:
                return name, True, itertools.chain(peeked, rows)
        if len(peeked) >= DETECT_PEEK_ROWS:
            break
    if not peeked:
        return "standard", True, iter(())  # an empty file: nothing to read, any format will do
    raise InputError(
        f"{src.path}: cannot detect the preference format from its first {len(peeked)} row(s) "
        f"(first object's fields: {first_keys or 'none readable'}). Known formats: "
        + "; ".join(f"{f.name} = {f.description}" for f in fmts.FORMATS.values())
        + ". Pass --format NAME (data.format) to force one."
    )


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
    """Run stage 1; returns the manifest. Raises InputError (unreadable or empty input, undetectable format),
    PrepError (too many rejects, max_length over the model's positions), OutputDirError (an output folder
    midpo may not replace) or ValueError (bad tokenizer); a bad row never raises.
    model_dirs: folders of the models that will train on the data (the tokenizer folder is checked too).
    force: rebuild even when `out_dir` is complete and intact for the same fingerprint."""
    out = Path(out_dir)
    tokenizer_dir = str(tokenizer_dir)
    if cfg.format != "auto":
        fmts.get_format(cfg.format)  # unknown name -> error listing the registry
    if not Path(tokenizer_dir).is_dir():
        raise InputError(f"tokenizer folder {tokenizer_dir} does not exist")
    sources = resolve_inputs(list(inputs))
    input_files = tuple(f for s in sources for f in s.files)
    check_replaceable(out, inputs=input_files)  # before any work
    _check_positions(cfg.max_length, (tokenizer_dir, *model_dirs))
    for src in sources:
        _check_not_empty(src)
    tok_fp = {"files": tokenizer_files(tokenizer_dir), "fingerprint": tokenizer_fingerprint(tokenizer_dir)}
    src_fps = [source_fingerprint(s) for s in sources]
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
        writers = {s: SplitWriter(tmp / s, cfg.shard_rows) for s in ("train", "eval")}
        reject_counts: collections.Counter = collections.Counter()
        examples: dict[str, list] = collections.defaultdict(list)
        seen: set[int] = set()
        trunc = {"prompts_truncated": 0, "responses_truncated": 0}
        longest = 0  # prompt + longer response, in tokens: what a model's positions must cover
        src_stats = []
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
                if len(examples[reason]) < EXAMPLES_PER_REASON:
                    examples[reason].append(rec)

            for src, fp in zip(sources, src_fps):
                stats = {"path": str(src.path), **fp, "rows_read": 0, "rows_kept": 0, "rows_rejected": 0,
                         "blank_lines": 0}
                name, detected, rows = _detect(src, iter_rows(src), cfg.format)
                stats.update(format=name, format_detected=detected)
                log.info("prep: reading %s (%s format%s)", src.path, name, ", detected" if detected else "")
                jobs = ((str(src.path), name, chunk) for chunk in _chunks(rows, stats))
                for (_, _, chunk), results in runner.map(jobs):
                    cols: dict[str, dict[str, list]] = {s: {c: [] for c in COLUMNS} for s in writers}
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
                        split = "eval" if is_eval(res.id, cfg.eval_fraction) else "train"
                        c = cols[split]
                        c["id"].append(res.id)
                        c["prompt_ids"].append(res.prompt_ids)
                        c["chosen_ids"].append(res.chosen_ids)
                        c["rejected_ids"].append(res.rejected_ids)
                        trunc["prompts_truncated"] += res.prompt_truncated
                        trunc["responses_truncated"] += res.responses_truncated
                        longest = max(longest, len(res.prompt_ids) + max(len(res.chosen_ids), len(res.rejected_ids)))
                        stats["rows_kept"] += 1
                    for s, c in cols.items():
                        if c["id"]:
                            writers[s].write(c)
                    bar.update(len(chunk))
                src_stats.append(stats)
        bar.close()
        runner.close()
        runner = None
        elapsed = time.perf_counter() - started

        read = sum(s["rows_read"] for s in src_stats)
        kept = sum(s["rows_kept"] for s in src_stats)
        rejected = sum(reject_counts.values())
        assert read == kept + rejected, (read, kept, rejected)  # every row accounted for
        # Duplicates are not broken input (the first copy is kept): they are reported (duplicate_fraction)
        # but do not count toward data.max_reject_fraction, which bounds unusable rows only.
        duplicates = reject_counts.get("duplicate", 0)
        bad = rejected - duplicates
        if read and bad / read > cfg.max_reject_fraction:
            kept_rejects = _keep_rejects(tmp / "rejects.jsonl", out, input_files)
            top = [(r, n) for r, n in reject_counts.most_common() if r != "duplicate"][:3]
            lines = [f"  {r}: {n} rows ({fmts.REJECT_REASONS[r]}); e.g. " + "; ".join(
                f"{e['file']} row {e['row']}: {e['detail']}" for e in examples[r][:2]) for r, n in top]
            raise PrepError(
                f"prep: {bad} of {read} rows ({bad / read:.1%}) are unusable, over data.max_reject_fraction="
                f"{cfg.max_reject_fraction:.1%} (duplicates are not counted: {duplicates} rows). Top reasons:\n"
                + "\n".join(lines) + f"\nAll rejected rows: {kept_rejects}. No output was written to {out}.")

        splits = {s: w.close(hash_json([fingerprint, s])) for s, w in writers.items()}
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
                        "rejected_ids": "list<int32>"},
            "sources": src_stats,
            "rows": {"read": read, "kept": kept, "rejected": rejected},
            "longest_pair_tokens": longest,
            "splits": splits,
            "rejects": {
                "file": "rejects.jsonl",
                "by_reason": dict(sorted(reject_counts.items())),
                # the threshold (data.max_reject_fraction) applies to unusable rows; duplicates are reported apart
                "unusable_fraction": round(bad / read, 6) if read else 0.0,
                "duplicate_fraction": round(duplicates / read, 6) if read else 0.0,
                "explanations": {r: fmts.REJECT_REASONS[r] for r in sorted(reject_counts)},
                "examples": {r: examples[r] for r in sorted(examples)},
            },
            "elapsed_s": round(elapsed, 3),
        }
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
             "toward the limit); longest pair %d tokens (data.max_length %d)", 100 * bad / max(read, 1),
             100 * cfg.max_reject_fraction, 100 * duplicates / max(read, 1), longest, cfg.max_length)
    if splits["eval"]["rows"] == 0:
        log.warning("prep: the eval split is empty (data.eval_fraction=%s, %d rows kept): training will run without "
                    "evaluation", cfg.eval_fraction, kept)
    return manifest


def _tokenizer_info(encoder: PairEncoder) -> dict[str, Any]:
    tok = encoder.tok
    return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


