"""Input files -> a stream of raw rows, never the whole file in memory.

Supported: `.jsonl` (one JSON object per line), `.json` (a JSON array, streamed element by element,
or JSON lines), either of them gzip- or zstd-compressed (`.jsonl.gz`, `.json.zst`, ...; zstd through pyarrow's
codec, no extra package), `.parquet` (record batches), `.arrow` (Arrow IPC file or stream format, memory
mapped), a `datasets.save_to_disk` folder (its `.arrow` files), a DatasetDict folder (`split` names the split
read; `eval_split` one read as the eval split), and a folder of data files (sharded parquet/JSON lines as on
the Hub: `<split>-00000-of-00002.parquet` or `<split>/0000.parquet`, grouped into splits the same way).

Rows are numbered from 1: the line number for JSON lines, the element/record number otherwise.
A row is yielded as `(row_no, payload)`; payload is `bytes` (an undecoded JSON line, parsed later in
a worker), a `dict`, a `RowError` for a row that could not even be read, or None for a blank line.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midpo.errors import MidpoError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)-\d{5}-of-\d{5}")  # Hub shard names: train-00000-of-00003...
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
    path: Path  # the file, or the folder
    kind: str  # jsonl | json | parquet | arrow | hf_dataset | folder (data files of the kinds above)
    files: tuple[Path, ...]  # the files that hold its bytes (hashed for the fingerprint)
    split: str | None = None  # the split of a DatasetDict / sharded folder it was read from
    eval: bool = False  # its rows are the eval split (data.eval_split), not drawn by data.eval_fraction

    def describe(self) -> str:
        return str(self.path) + (f" [{self.split}]" if self.split else "")


def resolve_inputs(inputs: list[str], split: str | None = None, eval_split: str | None = None) -> list[Source]:
    """Expand paths and globs (sorted, duplicates removed) into Sources; errors name the input. `split` /
    `eval_split` pick splits of DatasetDict and sharded folders (an eval split becomes a Source with eval=True)."""
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
            out.extend(_sources(p, split, eval_split))
    return out


def _data_kind(p: Path) -> str | None:
    """jsonl | json | parquet | arrow for a data file's name (compressed JSON included), else None."""
    name = p.name.lower()
    for ext, _ in COMPRESSIONS.items():
        if name.endswith(ext):
            name = name[: -len(ext)]
            if not name.endswith((".jsonl", ".json")):
                return None
            break
    ext = os.path.splitext(name)[1]
    return ext[1:] if ext in EXTENSIONS else None


def compression_of(p: Path) -> str | None:
    return next((c for ext, c in COMPRESSIONS.items() if p.name.lower().endswith(ext)), None)


def _split_of(root: Path, f: Path) -> str | None:
    m = _SHARD.match(f.name)
    if m:
        return m.group("split")
    return f.parent.name if f.parent != root else None


def _pick_splits(p: Path, splits: list[str], split: str | None, eval_split: str | None, what: str,
                 require: bool = False) -> list[str]:
    for name, flag in ((split, "data.split"), (eval_split, "data.eval_split")):
        if name is not None and name not in splits:
            raise InputError(f"input {p}: {flag}={name!r} is not one of its splits {splits}")
    if split is None:
        if require or len(splits) != 1 or eval_split is not None:
            raise InputError(f"input {p} is a {what} with splits {splits}; pass one split folder, e.g. "
                             f"{p / (splits[0] if splits else 'train')}, or name the split: --split NAME (data.split; "
                             "--eval-split NAME reads another as the eval split)")
        split = splits[0]
    return [split] + ([eval_split] if eval_split else [])


def _sources(p: Path, split: str | None, eval_split: str | None) -> list[Source]:
    if p.is_dir() and (p / "dataset_dict.json").exists():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        names = _pick_splits(p, splits, split, eval_split, "DatasetDict", require=True)  # named even with one
        return [_with(_source(p / n), split=n, eval=i == 1) for i, n in enumerate(names)]
    if p.is_dir() and not (p / "state.json").exists():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _data_kind(f) and not f.name.startswith("."))
        if not files:
            raise InputError(f"input {p} is a folder but not a datasets.save_to_disk folder (no state.json) and "
                             f"holds no data files ({', '.join(EXTENSIONS)}, optionally .gz/.zst)")
        groups: dict[str | None, list[Path]] = {}
        for f in files:
            groups.setdefault(_split_of(p, f), []).append(f)
        if list(groups) == [None]:
            if split or eval_split:
                raise InputError(f"input {p}: its files are not named by split; data.split/eval_split do not apply")
            return [Source(p, "folder", tuple(files))]
        names = _pick_splits(p, sorted(str(g) for g in groups), split, eval_split, "sharded folder")
        return [Source(p, "folder", tuple(groups[n]), split=n, eval=i == 1) for i, n in enumerate(names)]
    if split or eval_split:
        src = _source(p)
        if src.kind != "hf_dataset" or eval_split:
            raise InputError(f"input {p} has no splits; data.split/eval_split apply to DatasetDict and sharded folders")
        return [src]
    return [_source(p)]


def _with(src: Source, **kw) -> Source:
    import dataclasses

    return dataclasses.replace(src, **kw)


def _source(p: Path) -> Source:
    if p.is_dir():
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
    kind = _data_kind(p)
    if kind is None:
        ext = p.suffix.lower()
        raise InputError(f"input {p}: unsupported file type {ext or '(none)'}; supported: "
                         f"{', '.join(EXTENSIONS)} (JSON also .gz/.zst), a datasets.save_to_disk or DatasetDict "
                         "folder, or a folder of such files")
    return Source(p, kind, (p,))


def iter_rows(src: Source) -> Iterator[tuple[int, Any]]:
    if src.kind in ("arrow", "hf_dataset", "folder") or len(src.files) > 1:
        n = 0  # rows (lines, for JSON lines) numbered across the files of one source
        for f in src.files:
            for _, row in _iter_file(f, _data_kind(f) or "arrow"):
                n += 1
                yield n, row
        return
    yield from _iter_file(src.path, src.kind)


def _iter_file(path: Path, kind: str) -> Iterator[tuple[int, Any]]:
    if kind == "jsonl":
        yield from _iter_jsonl(path)
    elif kind == "json":
        yield from _iter_json(path)
    elif kind == "parquet":
        yield from _iter_parquet(path)
    elif kind == "arrow":
        yield from _iter_arrow(path)
    else:  # pragma: no cover - resolve_inputs only makes the kinds above
        raise InputError(f"{path}: unknown file kind {kind}")


def _open(path: Path):
    """A binary reader of the file's (decompressed) bytes, iterable by line."""
    comp = compression_of(path)
    if comp == "gzip":
        return gzip.open(path, "rb")
    if comp == "zstd":
        import io

        import pyarrow as pa

        return io.BufferedReader(pa.input_stream(str(path), compression="zstd"))
    return open(path, "rb")


_UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with _open(path) as f:
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
    with _open(path) as f:
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
    with _open(path) as f:

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
