"""The embedded default (`midpo synth`): verifiable task data, a local tokenizer and a tiny Llama.

    DIR/pairs.jsonl          TRL standard rows (prompt, chosen, rejected) + checker columns
    DIR/eval_prompts.jsonl   held-out prompts + task records (disjoint seed), for generation evals
    DIR/tokenizer/           sentencepiece BPE (byte fallback) wrapped for AutoTokenizer, with a chat template
    DIR/model/               LlamaForCausalLM from config (safetensors) + the same tokenizer
    DIR/synth_manifest.json  written last: the settings hash that makes re-runs no-ops

Nothing is downloaded: the tokenizer is trained here and the model is randomly initialized (seeded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from midpo.config import SynthConfig
from midpo.demo.task import check_answer, generate_eval_prompts, generate_pairs, partial_credit, solve
from midpo.runtime.files import atomic_write_json, check_replaceable, publish_dir, temp_dir_for
from midpo.runtime.fingerprint import hash_json

__all__ = ["build_tiny_default", "check_answer", "partial_credit", "solve", "CHAT_TEMPLATE", "add_arguments", "run"]

log = logging.getLogger(__name__)

SYNTH_VERSION = 1  # bump when the generated files change for the same settings
MANIFEST = "synth_manifest.json"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = [f"<|{r}|>" for r in ROLES]

# Every turn is `<|role|>content</s>`, so an assistant response ends in EOS and the generation
# prompt ends in a special token: text on either side of the prompt/response boundary is tokenized
# separately, so the prompt's ids are always a prefix of prompt+response ids.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _paths(root: Path) -> dict[str, Path]:
    return {
        "root": root,
        "pairs": root / "pairs.jsonl",
        "eval_prompts": root / "eval_prompts.jsonl",
        "onpolicy_prompts": root / "onpolicy_prompts.jsonl",
        "tokenizer": root / "tokenizer",
        "model": root / "model",
        "manifest": root / MANIFEST,
    }


def _write_jsonl(path: Path, rows) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int, work_dir: Path) -> Path:
    """Train a sentencepiece BPE model on `texts` and save it as a transformers tokenizer folder."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    corpus = work_dir / "spm_corpus.txt"
    # sentencepiece reads lines: newlines inside a text would split it, which is harmless here
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    prefix = work_dir / "spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="bpe",  # transformers' LlamaTokenizer is a BPE model with byte fallback
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may support fewer pieces; fine
        byte_fallback=True,  # any UTF-8 (accents, CJK, emoji, code) round-trips via <0xNN> pieces
        character_coverage=1.0,
        normalization_rule_name="identity",  # no NFKC: text must decode to exactly what went in
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,  # with a dummy prefix, leading spaces do not round-trip
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=ROLE_TOKENS,
        num_threads=1,
        minloglevel=2,
    )
    corpus.unlink()
    staging = work_dir / "spm_hf"
    staging.mkdir()
    shutil.copy(f"{prefix}.model", staging / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(staging), add_prefix_space=False, pad_token="<pad>",
                                         add_bos_token=False, add_eos_token=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    shutil.rmtree(staging)
    shutil.move(f"{prefix}.model", out_dir.parent / "spm.model")  # provenance; transformers reads tokenizer.json
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    return out_dir


def build_model(tokenizer_dir: Path, out_dir: Path, cfg: SynthConfig) -> Path:
    """A seeded, randomly initialized LlamaForCausalLM sized by `cfg`, saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    # fork_rng: seeding must not leak into the caller's global RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(str(out_dir))  # safetensors by default
    tok.save_pretrained(str(out_dir))  # the model folder is self-contained
    return out_dir


def _settings_key(cfg: SynthConfig) -> str:
    return hash_json({"version": SYNTH_VERSION, "synth": dataclasses.asdict(cfg)})


def _is_complete(root: Path, key: str) -> bool:
    paths = _paths(root)
    try:
        manifest = json.loads(paths["manifest"].read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("settings_key") == key and all(paths[k].exists() for k in paths)


def build_tiny_default(out_dir: str | Path, cfg: SynthConfig, *, force: bool = False) -> dict[str, Path]:
    """Build (or find already built) the embedded default under `out_dir`; returns its paths
    (root, pairs, eval_prompts, tokenizer, model, manifest). Idempotent: a complete folder built
    with the same settings is reused (unless `force`); the folder is built under a temp name, then renamed."""
    root = Path(out_dir)
    key = _settings_key(cfg)
    if force:
        log.info("synth: --force: rebuilding %s", root)
    elif _is_complete(root, key):
        log.info("synth: %s is complete for these settings; nothing to do", root)
        return _paths(root)
    check_replaceable(root)
    tmp = temp_dir_for(root, "synth")
    try:
        p = _paths(tmp)
        log.info("synth: generating %d pairs (seed %d)", cfg.n_pairs, cfg.seed)
        pairs = list(generate_pairs(cfg.n_pairs, cfg.seed, cfg.tasks, cfg.min_items, cfg.max_items))
        _write_jsonl(p["pairs"], pairs)
        evals = list(generate_eval_prompts(cfg.n_eval_prompts, cfg.seed, cfg.tasks, cfg.min_items, cfg.max_items,
                                           exclude_prompts={r["prompt"] for r in pairs}))
        _write_jsonl(p["eval_prompts"], evals)
        # prompts for on-policy sampling (`midpo sample`): unseen by SFT and disjoint from the eval prompts
        fresh = generate_eval_prompts(cfg.n_onpolicy_prompts, cfg.seed, cfg.tasks, cfg.min_items, cfg.max_items,
                                      exclude_prompts={r["prompt"] for r in pairs} | {r["prompt"] for r in evals},
                                      stream="onpolicy")
        _write_jsonl(p["onpolicy_prompts"], fresh)
        texts = [t for r in pairs for t in (r["prompt"], r["chosen"], r["rejected"])]
        log.info("synth: training a sentencepiece tokenizer (vocab <= %d)", cfg.vocab_size)
        train_tokenizer(texts, p["tokenizer"], cfg.vocab_size, tmp)
        log.info("synth: initializing a tiny Llama")
        build_model(p["tokenizer"], p["model"], cfg)
        atomic_write_json(p["manifest"], {
            "settings_key": key,
            "synth_version": SYNTH_VERSION,
            "synth": dataclasses.asdict(cfg),
            "n_pairs": len(pairs),
            "n_eval_prompts": cfg.n_eval_prompts,
            "n_onpolicy_prompts": cfg.n_onpolicy_prompts,
        })
        publish_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("synth: wrote %s", root)
    return _paths(root)


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="recipe YAML (a path or a name in recipes/)")
    parser.add_argument("--out", default=None, help="output folder (default: <run_dir>/synth)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is complete")
    parser.epilog = "Settings come from the recipe's `synth:` section; override with synth.KEY=VALUE " \
                    "(e.g. synth.n_pairs=500). Keys: " + ", ".join(f.name for f in dataclasses.fields(SynthConfig))


def run(args: Any) -> int:
    from midpo.config import load_config

    cfg = load_config(args.config, list(getattr(args, "overrides", []) or []))
    out = Path(args.out) if args.out else cfg.run_path / "synth"
    paths = build_tiny_default(out, cfg.synth, force=getattr(args, "force", False))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0

