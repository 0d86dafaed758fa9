"""Content fingerprints shared by every stage: a stage skips work whose fingerprint matches and
refuses inputs whose fingerprint does not.

Hash files on disk, never `state_dict()` (under ZeRO-3 parameters are empty placeholders until
gathered, so a module hash can be blind to the weights).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 1 << 20

# Files that define a tokenizer (vocab/model, special tokens, chat template). One list, used by
# every stage, so the same folder always gets the same fingerprint.
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
                   "vocab*", "merges.txt", "*.model", "*.tiktoken")


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    return hash_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def hash_dir(path: str | Path, patterns: tuple[str, ...] = ("*",), exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative file name: sha256} for the files under `path` matching `patterns`, sorted."""
    root = Path(path)
    files: set[Path] = set()
    for pat in patterns:
        files.update(p for p in root.rglob(pat) if p.is_file())
    return {
        str(p.relative_to(root)): hash_file(p)
        for p in sorted(files)
        if not any(p.match(x) for x in exclude)
    }


def hash_token_ids(*seqs: Any) -> str:
    """Stable short hash of one row's token id lists (joins cache rows to data rows)."""
    h = hashlib.blake2b(digest_size=12)
    for s in seqs:
        arr = np.asarray(s, dtype="<i4")
        h.update(len(arr).to_bytes(4, "little"))
        h.update(arr.tobytes())
    return h.hexdigest()
