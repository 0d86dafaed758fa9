"""Builders for the reference-stage tests: a tiny untied Llama, a run folder with stage-1 data, the
stage launched in subprocesses, and an independent single-sequence forward."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from train_helpers import clean_env, make_rows, write_data

REPO = Path(__file__).resolve().parents[2]


EOS, BOS, PAD, VOCAB = 2, 1, 0, 128


ROWS_PER_SHARD = 6


BUDGET = 96


def make_model(path: Path, seed: int = 0, *, hidden: int = 64, layers: int = 2, vocab: int = VOCAB) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so log-probs are not all ~ -log V
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_run(root: Path, *, n_train: int = 19, n_eval: int = 5, extra: str = "") -> Path:
    """A run folder with data + a tiny reference model; returns the recipe path."""
    root.mkdir(parents=True, exist_ok=True)
    model = make_model(root / "model")
    write_data(root / "run" / "data", {"train": make_rows(n_train, 1), "eval": make_rows(n_eval, 2)})
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"run_dir: {root / 'run'}\nmodel:\n  reference: {model}\n  dtype: fp32\n  attn_implementation: sdpa\n"
        f"ref:\n  rows_per_shard: {ROWS_PER_SHARD}\n  micro_batch_tokens: {BUDGET}\n{extra}"
    )
    return recipe


def stage_cmd(recipe: Path, nproc: int, *overrides: str, module: str = "midpo.stages.ref",
              faults: tuple[str, ...] = ()) -> list[str]:
    """A chunked stage on `nproc` processes; `faults` (e.g. ("--pause-after-chunks", "1")): through the suite's fault
    injection entry point (tests/support/faults.py)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    target = [str(Path(__file__).with_name("faults.py")), "ref", *faults, "--"] if faults else ["-m", module]
    return (launcher if nproc > 1 else [sys.executable]) + target + ["--config", str(recipe), *overrides]


stage_env = clean_env  # no launcher variable an in-process group of another test left in os.environ


def run_stage(recipe: Path, nproc: int = 1, *overrides: str, module: str = "midpo.stages.ref",
              timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(stage_cmd(recipe, nproc, *overrides, module=module), env=stage_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stage failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def load_cache(run_dir: Path, split: str):
    from datasets import load_from_disk

    return load_from_disk(str(run_dir / "ref" / split))


def assert_caches_equal(a, b, atol: float = 0.0) -> None:
    assert a.column_names == b.column_names
    assert a["id"] == b["id"] and a["tokens_hash"] == b["tokens_hash"]
    for col in a.column_names:
        if col in ("id", "tokens_hash"):
            continue
        for x, y in zip(a[col], b[col], strict=True):
            np.testing.assert_allclose(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64),
                                       atol=atol, rtol=0, err_msg=col)


def naive_response_logps(model, prompt: list[int], response: list[int]) -> np.ndarray:
    """Independent reference: one unpadded sequence, full log-softmax, gather the response tokens."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[pos, torch.tensor(response)].numpy()

