"""Preference-data formats -> the canonical `Pair`. One registry (`FORMATS`): name -> reader + default columns.

Pairs given as such (fields: prompt, chosen, rejected, optional system, score_chosen, score_rejected):
    standard        {"prompt": str, "chosen": str, "rejected": str}                      (TRL standard)
    conversational  {"prompt": str | [messages], "chosen": [messages], "rejected": [...]}  (TRL)
                    chosen/rejected may repeat the prompt's messages first (HuggingFaceH4/ultrafeedback_binarized):
                    that shared prefix is checked against the prompt and dropped (a mismatch: `prompt_mismatch`)
    implicit        {"chosen": [whole conversation], "rejected": [whole conversation]}
                    the shared message prefix is the prompt
    hh              {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}   (Anthropic HH-RLHF)
Two responses plus a label (fields: prompt, response_a, response_b, label, optional score_a, score_b):
    pku_saferlhf    response_0/response_1 + better_response_id (0 or 1; null or -1: an abstention)
    shp             history + human_ref_A/human_ref_B + labels (1: A preferred, 0: B preferred)
    helpsteer2      prompt + response_1/response_2 + preference_strength (< 0: response_1 better, 0: a tie)
    helpsteer3      context (messages) + response1/response2 + overall_preference (as helpsteer2)
Rated or ranked lists, paired by data.pairing (midpo/data/pairing.py; fields: prompt, responses, and either
response_text + score/rank inside each item, or a parallel `scores` list of numbers beside a list of strings):
    ultrafeedback   instruction + completions[{response, overall_score}]                (openbmb/UltraFeedback)
    nectar          prompt (an HH transcript) + answers[{answer, rank}], rank 1 best    (berkeley-nest/Nectar)
    rated           prompt + responses [str] + scores [number]

`data.columns` (or a data.mix entry's `columns`) maps these field names to a dataset's column names
(`prompt=question,chosen=answer_good`); a format's own defaults above are such a mapping. A `system` column
becomes the system message. Extra columns are ignored. Plain-string rule: a string prompt is one user message, a
string response one assistant message. A row that does not fit raises `RowReject` with a reason from
`REJECT_REASONS`; it never stops the stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from midpo.data import pairing
from midpo.errors import ConfigError

# Every reason a row can be rejected for, with the explanation written into the manifest.
REJECT_REASONS: dict[str, str] = {
    "invalid_json": "the line/element is not valid JSON",
    "invalid_utf8": "the bytes are not valid UTF-8",
    "missing_field": "a required field is absent",
    "wrong_type": "a field (or the row itself) has the wrong type",
    "null_field": "a required field is null",
    "empty_prompt": "the prompt has no content",
    "empty_response": "chosen or rejected has no content",
    "identical_responses": "chosen and rejected are identical",
    "no_shared_prompt": "chosen and rejected do not share a prompt (implicit/hh formats)",
    "prompt_mismatch": "chosen/rejected start with messages that differ from the prompt column",
    "tie": "the label or the scores put neither response above the other",
    "abstention": "the label gives no preference (null, or -1)",
    "too_few_responses": "a rated/ranked list holds fewer than two responses with text and a score",
    "score_margin_too_small": "no two responses' scores differ by data.min_score_margin",
    "prompt_too_long": "prompt over data.max_prompt_tokens with data.prompt_overflow=drop",
    "response_too_long": "prompt + response over data.max_length with data.response_overflow=drop",
    "identical_after_truncation": "chosen and rejected differ only past the cut of data.response_overflow=truncate",
    "truncation_unstable": "an over-long text whose kept tokens depend on where it is cut (see midpo/data/tokenization.py)",
    "template_boundary": "the templated prompt's tokens are not a prefix of prompt+response tokens",
    "template_error": "the tokenizer's chat template refused the conversation (e.g. Gemma's: no system role)",
    "duplicate": "the same canonical pair (row id) appeared earlier",
    "unexpected_error": "processing the row raised an unexpected exception (a bug: please report)",
}

# The field names data.columns maps (field -> the dataset's column).
FIELDS: dict[str, str] = {
    "prompt": "the prompt: a string, a list of messages, or (nectar) an HH transcript",
    "chosen": "the preferred response (a string or messages)",
    "rejected": "the other response",
    "system": "a system message for the prompt",
    "score_chosen": "the chosen response's score, kept as a column",
    "score_rejected": "the rejected response's score, kept as a column",
    "response_a": "first of two responses (with a label)",
    "response_b": "second of two responses",
    "label": "which of response_a/response_b is better (the format says how it is coded)",
    "score_a": "response_a's score, kept as a column",
    "score_b": "response_b's score, kept as a column",
    "responses": "a list of rated/ranked responses (objects, or strings with `scores`)",
    "response_text": "the text's key inside each object of `responses`",
    "score": "the score's key inside each object of `responses` (higher is better)",
    "rank": "the rank's key inside each object of `responses` (1 is best)",
    "scores": "a list of numbers parallel to a list of string `responses`",
}
ITEM_KEYS = ("response_text", "score", "rank")  # keys inside list items, not row columns
META_COLUMNS = ("score_chosen", "score_rejected", "score_margin")  # float64 columns beside the ids, when known

ROLES = ("system", "user", "assistant")
Message = dict[str, str]  # {"role": ..., "content": ...}
Meta = tuple[float | None, float | None, float | None]  # score_chosen, score_rejected, score_margin
NO_META: Meta = (None, None, None)


class RowReject(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Pair:
    """The canonical preference pair every format reads into."""

    prompt_messages: list[Message]
    chosen_messages: list[Message]
    rejected_messages: list[Message]
    source_file: str
    source_row: int
    meta: Meta = NO_META

    def canonical(self) -> dict[str, Any]:
        """The content that defines the pair (its id), without where it came from."""
        return {"prompt": self.prompt_messages, "chosen": self.chosen_messages, "rejected": self.rejected_messages}


@dataclass(frozen=True)
class ReadPlan:
    """How one input is read (picklable: sent to tokenization workers). columns: field -> the dataset's column,
    the format's defaults with the user's mapping over them."""

    format: str
    columns: tuple[tuple[str, str], ...] = ()
    pairing: str = "best_vs_worst"
    min_score_margin: float = 0.0
    seed: int = 0


class RowView(dict):
    """A row keyed by field name (its mapped columns), remembering each field's column for messages."""

    names: dict[str, str]
    plan: ReadPlan | None = None


