"""Canonical pairs -> token ids: chat template, prompt/response boundary check, truncation.

Rule (one place): the prompt is rendered with `add_generation_prompt=True`; each response is the
tail of the rendered full conversation (prompt + response messages) after the prompt. Both texts
are tokenized with `add_special_tokens=False` (the template already holds BOS). A pair is kept only
if the templated prompt text is a prefix of the full text AND the prompt's ids are exactly the first
ids of the full conversation; otherwise it is rejected as `template_boundary` (a merged token at the
boundary would train the model on ids it never sees at generation time).

Responses must end in EOS: the tokenizer's, or a generation-stopping id of the folder's
generation_config.json (the turn end of chat models whose tokenizer EOS is another token: Gemma's
<end_of_turn>, Llama 3's <|eot_id|> beside <|end_of_text|>), so a response ends where generation
stops. A template that puts text after the last EOS (e.g. a newline) has that whitespace-only tail
cut; a response with no EOS at all gets the tokenizer's appended.

Truncation: a prompt over `max_prompt_tokens` keeps its END (the generation prompt lives there) and
its leading BOS (`prompt_overflow=truncate`), or is rejected (`drop`). A response that does not fit
`max_length - len(prompt)` is rejected (`response_overflow=drop`) or cut to fit (`truncate`; a cut
response then does not end in EOS, on purpose: the answer did not end there). A pair whose chosen
and rejected ids are equal (after truncation, when they differed only past the cut) is rejected:
it carries no preference.

Bounded memory: tokenizing a text costs ~100 bytes per character, so a 50 MB prompt would need GBs
although only its last `max_prompt_tokens` tokens are kept. A text longer than its window (the
tokens truncation can keep, plus `MARGIN_TOKENS`, times a guess of characters per token) is cut
before tokenizing: the prompt side keeps its END, each response keeps its START, which are the parts
truncation keeps. A cut is moved to a space that follows a non-space character when one is near: the
tokenizers midpo meets restart there (a byte-level BPE's pre-tokenizer splits before " word"; a
sentencepiece BPE never merges across "▁"), so the tokens past it are those of the whole text. A
window is trusted only when (a) at least `MARGIN_TOKENS` tokens lie between each cut and the tokens
used, and (b) the same window cut one character wider gives the same result (a cut's influence on the
tokens does not reach the tokens used). Otherwise the window doubles, up to `MAX_WINDOW_SCALE` times;
a pair still unsettled then (e.g. megabytes of one repeated character, whose BPE tokens depend on where
the run starts, so no window short of the whole text decides them) is rejected as `truncation_unstable`.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midpo.data.formats import NO_META, Meta, Pair, ReadPlan, RowReject, to_pairs
from midpo.data.sources import RowError, decode_json_row
from midpo.errors import UnusableInputError
from midpo.runtime.fingerprint import hash_json

ID_HEX = 32  # 128 bits of sha256: the row id
MARGIN_TOKENS = 64  # tokens between a window's cut and the tokens used (see the module docstring)
MAX_WINDOW_SCALE = 16  # a window grows (x2) at most to this multiple of its first size
MAX_CHARS_PER_TOKEN_GUESS = 16  # the first window's characters per token: the longest token, at most this
FAST_RENDER_CHECK = 64  # pairs rendered both ways before the direct template renderer is trusted (_fast_render)
ENCODE_BATCH_CHARS = 1 << 21  # characters per call into the tokenizer: bounds its memory whatever a chunk holds


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
    meta: Meta = NO_META  # score_chosen, score_rejected, score_margin (formats.META_COLUMNS)


@dataclass
class Rejected:
    row: int
    reason: str
    detail: str


@dataclass(frozen=True)
class Cuts:
    """Where a pair's texts were cut before tokenizing (a bounded window; see the module docstring)."""

    prompt: bool = False  # the prompt's start was cut off: its ids are a tail of the whole prompt's
    chosen: bool = False  # the chosen response's end was cut off: its ids are a head of the whole response's
    rejected: bool = False
    first_id: int | None = None  # the whole prompt's first id (its BOS), from its head, when the prompt is cut
    prompt_chars: int = 0  # the whole prompt's length in characters (for reject details)

    def any(self) -> bool:
        return self.prompt or self.chosen or self.rejected


