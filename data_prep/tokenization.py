"""Canonical pairs -> token ids: chat template, prompt/response boundary check, truncation.

Rule (one place): the prompt is rendered with `add_generation_prompt=True`; each response is the
tail of the rendered full conversation (prompt + response messages) after the prompt. Both texts
are tokenized with `add_special_tokens=False` (the template already holds BOS). A pair is kept only
if the templated prompt text is a prefix of the full text AND the prompt's ids are exactly the first
ids of the full conversation; otherwise it is rejected as `template_boundary` (a merged token at the
boundary would train the model on ids it never sees at generation time).

Responses must end in EOS. A template that puts text after the last EOS (e.g. a newline) has that
whitespace-only tail cut; a response with no EOS at all gets one appended.

Truncation: a prompt over `max_prompt_tokens` keeps its END (the generation prompt lives there) and
its leading BOS (`prompt_overflow=truncate`), or is rejected (`drop`). A response that does not fit
`max_length - len(prompt)` is rejected (`response_overflow=drop`) or cut to fit (`truncate`; a cut
response then does not end in EOS, on purpose: the answer did not end there).
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from typing import Any

from data_prep.formats import Pair, RowReject, to_pair
from data_prep.sources import RowError, decode_json_row
from pipeline.fingerprint import hash_json

ID_HEX = 32  # 128 bits of sha256: the row id


def row_id(pair: Pair) -> str:
    """Stable id of a canonical pair: its dedup key, join key and eval-split key."""
    return hash_json(pair.canonical())[:ID_HEX]


def is_eval(rid: str, eval_fraction: float) -> bool:
    """Deterministic split from the id hash (uniform in [0, 1))."""
    return int(rid[:16], 16) / float(1 << 64) < eval_fraction


@dataclass(frozen=True)
class EncodeSettings:
    max_prompt_tokens: int
    max_length: int
    prompt_overflow: str
    response_overflow: str
    system_prompt: str | None


@dataclass
class Encoded:
    row: int
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool
    responses_truncated: int


@dataclass
class Rejected:
    row: int
    reason: str
    detail: str


class PairEncoder:
    """Holds one tokenizer; turns a chunk of raw rows into Encoded / Rejected results."""

    def __init__(self, tokenizer_dir: str, settings: EncodeSettings):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if not getattr(self.tok, "chat_template", None):
            raise ValueError(f"tokenizer {tokenizer_dir} has no chat template; add one (tokenizer.chat_template)")
        if self.tok.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer_dir} has no eos_token; responses must end in EOS")
        self.eos = self.tok.eos_token_id
        self.bos = self.tok.bos_token_id
        self.s = settings

    # -- text ------------------------------------------------------------------------------

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    # -- one chunk ---------------------------------------------------------------------------

    def process(self, source_file: str, fmt: str, items: list[tuple[int, Any]]) -> list[Encoded | Rejected]:
        """items: (row_no, payload) from sources.iter_rows. Results keep the input order."""
        results: list[Any] = [None] * len(items)
        pending: list[tuple[int, Pair, str, str, str]] = []  # (index, pair, prompt, full_c, full_r)
        for i, (row_no, payload) in enumerate(items):
            try:
                if isinstance(payload, bytes):
                    payload = decode_json_row(payload)
                if isinstance(payload, RowError):
                    raise RowReject(payload.reason, payload.detail)
                pair = to_pair(payload, fmt, source_file, row_no, self.s.system_prompt)
                p = self.render(pair.prompt_messages, True)
                fc = self.render(pair.prompt_messages + pair.chosen_messages, False)
                fr = self.render(pair.prompt_messages + pair.rejected_messages, False)
                for full, side in ((fc, "chosen"), (fr, "rejected")):
                    if not full.startswith(p):
                        raise RowReject("template_boundary",
                                        f"templated prompt text is not a prefix of the templated prompt+{side}")
                pending.append((i, pair, p, fc, fr))
            except RowReject as e:
                results[i] = Rejected(row_no, e.reason, e.detail)
            except Exception as e:  # a malformed row must never stop the stage
                results[i] = Rejected(row_no, "unexpected_error", _short_exc(e))
        # one batched call into the Rust tokenizer for the whole chunk
        texts = [t for _, _, p, fc, fr in pending for t in (p, fc, fr)]
        ids = self.encode_texts(texts)
        for k, (i, pair, *_rest) in enumerate(pending):
            try:
                results[i] = self._finish(pair, ids[3 * k], ids[3 * k + 1], ids[3 * k + 2])
            except RowReject as e:
                results[i] = Rejected(pair.source_row, e.reason, e.detail)
            except Exception as e:
                results[i] = Rejected(pair.source_row, "unexpected_error", _short_exc(e))
        return results

    def _response(self, prompt_ids: list[int], full_ids: list[int], side: str) -> list[int]:
        n = len(prompt_ids)
        if full_ids[:n] != prompt_ids:
            at = next((j for j in range(min(n, len(full_ids))) if full_ids[j] != prompt_ids[j]), min(n, len(full_ids)))
            raise RowReject("template_boundary", f"prompt ids differ from prompt+{side} ids at token {at} of {n}")
        resp = list(full_ids[n:])
        if self.eos in resp and resp[-1] != self.eos:
            last = len(resp) - 1 - resp[::-1].index(self.eos)
            if not self.tok.decode(resp[last + 1:]).strip():
                resp = resp[: last + 1]  # template whitespace after the final EOS
        if not resp or (resp == [self.eos]):
            raise RowReject("empty_response", f"{side} has no tokens after the prompt")
        if resp[-1] != self.eos:
            resp.append(self.eos)
        return resp

    def _finish(self, pair: Pair, p_ids: list[int], c_full: list[int], r_full: list[int]) -> Encoded:
        s = self.s
        chosen = self._response(p_ids, c_full, "chosen")
        rejected = self._response(p_ids, r_full, "rejected")
        prompt = list(p_ids)
        prompt_truncated = False
        if len(prompt) > s.max_prompt_tokens:
            if s.prompt_overflow == "drop":
                raise RowReject("prompt_too_long", f"{len(prompt)} prompt tokens > max_prompt_tokens {s.max_prompt_tokens}")
            keep_bos = self.bos is not None and prompt[0] == self.bos
            tail = s.max_prompt_tokens - (1 if keep_bos else 0)
            prompt = ([self.bos] if keep_bos else []) + prompt[len(prompt) - tail:]
            prompt_truncated = True
        budget = s.max_length - len(prompt)
        n_cut = 0
        out = []
        for side, resp in (("chosen", chosen), ("rejected", rejected)):
            if len(resp) > budget:
                if s.response_overflow == "drop":
                    raise RowReject("response_too_long",
                                    f"{side}: {len(prompt)} prompt + {len(resp)} response tokens > max_length {s.max_length}")
                resp = resp[:budget]
                n_cut += 1
            out.append(resp)
        return Encoded(pair.source_row, row_id(pair), prompt, out[0], out[1], prompt_truncated, n_cut)


def _short_exc(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    loc = f" at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else ""
    return f"{type(e).__name__}: {e}{loc}"[:500]


# ---------------------------------------------------------------------------------------------
# worker-process plumbing (spawned workers hold one PairEncoder each)

_WORKER: PairEncoder | None = None


def worker_init(tokenizer_dir: str, settings_json: str) -> None:
    global _WORKER
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER = PairEncoder(tokenizer_dir, EncodeSettings(**json.loads(settings_json)))


def worker_process(source_file: str, fmt: str, items: list[tuple[int, Any]]) -> list[Encoded | Rejected]:
    assert _WORKER is not None, "worker_init was not called"
    return _WORKER.process(source_file, fmt, items)
