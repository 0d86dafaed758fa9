"""Session-wide set-up for the suite: quiet, offline, 2-core-friendly environment; tests/support on sys.path
(builders shared across test folders: train_helpers, ref_helpers, prep_helpers, prior_helpers, loss_helpers);
the tiny embedded default built once per session (300 pairs) and the tokenizers built from it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

# Keep test runs on 2 cores predictable and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from prep_helpers import TINY_SYNTH  # noqa: E402

from midpo.config import SynthConfig  # noqa: E402


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
