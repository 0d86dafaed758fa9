"""Stage 1 with the families' chat templates (tests/support/families.py): a conversation a template refuses
(Gemma 2 has no system role: its template raises) is rejected as `template_error`, not as an unexpected error;
a template whose prompt is no prefix of the conversation (Mistral v0.3 puts the system prompt into the LAST user
turn, so the prompt alone has it and the conversation does not) is rejected as `template_boundary`; the same rows
without a system message are kept for both."""

from __future__ import annotations

import json

import pytest
from families import FAMILIES, build_tokenizer, preference_rows
from prep_helpers import data_cfg, read_rejects

from midpo.data.prepare import prepare


@pytest.mark.parametrize("name,reason", [("gemma2", "template_error"), ("mistral", "template_boundary")])
def test_a_system_message_the_template_cannot_hold_is_rejected_with_its_reason(tmp_path, name, reason):
    tok_dir = tmp_path / "tok"
    build_tokenizer(FAMILIES[name], tok_dir)
    rows = preference_rows(4, seed=3, system=True) + preference_rows(4, seed=4, system=False)
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = prepare(data_cfg(), [str(src)], str(tok_dir), tmp_path / "out")
    assert m["rows"]["kept"] == 4
    assert [(r["row"], r["reason"]) for r in read_rejects(tmp_path / "out")] == [(i, reason) for i in range(1, 5)]
