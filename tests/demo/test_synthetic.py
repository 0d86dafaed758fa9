"""The embedded default: task determinism, checker correctness, length balance, tokenizer, model."""

from __future__ import annotations

import json
import random

import pytest
from prep_helpers import TINY_SYNTH

from midpo.config import SynthConfig
from midpo.demo import task as synth_task
from midpo.demo.synthetic import build_tiny_default, check_answer, partial_credit


def _pairs(n=400, seed=0, **kw):
    args = dict(tasks=["sort", "reverse", "dedupe"], min_items=3, max_items=8)
    args.update(kw)
    return list(synth_task.generate_pairs(n, seed, **args))


def _reference_answer(rec):
    # written independently of synth_task: the spec of each task
    items = rec["items"]
    if rec["task"] == "sort":
        return sorted(items, key=int) if rec["kind"] == "numbers" else sorted(items)
    if rec["task"] == "reverse":
        return items[::-1]
    out = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


def test_generation_is_deterministic_and_seeded():
    assert _pairs(seed=3) == _pairs(seed=3)
    assert _pairs(seed=3) != _pairs(seed=4)


def test_chosen_is_correct_and_rejected_is_wrong():
    rows = _pairs(600)
    for r in rows:
        assert r["chosen"].split() == _reference_answer(r)
        assert r["rejected"].split() != _reference_answer(r)
        assert check_answer(r, r["chosen"]) == 1.0
        assert check_answer(r, r["rejected"]) == 0.0
    assert {r["task"] for r in rows} == {"sort", "reverse", "dedupe"}
    # several error kinds actually occur
    assert len({r["error_kind"] for r in rows}) >= 5


def test_checker_on_hand_written_cases():
    rec = {"task": "sort", "kind": "numbers", "items": ["10", "9", "100"]}
    assert check_answer(rec, "9 10 100") == 1.0
    assert check_answer(rec, "  9, 10, 100 \n") == 1.0
    assert check_answer(rec, "10 100 9") == 0.0  # lexicographic is wrong for numbers
    assert check_answer(rec, "9 10") == 0.0
    assert check_answer(rec, "") == 0.0
    words = {"task": "dedupe", "kind": "words", "items": ["fig", "kiwi", "fig", "pear"]}
    assert check_answer(words, "fig kiwi pear") == 1.0
    assert check_answer(words, "kiwi fig pear") == 0.0
    assert check_answer({"task": "reverse", "kind": "words", "items": ["a", "b"]}, "b a") == 1.0
    assert partial_credit(words, "fig kiwi pear") == 1.0
    assert 0.5 < partial_credit(words, "fig kiwi") < 1.0
    assert partial_credit(words, "lime lemon") == 0.0
    with pytest.raises(ValueError, match="unknown synthetic task"):
        check_answer({"task": "shuffle", "kind": "words", "items": []}, "")


def test_length_does_not_reveal_the_preference():
    rows = _pairs(2000, seed=1)
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows)
    shorter = sum(len(r["chosen"]) < len(r["rejected"]) for r in rows)
    # "pick the longer answer" must be close to a coin flip
    acc = (longer + 0.5 * (len(rows) - longer - shorter)) / len(rows)
    assert 0.42 < acc < 0.58, (longer, shorter)
    assert 0.25 < longer / len(rows) < 0.5
    assert 0.25 < shorter / len(rows) < 0.5


def test_answers_are_short_in_tokens(tiny_default, sp):
    rows = [json.loads(line) for line in tiny_default["pairs"].read_text().splitlines()]
    lens = [len(sp.encode(r["chosen"])) for r in rows]
    assert max(lens) <= 40 and sum(lens) / len(lens) >= 5


def test_eval_prompts_are_held_out(tiny_default):
    train = {json.loads(line)["prompt"] for line in tiny_default["pairs"].read_text().splitlines()}
    evals = [json.loads(line) for line in tiny_default["eval_prompts"].read_text().splitlines()]
    assert len(evals) == TINY_SYNTH["n_eval_prompts"]
    assert not train & {e["prompt"] for e in evals}
    for e in evals:
        assert check_answer(e, e["answer"]) == 1.0 and e["answer"].split() == _reference_answer(e)


