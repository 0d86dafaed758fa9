"""The direct template renderer (tokenization.PairEncoder._fast_render) is used only while it agrees with
apply_chat_template."""

from __future__ import annotations

from midpo.data.formats import Pair
from midpo.data.tokenization import EncodeSettings, PairEncoder


def _pairs(n):
    return [Pair([{"role": "user", "content": f"sort: {i} 1"}], [{"role": "assistant", "content": f"1 {i}"}],
                 [{"role": "assistant", "content": f"{i} 1"}], "f", i) for i in range(n)]


def _reference(enc, pairs):
    return [(enc.tok.apply_chat_template(p.prompt_messages, tokenize=False, add_generation_prompt=True),
             enc.tok.apply_chat_template(p.prompt_messages + p.chosen_messages, tokenize=False),
             enc.tok.apply_chat_template(p.prompt_messages + p.rejected_messages, tokenize=False)) for p in pairs]


def test_direct_renderer_agrees_or_is_dropped(tok_dir):
    enc = PairEncoder(str(tok_dir), EncodeSettings(96, 160, "truncate", "drop", None))
    pairs = _pairs(70)
    assert enc._render_pairs(pairs) == _reference(enc, pairs)
    assert callable(enc._fast)  # checked on the first 64 pairs, then trusted
    # a renderer that disagrees during its check is dropped for good, and the texts are apply_chat_template's
    enc._fast, enc._fast_left = (lambda msgs, gen: "x"), 64
    assert enc._render_pairs(pairs[:3]) == _reference(enc, pairs[:3])
    assert enc._fast is False
    assert enc._render_pairs(pairs[3:5]) == _reference(enc, pairs[3:5])
