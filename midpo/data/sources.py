"""Input files -> a stream of raw rows, never the whole file in memory.

Supported: `.jsonl` (one JSON object per line), `.json` (a JSON array, streamed element by element,
or JSON lines), `.parquet` (record batches), `.arrow` (Arrow IPC file or stream format, memory
mapped), and a `datasets.save_to_disk` folder (its `.arrow` files).

Rows are numbered from 1: the line number for JSON lines, the element/record number otherwise.
A row is yielded as `(row_no, payload)`; payload is `bytes` (an undecoded JSON line, parsed later in
a worker), a `dict`, a `RowError` for a row that could not even be read, or None for a blank line.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midpo.errors import MidpoError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow")
_BATCH_ROWS = 1024
_JSON_CHUNK = 1 << 20
_JSON_MAX_ELEMENT = 256 << 20  # one array element larger than this is treated as corrupt


class InputError(MidpoError, ValueError):
    """An input that cannot be read at all (missing, unsupported, not a dataset)."""


@dataclass(frozen=True)
class RowError:
    """A row rejected before it became a canonical pair. `reason` is a key of REJECT_REASONS."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Source:
    path: Path  # the file, or the save_to_disk folder
    kind: str  # jsonl | json | parquet | arrow | hf_dataset
    files: tuple[Path, ...]  # the files that hold its bytes (hashed for the fingerprint)

    def describe(self) -> str:
        return str(self.path)


def resolve_inputs(inputs: list[str]) -> list[Source]:
    """Expand paths and globs (sorted, duplicates removed) into Sources; errors name the input."""
    if not inputs:
        raise InputError("no inputs given")
    out: list[Source] = []
    seen: set[Path] = set()
    for spec in inputs:
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise InputError(f"input {spec!r} matches no files")
        for m in matches:
            p = Path(m)
            if not p.exists():
                raise InputError(f"input {p} does not exist")
            rp = p.resolve()
            if rp in seen:
                continue
            seen.add(rp)
            out.append(_source(p))
    return out


def _source(p: Path) -> Source:
    if p.is_dir():
        if (p / "dataset_dict.json").exists():
            splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
            raise InputError(f"input {p} is a DatasetDict with splits {splits}; pass one split folder, "
                             f"e.g. {p / (splits[0] if splits else 'train')}")
        state = p / "state.json"
        if not state.exists():
            raise InputError(f"input {p} is a folder but not a datasets.save_to_disk folder (no state.json)")
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"input {p}: unreadable state.json ({e})") from None
        files = tuple(p / n for n in names)
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise InputError(f"input {p}: state.json lists missing files {missing}")
        return Source(p, "hf_dataset", files)
    ext = p.suffix.lower()
    if ext not in EXTENSIONS:
        raise InputError(f"input {p}: unsupported file type {ext or '(none)'}; supported: "
                         f"{', '.join(EXTENSIONS)} or a datasets.save_to_disk folder")
    return Source(p, ext[1:], (p,))


def iter_rows(src: Source) -> Iterator[tuple[int, Any]]:
    if src.kind == "jsonl":
        yield from _iter_jsonl(src.path)
    elif src.kind == "json":
        yield from _iter_json(src.path)
    elif src.kind == "parquet":
        yield from _iter_parquet(src.path)
    elif src.kind in ("arrow", "hf_dataset"):
        n = 0
        for f in src.files:
            for _, row in _iter_arrow(f):
                n += 1
                yield n, row
    else:  # pragma: no cover - resolve_inputs only makes the kinds above
        raise InputError(f"{src.path}: unknown source kind {src.kind}")


_UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line_no == 1:
                line = _strip_bom(path, line)
            # blank lines are layout, not rows: yielded as None so the caller counts them
            yield line_no, (line if line.strip() else None)


def _strip_bom(path: Path, head: bytes) -> bytes:
    """The first bytes of a file without a UTF-8 byte-order mark (editors on Windows write one; it is
    not part of the first row). A UTF-16 file cannot be read as UTF-8 at all: an InputError, not
    one invalid_utf8 reject per row."""
    if head.startswith(_UTF16_BOMS):
        raise InputError(f"input {path} is UTF-16 encoded (byte-order mark {head[:2].hex()}); "
                         "midpo reads UTF-8: convert the file, e.g. `iconv -f UTF-16 -t UTF-8`")
    return head[len(_UTF8_BOM):] if head.startswith(_UTF8_BOM) else head


def decode_json_row(payload: bytes) -> Any:
    """bytes of one JSON line -> the parsed value, or a RowError (invalid UTF-8 / JSON)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError("invalid_utf8", f"byte {e.start}: {e.reason}")
    try:
        return json.loads(text)
    except ValueError as e:
        return RowError("invalid_json", str(e))


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        head = _strip_bom(path, f.read(4096)).lstrip()
    if not head.startswith(b"["):
        yield from _iter_jsonl(path)  # many `.json` files are JSON lines
        return
    yield from _iter_json_array(path)


def _iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Stream the elements of a top-level JSON array with raw_decode over a sliding buffer.
    A syntax or encoding error cannot be resynchronized: it becomes one reject row that also
    says the rest of the file was not read."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8-sig")()
    buf, pos, n, eof = "", 0, 0, False
    started = False
    with open(path, "rb") as f:

        def more() -> bool:
            nonlocal buf, pos, eof
            chunk = f.read(_JSON_CHUNK)
            buf = buf[pos:] + utf8.decode(chunk, final=not chunk)
            pos = 0
            eof = not chunk
            return bool(chunk)

        try:
            more()
            while True:
                while True:  # skip whitespace and separators
                    while pos < len(buf) and buf[pos] in " \t\r\n":
                        pos += 1
                    if pos < len(buf) or eof:
                        break
                    more()
                if pos >= len(buf):
                    yield n + 1, RowError("invalid_json", "unexpected end of file inside the top-level array")
                    return
                c = buf[pos]
                if not started:
                    started = True
                    pos += 1  # the "["
                    continue
                if c == "]":
                    return
                if c == "," and n > 0:
                    pos += 1
                    continue
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except ValueError as e:
                    if not eof and len(buf) - pos < _JSON_MAX_ELEMENT:
                        more()  # probably an element cut by the chunk boundary
                        continue
                    yield n + 1, RowError("invalid_json", f"{e}; the rest of the file was not read")
                    return
                if end == len(buf) and not eof:
                    more()  # a number at the buffer end may continue in the next chunk
                    continue
                n += 1
                yield n, value
                pos = end
        except UnicodeDecodeError as e:
            yield n + 1, RowError("invalid_utf8", f"{e.reason}; the rest of the file was not read")


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    n = 0
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise InputError(f"input {path}: not a readable Parquet file ({e})") from None
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _iter_arrow(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        source.seek(0)
        try:
            batches = iter(pa.ipc.open_stream(source))  # datasets writes the stream format
        except pa.ArrowInvalid as e:
            raise InputError(f"input {path}: not an Arrow IPC file or stream ({e})") from None
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield n, row


def file_size(path: Path) -> int:
    return os.stat(path).st_size