EXOTIC = [
    "sort: 3 1 2",
    "  leading and  double  spaces ",
    "def f(x):\n\treturn {'a': x**2}  # code\r\n",
    "accents: héllo ça Ærøskøbing naïve",
    "CJK: 中文字符 日本語 한국어",
    "emoji: 🤖👍🏽 👨‍👩‍👧 🇫🇷",
    "zero width\u200b and nbsp\u00a0 and \u0301 combining",
    "<|user|> looks special",
]


def test_tokenizer_round_trips_exotic_text(tok_dir, sp):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    for s in EXOTIC:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s, s
        if "<|" not in s:  # sentencepiece itself agrees with the transformers wrapper
            assert ids == sp.encode(s), s
    # random printable unicode, including astral-plane characters
    rng = random.Random(0)
    for _ in range(50):
        s = "".join(chr(rng.choice([rng.randint(32, 0x2000), rng.randint(0x4E00, 0x9FFF), rng.randint(0x1F300, 0x1FAFF)]))
                    for _ in range(rng.randint(1, 20)))
        s = s.replace("\u2581", "_")  # U+2581 is sentencepiece's space marker (documented limit)
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_tokenizer_specials_and_chat_template(tok_dir, sp):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert len(tok) <= SynthConfig().vocab_size
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort: 2 1"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>be brief</s><|user|>sort: 2 1</s><|assistant|>"
    no_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert no_gen == text[: -len("<|assistant|>")]
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == sp.bos_id() and ids[-1] == sp.piece_to_id("<|assistant|>")


def test_model_reloads_with_auto_classes(tiny_default):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_default["model"]
    assert (model_dir / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert model.config.hidden_size == TINY_SYNTH["hidden_size"]
    assert model.config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "sort: 3 1 2"}], add_generation_prompt=True,
                                  tokenize=False)
    x = torch.tensor([tok.encode(ids, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == (1, x.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_build_is_seeded_and_idempotent(tmp_path, tiny_default):
    from safetensors.torch import load_file

    cfg = SynthConfig(**{**TINY_SYNTH, "n_pairs": 40, "n_eval_prompts": 5})
    a = build_tiny_default(tmp_path / "a", cfg)
    stamp = a["manifest"].stat().st_mtime_ns
    again = build_tiny_default(tmp_path / "a", cfg)
    assert again == a and a["manifest"].stat().st_mtime_ns == stamp  # skipped: complete already
    b = build_tiny_default(tmp_path / "b", cfg)
    assert a["pairs"].read_bytes() == b["pairs"].read_bytes()
    wa, wb = load_file(a["model"] / "model.safetensors"), load_file(b["model"] / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp folders left behind
    # changed settings rebuild in place
    c = build_tiny_default(tmp_path / "a", SynthConfig(**{**TINY_SYNTH, "n_pairs": 41, "n_eval_prompts": 5}))
    assert len(c["pairs"].read_text().splitlines()) == 41


def test_build_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="was not written by midpo"):
        build_tiny_default(tmp_path / "x", SynthConfig(n_pairs=5))


def test_force_rebuilds_a_complete_build(tmp_path):
    """`midpo synth --force` rebuilds a complete folder (the manifest is rewritten); without it, a no-op."""
    from midpo import cli

    out = tmp_path / "s"
    small = ["synth.n_pairs=20", "synth.n_eval_prompts=3", "synth.n_onpolicy_prompts=3", "synth.hidden_size=16",
             "synth.intermediate_size=32", "synth.num_layers=1", "synth.num_heads=2", "synth.num_kv_heads=1",
             "synth.vocab_size=300"]
    assert cli.main(["synth", "--out", str(out), *small]) == 0
    stamp = (out / "synth_manifest.json").stat().st_mtime_ns
    assert cli.main(["synth", "--out", str(out), *small]) == 0
    assert (out / "synth_manifest.json").stat().st_mtime_ns == stamp
    pairs = (out / "pairs.jsonl").read_bytes()
    assert cli.main(["synth", "--out", str(out), "--force", *small]) == 0
    assert (out / "synth_manifest.json").stat().st_mtime_ns != stamp and (out / "pairs.jsonl").read_bytes() == pairs