NO_CUTS = Cuts()


class PairEncoder:
    """Holds one tokenizer; turns a chunk of raw rows into Encoded / Rejected results."""

    def __init__(self, tokenizer_dir: str, settings: EncodeSettings):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if not getattr(self.tok, "chat_template", None):
            raise UnusableInputError(f"tokenizer {tokenizer_dir} has no chat template; add one (tokenizer.chat_template)")
        if self.tok.eos_token_id is None:
            raise UnusableInputError(f"tokenizer {tokenizer_dir} has no eos_token; responses must end in EOS")
        self.eos = self.tok.eos_token_id
        self.bos = self.tok.bos_token_id
        self.ends = {self.eos, *extra_end_ids(tokenizer_dir, self.tok)}
        self.s = settings
        longest = max((len(t) for t in self.tok.convert_ids_to_tokens(list(range(len(self.tok)))) if t), default=1)
        self.chars_per_token = max(1, min(longest, MAX_CHARS_PER_TOKEN_GUESS))
        self._fast: Any = None  # the direct template renderer: None untried, False refused, else the function
        self._fast_left = 0

    # -- text ------------------------------------------------------------------------------

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as e:  # the template's raise_exception(): the family cannot express this conversation
            raise RowReject("template_error", f"the chat template refused the conversation: {e}") from None

    def _render_pairs(self, pairs: list[Pair]) -> list[tuple[str, str, str] | BaseException]:
        """(prompt, prompt+chosen, prompt+rejected) texts of each pair: one batched template call per kind (half the
        per-call overhead of apply_chat_template); a batch that raises is redone pair by pair, so a pair the template
        refuses costs only itself (its exception in its place)."""
        if not pairs:
            return []
        fast = self._fast_render(pairs)
        if fast is not None:
            return fast
        try:
            ps = self.tok.apply_chat_template([p.prompt_messages for p in pairs], tokenize=False,
                                              add_generation_prompt=True)
            fcs = self.tok.apply_chat_template([p.prompt_messages + p.chosen_messages for p in pairs], tokenize=False)
            frs = self.tok.apply_chat_template([p.prompt_messages + p.rejected_messages for p in pairs],
                                               tokenize=False)
            return list(zip(ps, fcs, frs))
        except Exception:
            out: list[tuple[str, str, str] | BaseException] = []
            for pair in pairs:
                try:
                    out.append((self.render(pair.prompt_messages, True),
                                self.render(pair.prompt_messages + pair.chosen_messages, False),
                                self.render(pair.prompt_messages + pair.rejected_messages, False)))
                except Exception as e:
                    out.append(e)
            return out

    def _fast_render(self, pairs: list[Pair]) -> list[tuple[str, str, str]] | None:
        """The texts from transformers' compiled template, called directly: apply_chat_template's per-conversation
        bookkeeping (copies, message objects, reasoning aliases, tools) is most of the stage's time and does nothing to
        the plain {role, content} strings midpo builds. Trusted only once the first FAST_RENDER_CHECK pairs render the
        same both ways; otherwise (or on any error) None, and apply_chat_template renders everything."""
        if self._fast is False:
            return None
        if self._fast is None:
            try:
                from transformers.utils.chat_template_utils import _compile_jinja_template

                tmpl = _compile_jinja_template(self.tok.chat_template)
                kw = dict(self.tok.special_tokens_map)
            except Exception:  # another transformers: its own path only
                self._fast = False
                return None
            self._fast = lambda msgs, gen: tmpl.render(messages=msgs, tools=None, documents=None,  # noqa: E731
                                                       add_generation_prompt=gen, **kw)
            self._fast_left = FAST_RENDER_CHECK
        r = self._fast
        try:
            out = [(r(p.prompt_messages, True), r(p.prompt_messages + p.chosen_messages, False),
                    r(p.prompt_messages + p.rejected_messages, False)) for p in pairs]
        except Exception:  # a pair the template refuses: this chunk through apply_chat_template, pair by pair
            return None
        if self._fast_left > 0:
            check = pairs[: self._fast_left]
            self._fast_left -= len(check)
            self._fast = False  # the reference below must not take this path
            ref = self._render_pairs(check)
            if ref != out[: len(check)]:
                return None  # stays False: apply_chat_template from now on
            self._fast = r
        return out

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, in batches of at most ENCODE_BATCH_CHARS characters (one text may be longer)."""
        out: list[list[int]] = []
        start, chars = 0, 0
        for k, t in enumerate(texts):
            if k > start and chars + len(t) > ENCODE_BATCH_CHARS:
                out.extend(self._encode(texts[start:k]))
                start, chars = k, 0
            chars += len(t)
        return out + self._encode(texts[start:])

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    def window_chars(self, scale: int = 1) -> tuple[int, int]:
        """(prompt side, response side) window in characters: the tokens truncation can keep, plus the margin."""
        k = self.chars_per_token * scale
        return (self.s.max_prompt_tokens + MARGIN_TOKENS) * k, (self.s.max_length + MARGIN_TOKENS) * k

    def encode_answer(self, prompt: str, answer: str) -> tuple[list[int], list[int]] | None:
        """(prompt ids, response ids ending in EOS) of one generated answer to a user prompt, as `process` encodes
        a pair's side (no truncation); None when the answer is empty or the template breaks at the boundary.
        `midpo iterate` scores its samples with these ids, so a sample's log-prob is the one training sees."""
        p = self.render([{"role": "user", "content": prompt}], True)
        full = self.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], False)
        if not answer.strip() or not full.startswith(p):
            return None
        p_ids, f_ids = self.encode_texts([p, full])
        try:
            return p_ids, self._response(p_ids, f_ids, "answer")
        except RowReject:
            return None

    # -- one chunk ---------------------------------------------------------------------------

    def process(self, source_file: str, plan: ReadPlan | str, items: list[tuple[int, Any]]) -> list[Encoded | Rejected]:
        """items: (row_no, payload) from sources.iter_rows. Results keep the input order: one per row, or one per
        pair for a row that makes several (a rated list); a row rejected whole gives one Rejected."""
        plan = ReadPlan(plan) if isinstance(plan, str) else plan
        results: list[Any] = []
        pending: list[tuple[int, Pair, str, str, str]] = []  # (index, pair, prompt, full_c, full_r)
        to_render: list[tuple[int, Pair]] = []
        for row_no, payload in items:
            try:
                if isinstance(payload, bytes):
                    payload = decode_json_row(payload)
                if isinstance(payload, RowError):
                    raise RowReject(payload.reason, payload.detail)
                pairs = to_pairs(payload, plan, source_file, row_no, self.s.system_prompt)
            except RowReject as e:
                results.append(Rejected(row_no, e.reason, e.detail))
                continue
            except Exception as e:  # a malformed row must never stop the stage
                results.append(Rejected(row_no, "unexpected_error", _short_exc(e)))
                continue
            for pair in pairs:
                results.append(None)
                to_render.append((len(results) - 1, pair))
        for (i, pair), texts in zip(to_render, self._render_pairs([pair for _, pair in to_render])):
            try:
                if isinstance(texts, BaseException):
                    raise texts
                p, fc, fr = texts
                for full, side in ((fc, "chosen"), (fr, "rejected")):
                    if not full.startswith(p):
                        raise RowReject("template_boundary",
                                        f"templated prompt text is not a prefix of the templated prompt+{side}")
                pending.append((i, pair, p, fc, fr))
            except RowReject as e:
                results[i] = Rejected(pair.source_row, e.reason, e.detail)
            except Exception as e:
                results[i] = Rejected(pair.source_row, "unexpected_error", _short_exc(e))
        # rows that fit their window: batched calls into the Rust tokenizer; longer rows: one by one, windowed
        wp, wr = self.window_chars()
        fits = [len(p) <= wp and len(fc) <= len(p) + wr and len(fr) <= len(p) + wr for _, _, p, fc, fr in pending]
        texts = [t for (_, _, p, fc, fr), ok in zip(pending, fits) if ok for t in (p, fc, fr)]
        ids = iter(self.encode_texts(texts))
        for (i, pair, p, fc, fr), ok in zip(pending, fits):
            full = (next(ids), next(ids), next(ids)) if ok else None
            try:
                results[i] = self._finish(pair, *full) if ok else self._encode_windowed(pair, p, fc, fr)
            except RowReject as e:
                results[i] = Rejected(pair.source_row, e.reason, e.detail)
            except Exception as e:
                results[i] = Rejected(pair.source_row, "unexpected_error", _short_exc(e))
        return results

    # -- over-long texts: bounded windows ----------------------------------------------------

    def _encode_windowed(self, pair: Pair, p: str, fc: str, fr: str) -> Encoded | Rejected:
        """Encode a pair from windows around its prompt/response boundary (memory bounded by the window, not the
        text): accepted when the texts fit whole, or when the window and the same one cut one character wider
        agree (see the module docstring)."""
        scale = 1
        while scale <= MAX_WINDOW_SCALE:
            result, cuts = self._encode_window(pair, p, fc, fr, scale)
            if result is not None and not cuts.any():
                return result  # the whole texts: exact
            if result is not None:
                wider, _ = self._encode_window(pair, p, fc, fr, scale, wider=1)
                if wider is not None and _same(result, wider):
                    return result
            scale *= 2
        longest = max(len(p), len(fc) - len(p), len(fr) - len(p))
        raise RowReject("truncation_unstable", f"a {longest}-character text whose kept tokens still depend on where "
                        f"it is cut {MAX_WINDOW_SCALE}x past the window (e.g. a very long run of one repeated "
                        "character); shorten it before prep")

    def _encode_window(self, pair: Pair, p: str, fc: str, fr: str, scale: int, wider: int = 0) -> tuple[Any, Cuts]:
        """(Encoded or Rejected from this window, or None when a cut lies within MARGIN_TOKENS of the tokens
        used; the cuts made). wider: characters added at each cut."""
        wp, wr = self.window_chars(scale)
        slack = MARGIN_TOKENS * self.chars_per_token // 2
        start = _restart_after(p, len(p) - wp, slack) - wider if len(p) > wp else 0
        ends = tuple(_restart_before(full, len(p) + wr, slack) + wider if len(full) > len(p) + wr else len(full)
                     for full in (fc, fr))
        texts = [p[start:], fc[start:ends[0]], fr[start:ends[1]]] + ([p[:wp]] if start else [])
        ids = self.encode_texts(texts)
        cuts = Cuts(prompt=start > 0, chosen=ends[0] < len(fc), rejected=ends[1] < len(fr),
                    first_id=ids[3][0] if start and ids[3] else None, prompt_chars=len(p))
        s = self.s
        if cuts.prompt and len(ids[0]) < s.max_prompt_tokens + MARGIN_TOKENS:
            return None, cuts
        for cut, full in ((cuts.chosen, ids[1]), (cuts.rejected, ids[2])):
            if cut and len(full) - len(ids[0]) < s.max_length + MARGIN_TOKENS:
                return None, cuts
        try:
            return self._finish(pair, ids[0], ids[1], ids[2], cuts), cuts
        except RowReject as e:
            return Rejected(pair.source_row, e.reason, e.detail), cuts

    def _response(self, prompt_ids: list[int], full_ids: list[int], side: str, cut: bool = False) -> list[int]:
        n = len(prompt_ids)
        if full_ids[:n] != prompt_ids:
            at = next((j for j in range(min(n, len(full_ids))) if full_ids[j] != prompt_ids[j]), min(n, len(full_ids)))
            raise RowReject("template_boundary", f"prompt ids differ from prompt+{side} ids at token {at} of {n}")
        resp = list(full_ids[n:])
        if cut:  # the head of a longer response: truncation cuts it well before its (unseen) end
            return resp
        if self.ends & set(resp) and resp[-1] not in self.ends:
            last = max(j for j, t in enumerate(resp) if t in self.ends)
            if not self.tok.decode(resp[last + 1:]).strip():
                resp = resp[: last + 1]  # template whitespace after the final EOS
        if not resp or (len(resp) == 1 and resp[0] in self.ends):
            raise RowReject("empty_response", f"{side} has no tokens after the prompt")
        if resp[-1] not in self.ends:
            resp.append(self.eos)
        return resp

    def _finish(self, pair: Pair, p_ids: list[int], c_full: list[int], r_full: list[int],
                cuts: Cuts = NO_CUTS) -> Encoded:
        """Ids of the prompt and of prompt+response (whole, or windows cut as `cuts` says) -> the kept pair."""
        s = self.s
        chosen = self._response(p_ids, c_full, "chosen", cuts.chosen)
        rejected = self._response(p_ids, r_full, "rejected", cuts.rejected)
        prompt = list(p_ids)
        prompt_truncated = False
        if cuts.prompt or len(prompt) > s.max_prompt_tokens:
            if s.prompt_overflow == "drop":
                n = f"over {len(prompt)} (a {cuts.prompt_chars}-character prompt)" if cuts.prompt else len(prompt)
                raise RowReject("prompt_too_long", f"{n} prompt tokens > max_prompt_tokens {s.max_prompt_tokens}")
            first = cuts.first_id if cuts.prompt else prompt[0]
            keep_bos = self.bos is not None and first == self.bos
            tail = s.max_prompt_tokens - (1 if keep_bos else 0)
            prompt = ([self.bos] if keep_bos else []) + prompt[len(prompt) - tail:]
            prompt_truncated = True
        budget = s.max_length - len(prompt)
        n_cut = 0
        out = []
        for side, resp, cut in (("chosen", chosen, cuts.chosen), ("rejected", rejected, cuts.rejected)):
            if len(resp) > budget:
                if s.response_overflow == "drop":
                    n = f"over {len(resp)}" if cut else len(resp)
                    raise RowReject("response_too_long",
                                    f"{side}: {len(prompt)} prompt + {n} response tokens > max_length {s.max_length}")
                resp = resp[:budget]
                n_cut += 1
            out.append(resp)
        if out[0] == out[1]:  # no preference left to learn (the formats already reject identical messages)
            if n_cut:
                raise RowReject("identical_after_truncation", f"chosen and rejected share their first {budget} tokens, "
                                f"all that fits max_length {s.max_length} after a {len(prompt)}-token prompt")
            raise RowReject("identical_responses", "chosen and rejected have the same token ids")
        return Encoded(pair.source_row, row_id(pair), prompt, out[0], out[1], prompt_truncated, n_cut, pair.meta)


