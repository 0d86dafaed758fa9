"""Shared fixtures for stage-1 tests: one tiny default built once per session (300 pairs).

Other test folders can reuse the builder, `midpo.demo.synthetic.build_tiny_default`, with TINY_SYNTH.
Plain helpers live in prep_helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from midpo.config import SynthConfig

TINY_SYNTH = dict(n_pairs=300, n_eval_prompts=40, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=2, num_kv_heads=1, max_position_embeddings=256)


@pytest.fixture(scope="session")
def tiny_default(tmp_path_factory) -> dict[str, Path]:
    from midpo.demo.synthetic import build_tiny_default

    return build_tiny_default(tmp_path_factory.mktemp("tiny") / "synth", SynthConfig(**TINY_SYNTH))


@pytest.fixture(scope="session")
def tok_dir(tiny_default) -> Path:
    return tiny_default["tokenizer"]


@pytest.fixture(scope="session")
def sp(tiny_default):
    """The raw sentencepiece model: an encoder independent of transformers, for expected ids."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tiny_default["root"] / "spm.model"))


@pytest.fixture(scope="session")
def bbpe_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (GPT-2 style pre-tokenizer, trained here with `tokenizers`) with the embedded chat
    template: the other tokenizer family midpo must handle. Its corpus holds runs of one character, so it has
    merges whose tokens in such a run depend on where the run starts."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from midpo.demo.synthetic import CHAT_TEMPLATE, ROLE_TOKENS

    rng = random.Random(0)
    words = ["sort", "reverse", "the", "apple", "naïve", "日本語", "😀", "def", "return", "    ", "\n", "3.14"]
    corpus = [" ".join(rng.choice(words) + str(rng.randint(0, 99)) for _ in range(40)) for _ in range(1000)]
    corpus += ["a" * n for n in range(1, 64)] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", "<pad>", *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("bbpe") / "tokenizer"
    fast.save_pretrained(str(out))
    return out