def view_row(row: dict, columns: dict[str, str], plan: ReadPlan | None = None) -> RowView:
    """row keyed by the dataset's columns -> keyed by field names: a mapped field takes its column's value (absent
    when the column is), unmapped keys pass through."""
    mapped_from = set(columns.values())
    v = RowView({k: x for k, x in row.items() if k not in mapped_from or k in columns})
    for f, col in columns.items():
        if col in row:
            v[f] = row[col]
        elif f != col:
            v.pop(f, None)
    v.names = dict(columns)
    v.plan = plan
    return v


# ---------------------------------------------------------------------------------------------
# field checks


def _col(row: dict, name: str) -> str:
    col = getattr(row, "names", {}).get(name, name)
    return name if col == name else f"{col} (as {name})"


def _field(row: dict, name: str) -> Any:
    if name not in row:
        raise RowReject("missing_field", f"no {_col(row, name)!r} field (fields: {', '.join(map(str, list(row)[:12]))})")
    value = row[name]
    if value is None:
        raise RowReject("null_field", f"{_col(row, name)!r} is null")
    return value


def _string(row: dict, name: str) -> str:
    value = _field(row, name)
    if not isinstance(value, str):
        raise RowReject("wrong_type", f"{_col(row, name)!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, name: str) -> list[Message]:
    if not isinstance(value, list):
        raise RowReject("wrong_type", f"{name!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowReject("wrong_type", f"{name}[{i}] must be a {{role, content}} object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise RowReject("missing_field", f"{name}[{i}] has no {key!r}")
            if m[key] is None:
                raise RowReject("null_field", f"{name}[{i}].{key} is null")
            if not isinstance(m[key], str):
                raise RowReject("wrong_type", f"{name}[{i}].{key} must be a string, got {type(m[key]).__name__}")
        if m["role"] not in ROLES:
            raise RowReject("wrong_type", f"{name}[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})  # extra keys (e.g. name) dropped
    return out


def _prompt_or_messages(row: dict, name: str) -> list[Message]:
    value = _field(row, name)
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _messages(value, _col(row, name))


def _as_response(value: Any, name: str) -> list[Message]:
    msgs = [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, name)
    _check_response(msgs, name)
    return msgs


def _response(row: dict, name: str) -> list[Message]:
    return _as_response(_field(row, name), _col(row, name))


def _check_response(msgs: list[Message], name: str) -> None:
    if not msgs or all(not m["content"].strip() for m in msgs):
        raise RowReject("empty_response", f"{name!r} has no content")
    if msgs[0]["role"] != "assistant":
        raise RowReject("wrong_type", f"{name!r} must start with an assistant message, got {msgs[0]['role']!r}")


def _check_prompt(msgs: list[Message]) -> None:
    if not msgs or all(not m["content"].strip() for m in msgs):
        raise RowReject("empty_prompt", "the prompt has no content")


def _number(value: Any) -> float | None:
    """A finite score, or None (null, not a number, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _scores(row: dict, a: str, b: str) -> Meta:
    sa, sb = _number(row.get(a)), _number(row.get(b))
    return sa, sb, (sa - sb if sa is not None and sb is not None else None)


# ---------------------------------------------------------------------------------------------
# readers: row view -> (prompt, chosen, rejected) messages, or a list of (prompt, chosen, rejected, meta)


def _read_standard(row: dict) -> tuple[list, list, list]:
    prompt = [{"role": "user", "content": _string(row, "prompt")}]
    chosen = [{"role": "assistant", "content": _string(row, "chosen")}]
    rejected = [{"role": "assistant", "content": _string(row, "rejected")}]
    _check_response(chosen, "chosen")
    _check_response(rejected, "rejected")
    return prompt, chosen, rejected


def _same_messages(a: list[Message], b: list[Message]) -> bool:
    # whitespace at the ends of a message is layout (exports often strip one copy and not the other)
    return len(a) == len(b) and all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
                                    for x, y in zip(a, b))


def _drop_repeated_prompt(prompt: list[Message], value: Any, name: str) -> list[Message]:
    """A response conversation that starts with the prompt (ultrafeedback_binarized) -> its part after the prompt;
    the repeated messages must equal the prompt's (a system message the response omits is not required)."""
    msgs = _messages(value, name) if not isinstance(value, str) else []
    if not msgs or msgs[0]["role"] == "assistant":
        return msgs or [{"role": "assistant", "content": value}]
    p = prompt if msgs[0]["role"] == "system" else [m for m in prompt if m["role"] != "system"]
    head = msgs[: len(p)]
    if not _same_messages(head, p):
        at = next((i for i in range(min(len(head), len(p))) if not _same_messages(head[i:i + 1], p[i:i + 1])),
                  min(len(head), len(p)))
        raise RowReject("prompt_mismatch", f"{name!r} repeats the prompt but its message {at} differs from the "
                        f"prompt's ({len(p)} prompt message(s), {len(msgs)} in {name!r})")
    return msgs[len(p):]


def _read_conversational(row: dict) -> tuple[list, list, list, Meta]:
    prompt = _prompt_or_messages(row, "prompt")
    out = []
    for name in ("chosen", "rejected"):
        msgs = _drop_repeated_prompt(prompt, _field(row, name), _col(row, name))
        _check_response(msgs, _col(row, name))
        out.append(msgs)
    return prompt, out[0], out[1], _scores(row, "score_chosen", "score_rejected")


def _read_implicit(row: dict) -> tuple[list, list, list]:
    chosen = _messages(_field(row, "chosen"), _col(row, "chosen"))
    rejected = _messages(_field(row, "rejected"), _col(row, "rejected"))
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if chosen == rejected:
        raise RowReject("identical_responses", "chosen and rejected conversations are identical")
    # the prompt ends where the conversations diverge, which must be at an assistant turn
    while k > 0 and (k >= len(chosen) or k >= len(rejected) or chosen[k]["role"] != "assistant"):
        k -= 1
    if k == 0:
        raise RowReject("no_shared_prompt", "the conversations share no prompt before an assistant turn")
    prompt, c, r = chosen[:k], chosen[k:], rejected[k:]
    _check_response(c, "chosen")
    _check_response(r, "rejected")
    return prompt, c, r, _scores(row, "score_chosen", "score_rejected")


_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _hh_messages(transcript: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b...' -> messages; text before the first marker is dropped."""
    out: list[Message] = []
    i = 0
    markers = ((_HUMAN, "user"), (_ASSISTANT, "assistant"))
    while True:
        hits = [(transcript.find(m, i), m, role) for m, role in markers]
        hits = [h for h in hits if h[0] >= 0]
        if not hits:
            break
        start, marker, role = min(hits)
        if out:
            out[-1]["content"] = transcript[i:start].strip()
        out.append({"role": role, "content": ""})
        i = start + len(marker)
    if out:
        out[-1]["content"] = transcript[i:].strip()
    return out


def _read_hh(row: dict) -> tuple[list, list, list]:
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    cut = chosen.rfind(_ASSISTANT)
    if cut < 0:
        raise RowReject("no_shared_prompt", f"'chosen' has no {_ASSISTANT.strip()!r} turn")
    prefix = chosen[: cut + len(_ASSISTANT)]
    if not rejected.startswith(prefix):
        raise RowReject("no_shared_prompt", "'rejected' does not start with the prompt of 'chosen'")
    prompt = _hh_messages(prefix)[:-1]  # the last (empty) assistant turn is the generation prompt
    if not prompt or prompt[-1]["role"] != "user":
        raise RowReject("no_shared_prompt", "the shared prompt does not end in a Human turn")
    c = [{"role": "assistant", "content": chosen[len(prefix):].strip()}]
    r = [{"role": "assistant", "content": rejected[len(prefix):].strip()}]
    _check_response(c, "chosen")
    _check_response(r, "rejected")
    return prompt, c, r


def _hh_prompt(row: dict) -> list[Message]:
    """A prompt that may be an HH transcript ending in an open Assistant turn (Nectar), else the plain rule."""
    value = _field(row, "prompt")
    if isinstance(value, str) and _HUMAN in value:
        msgs = _hh_messages(value)
        if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
            msgs = msgs[:-1]
        if not msgs or msgs[-1]["role"] != "user":
            raise RowReject("wrong_type", f"{_col(row, 'prompt')!r} is an HH transcript that does not end in a "
                            "Human turn")
        return msgs
    return _prompt_or_messages(row, "prompt")


# -- two responses + a label


def _label_index(v: Any) -> int | None:
    """PKU-SafeRLHF: the better response's index, 0 or 1; null or -1 is an abstention."""
    if v is None or (_number(v) == -1):
        return None
    if _number(v) in (0.0, 1.0):
        return int(v)
    raise RowReject("wrong_type", f"the label must be 0 or 1 (or null/-1 for no preference), got {v!r}")


def _label_a_is_1(v: Any) -> int | None:
    """SHP: 1 (true) when A is preferred, 0 (false) when B is."""
    if v is None:
        return None
    if _number(v) in (0.0, 1.0) or isinstance(v, bool):
        return 0 if int(v) == 1 else 1
    raise RowReject("wrong_type", f"the label must be 1 (A preferred) or 0 (B preferred), got {v!r}")


def _label_strength(v: Any) -> int | None:
    """HelpSteer: < 0 response_1 (a) better, > 0 response_2 (b) better, 0 a tie."""
    if v is None:
        return None
    x = _number(v)
    if x is None:
        raise RowReject("wrong_type", f"the preference strength must be a number, got {v!r}")
    if x == 0:
        raise RowReject("tie", "preference strength 0: neither response is better")
    return 0 if x < 0 else 1


def _labelled(decode: Callable[[Any], int | None], margin: Callable[[Any], float | None] | None = None):
    def read(row: dict) -> tuple[list, list, list, Meta]:
        prompt = _prompt_or_messages(row, "prompt")
        a, b = _response(row, "response_a"), _response(row, "response_b")
        if "label" not in row:
            _field(row, "label")  # missing_field, naming the column
        better = decode(row["label"])
        if better is None:
            raise RowReject("abstention", f"{_col(row, 'label')!r} is {row['label']!r}: no preference given")
        sa, sb = _number(row.get("score_a")), _number(row.get("score_b"))
        (c, sc), (r, sr) = ((a, sa), (b, sb)) if better == 0 else ((b, sb), (a, sa))
        m = margin(row["label"]) if margin else (sc - sr if sc is not None and sr is not None else None)
        return prompt, c, r, (sc, sr, m)

    return read


# -- rated / ranked lists


def _read_rated(row: dict) -> list[tuple[list, list, list, Meta]]:
    plan = getattr(row, "plan", None) or ReadPlan("rated")
    names = getattr(row, "names", {})
    prompt = _hh_prompt(row)
    items = _field(row, "responses")
    if not isinstance(items, list):
        raise RowReject("wrong_type", f"{_col(row, 'responses')!r} must be a list, got {type(items).__name__}")
    texts: list[Any] = []
    good: list[float | None] = []
    raw: list[float | None] = []
    if items and all(isinstance(x, dict) for x in items):
        text_key = names.get("response_text", "response_text")
        rank_key = names.get("rank") if "score" not in names else None
        score_key = names.get("score", "score")
        for x in items:
            texts.append(x.get(text_key))
            v = _number(x.get(rank_key)) if rank_key else _number(x.get(score_key))
            raw.append(v)
            good.append(-v if (v is not None and rank_key) else v)
    else:
        scores = _field(row, "scores")
        if not isinstance(scores, list) or len(scores) != len(items):
            raise RowReject("wrong_type", f"{_col(row, 'scores')!r} must be a list as long as "
                            f"{_col(row, 'responses')!r} ({len(items)})")
        texts = list(items)
        raw = [_number(s) for s in scores]
        good = list(raw)
    usable = [i for i in range(len(texts)) if good[i] is not None and texts[i] is not None
              and (isinstance(texts[i], list) or (isinstance(texts[i], str) and texts[i].strip()))]
    if len(usable) < 2:
        raise RowReject("too_few_responses", f"{len(usable)} of {len(texts)} responses have text and a score")
    g = [good[i] for i in usable]
    rng = pairing.row_rng(plan.seed, [prompt, [texts[i] for i in usable]]) if plan.pairing == "best_vs_random" else None
    pairs = pairing.make_pairs(g, plan.pairing, plan.min_score_margin, rng)
    if not pairs:
        if max(g) == min(g):
            raise RowReject("tie", f"all {len(g)} responses have the same score {raw[usable[0]]}")
        raise RowReject("score_margin_too_small", f"scores {[raw[i] for i in usable]}: no pair differs by "
                        f"data.min_score_margin={plan.min_score_margin}")
    out = []
    for ci, ri in pairs:
        i, j = usable[ci], usable[ri]
        c = _as_response(texts[i], f"{_col(row, 'responses')}[{i}]")
        r = _as_response(texts[j], f"{_col(row, 'responses')}[{j}]")
        out.append((prompt, c, r, (raw[i], raw[j], g[ci] - g[ri])))
    return out


# ---------------------------------------------------------------------------------------------
# registry and detection


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[dict], bool]  # on the row viewed through the format's columns
    read: Callable[[dict], Any]  # -> (prompt, chosen, rejected[, meta]) or a list of (prompt, chosen, rejected, meta)
    columns: dict[str, str] = field(default_factory=dict)  # the format's default field -> column mapping


def _is_hh(row: dict) -> bool:
    c = row.get("chosen")
    return "prompt" not in row and isinstance(c, str) and _ASSISTANT in c and _HUMAN in c


def _has(*names: str) -> Callable[[dict], bool]:
    return lambda r: all(r.get(n) is not None or n in r for n in names)


def _rated_detect(r: dict) -> bool:
    return "prompt" in r and isinstance(r.get("responses"), list)


_PAIRWISE = ("prompt", "response_a", "response_b", "label")

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("standard", "TRL standard: prompt/chosen/rejected strings",
               lambda r: isinstance(r.get("prompt"), str) and isinstance(r.get("chosen"), str), _read_standard),
        Format("conversational", "TRL conversational: prompt + chosen/rejected messages (which may repeat the "
               "prompt, as ultrafeedback_binarized)",
               lambda r: isinstance(r.get("prompt"), list) or ("prompt" in r and isinstance(r.get("chosen"), list)),
               _read_conversational),
        Format("implicit", "chosen/rejected whole conversations; shared prefix = prompt",
               lambda r: "prompt" not in r and isinstance(r.get("chosen"), list), _read_implicit),
        Format("hh", "Anthropic HH-RLHF transcripts", _is_hh, _read_hh),
        Format("pku_saferlhf", "PKU-SafeRLHF: prompt, response_0/response_1, better_response_id",
               _has(*_PAIRWISE), _labelled(_label_index),
               {"response_a": "response_0", "response_b": "response_1", "label": "better_response_id"}),
        Format("shp", "Stanford SHP: history, human_ref_A/human_ref_B, labels (1 = A), score_A/score_B",
               _has(*_PAIRWISE), _labelled(_label_a_is_1),
               {"prompt": "history", "response_a": "human_ref_A", "response_b": "human_ref_B", "label": "labels",
                "score_a": "score_A", "score_b": "score_B"}),
        Format("helpsteer2", "HelpSteer2 preference: prompt, response_1/response_2, preference_strength",
               _has(*_PAIRWISE), _labelled(_label_strength, lambda v: abs(float(v))),
               {"response_a": "response_1", "response_b": "response_2", "label": "preference_strength"}),
        Format("helpsteer3", "HelpSteer3 preference: context (messages), response1/response2, overall_preference",
               _has(*_PAIRWISE), _labelled(_label_strength, lambda v: abs(float(v))),
               {"prompt": "context", "response_a": "response1", "response_b": "response2",
                "label": "overall_preference"}),
        Format("ultrafeedback", "UltraFeedback raw: instruction, completions[{response, overall_score}]",
               _rated_detect, _read_rated,
               {"prompt": "instruction", "responses": "completions", "response_text": "response",
                "score": "overall_score"}),
        Format("nectar", "Nectar: prompt (HH transcript), answers[{answer, rank}] (rank 1 best)",
               _rated_detect, _read_rated,
               {"responses": "answers", "response_text": "answer", "rank": "rank"}),
        Format("rated", "prompt, responses [str], scores [number] (or objects: map response_text and score/rank)",
               _rated_detect, _read_rated),
    )
}
RATED = ("ultrafeedback", "nectar", "rated")  # formats whose rows become pairs by data.pairing


def format_names() -> str:
    return ", ".join(["auto", *FORMATS])


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ConfigError(f"unknown data format {name!r}; choose one of {format_names()}")
    return FORMATS[name]


def check_columns(columns: dict[str, str], where: str = "data.columns") -> None:
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; fields: {', '.join(FIELDS)}")
    bad = [k for k, v in columns.items() if not isinstance(v, str) or not v]
    if bad:
        raise ConfigError(f"{where}: field(s) {', '.join(bad)} must name a column (a non-empty string)")


def effective_columns(fmt: str, user: dict[str, str]) -> dict[str, str]:
    """The format's default mapping with the user's over it."""
    return {**FORMATS[fmt].columns, **user}


# the fields each kind of format reads: a user mapping of a field a format does not read rules that format out
_KIND_FIELDS = {"pair": {"prompt", "chosen", "rejected", "system", "score_chosen", "score_rejected"},
                "labelled": {"prompt", "response_a", "response_b", "label", "score_a", "score_b", "system"},
                "rated": {"prompt", "responses", "response_text", "score", "rank", "scores", "system"}}


def _kind(name: str) -> str:
    return "rated" if name in RATED else "labelled" if "label" in FORMATS[name].columns else "pair"


def detect_formats(row: dict, user: dict[str, str] | None = None) -> list[str]:
    """Every registered format whose detector accepts this row (viewed through its columns) and that reads every
    field the user mapped (mapping `responses` says the rows are rated lists, even beside a chosen column)."""
    user = user or {}
    names = [f.name for f in FORMATS.values() if set(user) <= _KIND_FIELDS[_kind(f.name)]
             and f.detect(view_row(row, effective_columns(f.name, user)))]
    # a format whose own columns the user remapped fits only through that mapping: it yields to one that fits as is
    # (nectar with `responses` remapped is the generic rated format)
    as_is = [n for n in names if not set(user) & set(FORMATS[n].columns)]
    return as_is if as_is and len(as_is) < len(names) else names


def detect_format(row: dict) -> str | None:
    """The first registered format whose detector accepts this row, or None."""
    names = detect_formats(row)
    return names[0] if names else None


def _drafts(out: Any) -> list[tuple[list, list, list, Meta]]:
    if isinstance(out, list):
        return out
    return [(*out, NO_META)] if len(out) == 3 else [out]


def to_pairs(row: Any, plan: ReadPlan, source_file: str, source_row: int,
             system_prompt: str | None = None) -> list[Pair]:
    """One row -> its canonical Pairs (one, or several for rated lists); raises RowReject for rows that do not fit."""
    if not isinstance(row, dict):
        raise RowReject("wrong_type", f"a row must be a JSON object/record, got {type(row).__name__}")
    view = view_row(row, dict(plan.columns) or effective_columns(plan.format, {}), plan)
    system = view.get("system")
    if system is not None and not isinstance(system, str):
        raise RowReject("wrong_type", f"{_col(view, 'system')!r} must be a string, got {type(system).__name__}")
    pairs = []
    for prompt, chosen, rejected, meta in _drafts(FORMATS[plan.format].read(view)):
        _check_prompt(prompt)
        if chosen == rejected:
            raise RowReject("identical_responses", "chosen and rejected are identical")
        for sp in (system if system and system.strip() else None, system_prompt):
            if sp and prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": sp}, *prompt]
        pairs.append(Pair(prompt, chosen, rejected, source_file, source_row, meta))
    return pairs


def to_pair(row: Any, fmt: str, source_file: str, source_row: int, system_prompt: str | None = None) -> Pair:
    """One row of a one-pair format -> its canonical Pair; raises RowReject for rows that do not fit."""
    return to_pairs(row, ReadPlan(fmt), source_file, source_row, system_prompt)[0]
