"""Helpers shared by the stage-1 tests (fixtures are in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

from midpo.config import DataConfig


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (dumped as JSON) or raw bytes/str lines (written verbatim)."""
    with open(path, "wb") as f:
        for r in rows:
            if isinstance(r, bytes):
                f.write(r.rstrip(b"\n") + b"\n")
            elif isinstance(r, str):
                f.write(r.encode("utf-8").rstrip(b"\n") + b"\n")
            else:
                f.write(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n")
    return path


def data_cfg(**kw) -> DataConfig:
    base = dict(max_prompt_tokens=96, max_length=160, eval_fraction=0.0, max_reject_fraction=1.0)
    base.update(kw)
    return DataConfig(**base)


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def all_rows(out: Path) -> list[dict]:
    from midpo.runtime.prepared import load_split

    rows = []
    for split in ("train", "eval"):
        rows.extend(load_split(out, split).to_list())
    return rows


def expected_ids(sp, prompt: str, response: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """The ids the chat template must produce, built by hand from sentencepiece pieces:
    <s>[<|system|>S</s>]<|user|>P</s><|assistant|>  +  R</s>"""
    bos, eos = sp.bos_id(), sp.eos_id()
    user, asst, sys_ = (sp.piece_to_id(t) for t in ("<|user|>", "<|assistant|>", "<|system|>"))
    p = [bos]
    if system is not None:
        p += [sys_, *sp.encode(system), eos]
    p += [user, *sp.encode(prompt), eos, asst]
    return p, [*sp.encode(response), eos]


# The embedded default at test size (tests/conftest.py builds it once per session).
TINY_SYNTH = dict(n_pairs=300, n_eval_prompts=40, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=2, num_kv_heads=1, max_position_embeddings=256)
