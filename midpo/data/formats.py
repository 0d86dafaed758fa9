"""Preference-data formats -> the canonical `Pair`. One registry (`FORMATS`): name -> reader.

    standard        {"prompt": str, "chosen": str, "rejected": str}                      (TRL standard)
    conversational  {"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}   (TRL)
    implicit        {"chosen": [whole conversation], "rejected": [whole conversation]}
                    the shared message prefix is the prompt (UltraFeedback-binarized style)
    hh              {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}   (Anthropic HH-RLHF)
                    the shared text up to the last "\\n\\nAssistant:" is the prompt

Plain-string rule: a string prompt becomes one user message and a string response one assistant
message. Extra columns are ignored. A row that does not fit its format raises `RowReject`
with a reason from `REJECT_REASONS`; it never stops the stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    "prompt_too_long": "prompt over data.max_prompt_tokens with data.prompt_overflow=drop",
    "response_too_long": "prompt + response over data.max_length with data.response_overflow=drop",
    "identical_after_truncation": "chosen and rejected differ only past the cut of data.response_overflow=truncate",
    "truncation_unstable": "an over-long text whose kept tokens depend on where it is cut (see midpo/data/tokenization.py)",
    "template_boundary": "the templated prompt's tokens are not a prefix of prompt+response tokens",
    "template_error": "the tokenizer's chat template refused the conversation (e.g. Gemma's: no system role)",
    "duplicate": "the same canonical pair (row id) appeared earlier",
    "unexpected_error": "processing the row raised an unexpected exception (a bug: please report)",
}

ROLES = ("system", "user", "assistant")
Message = dict[str, str]  # {"role": ..., "content": ...}


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

    def canonical(self) -> dict[str, Any]:
        """The content that defines the pair (its id), without where it came from."""
        return {"prompt": self.prompt_messages, "chosen": self.chosen_messages, "rejected": self.rejected_messages}


# ---------------------------------------------------------------------------------------------
# field checks


def _field(row: dict, name: str) -> Any:
    if name not in row:
        raise RowReject("missing_field", f"no {name!r} field (fields: {', '.join(map(str, list(row)[:12]))})")
    value = row[name]
    if value is None:
        raise RowReject("null_field", f"{name!r} is null")
    return value


def _string(row: dict, name: str) -> str:
    value = _field(row, name)
    if not isinstance(value, str):
        raise RowReject("wrong_type", f"{name!r} must be a string, got {type(value).__name__}")
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
    return _messages(value, name)


def _response(row: dict, name: str) -> list[Message]:
    value = _field(row, name)
    if isinstance(value, str):
        msgs = [{"role": "assistant", "content": value}]
    else:
        msgs = _messages(value, name)
    _check_response(msgs, name)
    return msgs


def _check_response(msgs: list[Message], name: str) -> None:
    if not msgs or all(not m["content"].strip() for m in msgs):
        raise RowReject("empty_response", f"{name!r} has no content")
    if msgs[0]["role"] != "assistant":
        raise RowReject("wrong_type", f"{name!r} must start with an assistant message, got {msgs[0]['role']!r}")


def _check_prompt(msgs: list[Message]) -> None:
    if not msgs or all(not m["content"].strip() for m in msgs):
        raise RowReject("empty_prompt", "the prompt has no content")


# ---------------------------------------------------------------------------------------------
# readers: row dict -> (prompt, chosen, rejected) messages


def _read_standard(row: dict) -> tuple[list, list, list]:
    prompt = [{"role": "user", "content": _string(row, "prompt")}]
    chosen = [{"role": "assistant", "content": _string(row, "chosen")}]
    rejected = [{"role": "assistant", "content": _string(row, "rejected")}]
    _check_response(chosen, "chosen")
    _check_response(rejected, "rejected")
    return prompt, chosen, rejected


def _read_conversational(row: dict) -> tuple[list, list, list]:
    return _prompt_or_messages(row, "prompt"), _response(row, "chosen"), _response(row, "rejected")


def _read_implicit(row: dict) -> tuple[list, list, list]:
    chosen = _messages(_field(row, "chosen"), "chosen")
    rejected = _messages(_field(row, "rejected"), "rejected")
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
    return prompt, c, r


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


# ---------------------------------------------------------------------------------------------
# registry and detection


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[dict], bool]
    read: Callable[[dict], tuple[list, list, list]]


def _is_hh(row: dict) -> bool:
    c = row.get("chosen")
    return "prompt" not in row and isinstance(c, str) and _ASSISTANT in c and _HUMAN in c


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("standard", "TRL standard: prompt/chosen/rejected strings",
               lambda r: isinstance(r.get("prompt"), str) and isinstance(r.get("chosen"), str), _read_standard),
        Format("conversational", "TRL conversational: prompt/chosen/rejected message lists",
               lambda r: isinstance(r.get("prompt"), list) or ("prompt" in r and isinstance(r.get("chosen"), list)),
               _read_conversational),
        Format("implicit", "chosen/rejected whole conversations; shared prefix = prompt",
               lambda r: "prompt" not in r and isinstance(r.get("chosen"), list), _read_implicit),
        Format("hh", "Anthropic HH-RLHF transcripts", _is_hh, _read_hh),
    )
}


def format_names() -> str:
    return ", ".join(["auto", *FORMATS])


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ConfigError(f"unknown data format {name!r}; choose one of {format_names()}")
    return FORMATS[name]


def detect_format(row: dict) -> str | None:
    """The first registered format whose detector accepts this row, or None."""
    for f in FORMATS.values():
        if f.detect(row):
            return f.name
    return None


def to_pair(row: Any, fmt: str, source_file: str, source_row: int, system_prompt: str | None = None) -> Pair:
    """One row -> a canonical Pair; raises RowReject for rows that do not fit."""
    if not isinstance(row, dict):
        raise RowReject("wrong_type", f"a row must be a JSON object/record, got {type(row).__name__}")
    prompt, chosen, rejected = FORMATS[fmt].read(row)
    _check_prompt(prompt)
    if chosen == rejected:
        raise RowReject("identical_responses", "chosen and rejected are identical")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return Pair(prompt, chosen, rejected, source_file, source_row)
