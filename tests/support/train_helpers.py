"""Fixture builders for the training tests (no tests here): a tiny Llama with tied embeddings and a
word-level tokenizer, stage-1 data written by its on-disk contract, the reference cache built by the
real reference stage, and subprocess launchers for 1 or 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EOS, BOS, PAD, VOCAB = 2, 1, 0, 128


def make_model(path: Path, seed: int = 0, *, hidden: int = 64, layers: int = 2, vocab: int = VOCAB,
               tokenizer_extra: int = 0) -> Path:
    """Tiny Llama (tied embeddings) + a word-level tokenizer in one HF folder."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so log-probs are not all ~ -log V
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path, safe_serialization=True)
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab + tokenizer_extra)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(str(path))
    return path


def make_rows(n: int, seed: int, vocab: int = VOCAB, max_len: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)

    def seq(lo, hi, eos):
        body = rng.integers(3, vocab, size=int(rng.integers(lo, hi))).tolist()
        return body + [EOS] if eos else [BOS] + body

    return [{"id": f"row-{seed}-{i:04d}", "prompt_ids": seq(2, max_len, False), "chosen_ids": seq(1, max_len, True),
             "rejected_ids": seq(1, max_len, True)} for i in range(n)]


def write_data(data_dir: Path, splits: dict[str, list[dict]], tokenizer_fp: str = "tok-test-1") -> Path:
    """Stage-1 output written by prep's own split writer (two shards per split, content hashes recorded)."""
    from midpo.data.shards import write_split
    from midpo.runtime.fingerprint import hash_json, hash_token_ids

    counts = {}
    for split, rows in splits.items():
        token_hash = hash_json([hash_token_ids(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows])
        counts[split] = {**write_split(data_dir / split, rows, max(1, -(-len(rows) // 2)), token_hash),
                         "token_hash": token_hash}
    manifest = {"format_version": 1, "complete": True, "tokenizer": {"fingerprint": tokenizer_fp}, "splits": counts}
    manifest["fingerprint"] = hash_json(manifest)
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return data_dir


def fake_logps(row: dict, side: str) -> np.ndarray:
    """Stand-in reference log-probs, distinct per row and token (so a test can find one in a file):
    -1 (chosen) or -2 (rejected), minus row/64 and token/4096."""
    n = len(row[f"{side}_ids"])
    base = -1.0 if side == "chosen" else -2.0
    return (base - int(row["id"].rsplit("-", 1)[1]) / 64 - np.arange(n) / 4096).astype(np.float32)


def fake_score(rows: list[dict], topk: int = 0) -> list[dict]:
    """The reference stage's per-row records from `fake_logps` (top-k: ids 3.., log-probs below the row's)."""
    from midpo.runtime.cache import row_tokens_hash

    out = []
    for r in rows:
        rec = {"id": r["id"], "tokens_hash": row_tokens_hash(r)}
        for side in ("chosen", "rejected"):
            lp = fake_logps(r, side)
            rec[f"{side}_ref_logps"], rec[f"{side}_ref_logp_sum"] = lp, float(lp.astype(np.float64).sum())
            if topk:
                vals = np.repeat(-np.arange(1, topk + 1, dtype=np.float32)[None] - 1.0, len(lp), 0)  # (L, k)
                rec[f"{side}_ref_topk_logps"] = vals
                rec[f"{side}_ref_topk_ids"] = np.repeat(np.arange(3, 3 + topk, dtype=np.int32)[None], len(lp), 0)
                rec[f"{side}_ref_tail_logmass"] = np.log1p(-np.exp(vals).sum(-1)).astype(np.float32)
        out.append(rec)
    return out


def fake_ref_stage(ref_dir: Path, data_dir: Path, *, reference_fp: str = "ref-fp-1", topk: int = 0,
                   splits: tuple[str, ...] = ("train", "eval"), force: bool = False, score=None) -> dict | None:
    """`midpo ref`'s chunked engine and writer (`reference.run_stage`, in this process) with `fake_score`
    instead of a model: the real manifest, content hashes and checks. None when skipped as up to date."""
    from midpo.runtime.cache import REF_SCHEMA, TOPK_SCHEMA
    from midpo.runtime.chunks import StageSpec, run_stage

    data_m = json.loads((data_dir / "manifest.json").read_text())
    plan = {"data_fingerprint": data_m["fingerprint"], "tokenizer_fingerprint": data_m["tokenizer"]["fingerprint"],
            "reference_fingerprint": reference_fp, "topk": topk}
    schema = pa.schema(list(REF_SCHEMA) + (list(TOPK_SCHEMA) if topk else []))
    spec = StageSpec(name="ref", out_dir=ref_dir, schema=schema, plan=plan,
                     score=score or (lambda rows: fake_score(rows, topk)), packing=True, micro_batch_tokens=4096,
                     rows_per_shard=4)
    return run_stage(spec, data_dir, list(splits), {"vocab_size": VOCAB}, force=force)


def reseal(out_dir: Path, split: str) -> None:
    """Record `split`'s current files (hashes, rows) in `out_dir/manifest.json` as its writer would: for tests
    that change a split on purpose and want only what comes after the hash check to judge it."""
    from midpo.runtime.integrity import HASHES, count_rows, hash_split

    m = json.loads((out_dir / "manifest.json").read_text())
    m["splits"][split] = {**m["splits"].get(split, {}), "rows": count_rows(out_dir / split),
                          HASHES: hash_split(out_dir / split)}
    (out_dir / "manifest.json").write_text(json.dumps(m))


def rewrite_split(out_dir: Path, split: str, change) -> None:
    """Replace `out_dir/split` by `change(rows)` (a list of row dicts, same features), then `reseal` it."""
    import shutil

    from datasets import Dataset, load_from_disk

    from midpo.runtime.files import OUTPUT_MARKER

    path = out_dir / split
    ds = load_from_disk(str(path))
    Dataset.from_list(change(ds.to_list()), features=ds.features).save_to_disk(str(path.with_name(f"{split}.new")))
    del ds
    if (path / OUTPUT_MARKER).exists():  # still a folder midpo wrote
        shutil.copy2(path / OUTPUT_MARKER, path.with_name(f"{split}.new") / OUTPUT_MARKER)
    shutil.rmtree(path)
    path.with_name(f"{split}.new").rename(path)
    reseal(out_dir, split)


def flip_two_bytes(path: Path, at: int | None = None) -> int:
    """Flip two bytes of a file in place (a disk or copy error), at byte `at` and `at + 3` (default: mid-file).
    At a little-endian float32 -1.x (see `float_offset`) that turns the value into ~ +1e35. -> `at`."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01  # low mantissa byte
    data[at + 3] ^= 0xC6  # sign and exponent byte
    path.write_bytes(bytes(data))
    return at


def float_offset(path: Path, value: float) -> int:
    """Byte offset of the one float32 `value` stored in `path`."""
    data, needle = path.read_bytes(), np.float32(value).tobytes()
    assert data.count(needle) == 1, f"{value} is not stored exactly once in {path}"
    return data.find(needle)


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    for k in LAUNCHER_ENV:
        env.pop(k, None)
    return env


def recipe_text(run_dir: Path, model: Path, **train) -> str:
    t = {"micro_batch_size": 2, "grad_accum": 2, "max_steps": 6, "lr": 1.0e-3, "warmup_ratio": 0.2,
         "schedule": "cosine", "eval_every": 3, "save_every": 3, "keep_last": 2, "ds_config": "zero3_cpu_fp32",
         "peak_flops": 1.0e11, "packing": True}
    # pinned, not `auto`: these runs test ZeRO-3 (2 processes vs 1, its checkpoints and export) and the packed layout
    # (packing=false / share_prompt=true compare against it); None leaves a key out (its default, e.g. auto)
    t.update(train)
    lines = [f"run_dir: {run_dir}", "model:", f"  policy: {model}", "  dtype: fp32", "  attn_implementation: sdpa",
             "ref:", "  rows_per_shard: 64", "  micro_batch_tokens: 256", "loss:", "  prior: dpo", "  beta: 0.1",
             "train:"] + [f"  {k}: {v}" for k, v in t.items() if v is not None]
    return "\n".join(lines) + "\n"


def make_run(root: Path, *, n_train: int = 24, n_eval: int = 10, **train) -> Path:
    """Model, data, reference cache; returns the recipe path. The cache is built by the real stage 2."""
    from midpo.runtime.models import tokenizer_fingerprint as tokenizer_fp

    root.mkdir(parents=True, exist_ok=True)
    model = make_model(root / "model")
    run = root / "run"
    write_data(run / "data", {"train": make_rows(n_train, 1), "eval": make_rows(n_eval, 2)},
               tokenizer_fp(model))
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe_text(run, model, **train))
    build_cache(recipe)
    return recipe


def build_cache(recipe: Path, *overrides: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "midpo.stages.ref", "--config", str(recipe), *overrides],
                          env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"reference stage failed:\n{proc.stderr[-4000:]}"


def train_cmd(recipe: Path, nproc: int, *overrides: str, faults: tuple[str, ...] = ()) -> list[str]:
    """`midpo train` on `nproc` processes; `faults` (e.g. ("--pause-after-step", "4")): through the suite's fault
    injection entry point (tests/support/faults.py: callbacks, midpo's one test seam)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    target = [str(Path(__file__).with_name("faults.py")), "train", *faults, "--"] if faults else \
        ["-m", "midpo.stages.train"]
    return (launcher if nproc > 1 else [sys.executable]) + target + ["--config", str(recipe), *overrides]


def run_train(recipe: Path, nproc: int = 1, *overrides: str, timeout: int = 300, check: bool = True,
              **env) -> subprocess.CompletedProcess:
    """Training in a subprocess; `check`: it must succeed (else the caller asserts on the outcome)."""
    proc = subprocess.run(train_cmd(recipe, nproc, *overrides), env=clean_env(**env), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, f"training failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc


def fresh_copy(src_run: Path, dst: Path, text: Callable[[Path], str]) -> tuple[Path, Path]:
    """A run folder at `dst/run` holding `src_run`'s prepared data and reference cache only (training starts
    fresh), and `dst/recipe.yaml` = text(run folder); returns (recipe, run)."""
    import shutil

    run = dst / "run"
    run.mkdir(parents=True)
    for sub in ("data", "ref"):
        shutil.copytree(src_run / sub, run / sub)
    recipe = dst / "recipe.yaml"
    recipe.write_text(text(run))
    return recipe, run


def resume_copy(src_run: Path, step: int, dst: Path, model: Path, **train) -> tuple[Path, Path]:
    """A run folder at `dst/run` holding `src_run`'s data, cache, logs and its step-`step` checkpoint as `latest`
    (as if that run had been stopped there), and a recipe for it with `train` settings; returns (recipe, run)."""
    import shutil

    from midpo.runtime.checkpoint import step_dir_name

    run = dst / "run"
    for sub in ("data", "ref", "logs"):
        shutil.copytree(src_run / sub, run / sub)
    shutil.copytree(src_run / "checkpoints" / step_dir_name(step), run / "checkpoints" / step_dir_name(step))
    (run / "checkpoints" / "latest").write_text(step_dir_name(step) + "\n")
    recipe = dst / "recipe.yaml"
    recipe.write_text(recipe_text(run, model, **train))
    return recipe, run


class _RunsCode:
    """Unpickling this calls `Path(marker).touch()`: what a crafted checkpoint file would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


def write_code_running_pickle(path: Path, marker: Path) -> Path:
    """A torch.save file at `path` that creates `marker` when loaded with weights_only=False."""
    torch.save({"optimizer_state_dict": _RunsCode(marker), "module": {"w": torch.zeros(2)}}, path)
    return path


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`proc`, which must have succeeded (else its exit code and the tails of its output)."""
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def run_midpo(*args: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """`midpo ARGS...` (the console entry point) in a subprocess; the caller checks the outcome."""
    return subprocess.run([sys.executable, "-m", "midpo.cli", *args], env=clean_env(**env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def losses(run_dir: Path) -> np.ndarray:
    return np.array([r["loss"] for r in read_jsonl(run_dir / "logs" / "train_metrics.jsonl")])


def export_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (from /proc). torchrun starts its workers in their own sessions, so
    killing the launcher's process group alone would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def run_then_kill_after_step(cmd: list[str], env: dict, run_dir: Path, step: int, timeout: float = 240,
                             logged: bool = False) -> None:
    """Start training in its own session, wait until `step` steps are recorded (`logged`: also their metrics in
    logs/train_metrics.jsonl, log_every 1), then SIGKILL the whole process tree (the launcher and every rank): a
    real crash, not a clean exit."""
    import time

    rows_file = run_dir / "logs" / ("train_metrics.jsonl" if logged else "consumed_rows.jsonl")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if rows_file.exists() and len(read_jsonl(rows_file)) >= step:
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited early ({proc.returncode}): {proc.stderr.read().decode()[-4000:]}")
            time.sleep(0.5)
        else:
            pytest.fail(f"training did not reach step {step}")
        time.sleep(0.5)
    finally:
        kill_tree(proc.pid)
        proc.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (what a node failure does to a job)."""
    import signal

    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass



@pytest.fixture(scope="session")
def process_group():
    """One gloo group for every in-process training run of the session (import it into the module and mark
    the module `usefixtures("process_group")`). DeepSpeed keeps module-level references to the group, so a
    second init after destroy_process_group fails: init is idempotent and the group is destroyed only at
    session end, whichever modules use it and in whatever order."""
    from midpo.runtime import dist as pdist

    pdist.init_distributed()
    yield
    pdist.cleanup()


@pytest.fixture(scope="module")
def launcher_env_dropped():
    """At the end of the module: drop the launcher variables that running a stage in this process left in
    os.environ (midpo.runtime.dist.init_distributed sets RANK, MASTER_PORT...). A later module's subprocess that
    inherited them would join this process's rendezvous port instead of starting its own. The process group
    stays (a later in-process init finds it and sets the variables again)."""
    yield
    for k in LAUNCHER_ENV:
        os.environ.pop(k, None)