def extra_end_ids(tokenizer_dir: str | Path, tok=None) -> list[int]:
    """The eos_token_id(s) of `tokenizer_dir`/generation_config.json other than the tokenizer's EOS, sorted: where
    generation stops besides EOS (a chat model's turn end); [] without a generation config. `tok`: the tokenizer
    of that folder when already loaded."""
    path = Path(tokenizer_dir) / "generation_config.json"
    try:
        ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    ids = {int(x) for x in (ids if isinstance(ids, list) else [ids])
           if isinstance(x, int) and not isinstance(x, bool)}
    if not ids:
        return []
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return sorted(ids - {tok.eos_token_id})


def _restart(text: str, j: int) -> bool:
    """A tokenizer restarts at `j`: a space after a non-space character (see the module docstring)."""
    return text[j] == " " and not text[j - 1].isspace()


def _restart_after(text: str, cut: int, slack: int) -> int:
    """The first restart point in [cut, cut + slack), else `cut` (cut > 0)."""
    j = text.find(" ", cut, cut + slack)
    while j > 0 and not _restart(text, j):
        j = text.find(" ", j + 1, cut + slack)
    return j if j > 0 else cut


def _restart_before(text: str, cut: int, slack: int) -> int:
    """The last restart point in (cut - slack, cut], else `cut` (the text is cut to text[:result])."""
    j = text.rfind(" ", cut - slack + 1, cut + 1)
    while j > cut - slack and not _restart(text, j):
        j = text.rfind(" ", cut - slack + 1, j)
    return j if j > cut - slack else cut


def _same(a: Encoded | Rejected, b: Encoded | Rejected) -> bool:
    """Two windows agree: the same kept ids, or a reject for the same reason (details count tokens seen)."""
    if isinstance(a, Rejected) or isinstance(b, Rejected):
        return isinstance(a, Rejected) and isinstance(b, Rejected) and a.reason == b.reason
    return a == b


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


def worker_process(source_file: str, fmt: ReadPlan | str, items: list[tuple[int, Any]]) -> list[Encoded | Rejected]:
    assert _WORKER is not None, "worker_init was not called"
    return _WORKER.process(source_file, fmt, items)
