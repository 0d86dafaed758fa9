"""Shared fixtures for stage-1 tests: one tiny default built once per session (300 pairs).

Other test folders can reuse the builder, `data_prep.synthetic.build_tiny_default`, with TINY_SYNTH.
Plain helpers live in prep_helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import SynthConfig

TINY_SYNTH = dict(n_pairs=300, n_eval_prompts=40, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=2, num_kv_heads=1, max_position_embeddings=256)


@pytest.fixture(scope="session")
def tiny_default(tmp_path_factory) -> dict[str, Path]:
    from data_prep.synthetic import build_tiny_default

    return build_tiny_default(tmp_path_factory.mktemp("tiny") / "synth", SynthConfig(**TINY_SYNTH))


@pytest.fixture(scope="session")
def tok_dir(tiny_default) -> Path:
    return tiny_default["tokenizer"]


@pytest.fixture(scope="session")
def sp(tiny_default):
    """The raw sentencepiece model: an encoder independent of transformers, for expected ids."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tiny_default["root"] / "spm.model"))
