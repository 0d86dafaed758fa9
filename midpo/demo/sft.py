"""`midpo sft`: a minimal supervised warm start on the chosen responses of the prepared data.

    midpo sft --config tiny                 # <run_dir>/data -> <run_dir>/sft (HF folder)
    python -m midpo.demo.sft --config tiny sft.steps=800

The embedded default starts from a randomly initialized Llama that cannot answer the task at all;
preference training needs a reference that sometimes does. This stage is deliberately small: one
process, padded batches, AdamW, token-mean NLL on response tokens only (prompt masked). It is a
warm start for the demo and the experiment, not a distributed SFT trainer.

Idempotent: a finished `<run_dir>/sft` whose manifest matches (data + init model + settings) is
reused, once the data's train split matches the content hashes `midpo prep` recorded (damaged data
is refused: re-run `midpo prep --force`); `--force` retrains. The folder is written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from midpo.config import Config, load_config
from midpo.runtime.files import atomic_write_json, check_replaceable, publish_dir, temp_dir_for
from midpo.runtime.fingerprint import hash_json
from midpo.runtime.layout import claim_run
from midpo.runtime.models import load_model, load_tokenizer, model_fingerprint

log = logging.getLogger(__name__)
MANIFEST = "sft_manifest.json"


def collate_sft(rows: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), right-padded; labels are -100 on prompt and padding."""
    seqs = [list(r["prompt_ids"]) + list(r["chosen_ids"]) for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, seqs)):
        n, p = len(s), len(r["prompt_ids"])
        ids[i, :n] = torch.tensor(s)
        attn[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
    return ids, attn, labels


def sft_loss(model, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL of the response tokens (next-token shift inside)."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_sft(cfg: Config, data_dir: Path, init_dir: Path, out_dir: Path, *, force: bool = False) -> dict:
    """Train (or find up to date) the warm start. force: retrain even when `out_dir` is up to date."""
    from midpo.runtime.prepared import load_split, verify_data

    sc = cfg.sft
    data_manifest = verify_data(data_dir, ["train"])  # damaged input: refused, even when the output is up to date
    fingerprint = hash_json({"data": data_manifest["fingerprint"], "init": model_fingerprint(init_dir),
                             "sft": {k: v for k, v in vars(sc).items() if k != "num_threads"}, "seed": cfg.seed})
    manifest_path = out_dir / MANIFEST
    if force:
        log.info("sft: --force: retraining %s", out_dir)
    elif manifest_path.exists() and json.loads(manifest_path.read_text()).get("fingerprint") == fingerprint:
        log.info("sft: %s is up to date (fingerprint %s), skipping", out_dir, fingerprint[:12])
        return json.loads(manifest_path.read_text())

    check_replaceable(out_dir)  # before the work: never replace a folder midpo did not write
    if sc.num_threads > 0:
        torch.set_num_threads(sc.num_threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tok = load_tokenizer(init_dir)
    model = load_model(init_dir, cfg.model, train=True)
    rows = load_split(data_dir, "train", verify=False).select_columns(["prompt_ids", "chosen_ids"]).to_list()
    opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)
    order: list[int] = []
    losses: list[float] = []
    t0 = time.time()
    bar = tqdm(range(sc.steps), desc="sft", unit="step")
    for step in bar:
        if len(order) < sc.batch_size:  # reshuffle each epoch
            more = list(range(len(rows)))
            rng.shuffle(more)
            order += more
        batch = [rows[i] for i in order[: sc.batch_size]]
        del order[: sc.batch_size]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, sc.steps, sc.warmup_steps, sc.lr)
        loss = sft_loss(model, *collate_sft(batch, tok.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")

    tmp = temp_dir_for(out_dir, "sft")
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    info = {"fingerprint": fingerprint, "steps": sc.steps, "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "first_loss": losses[0] if losses else None, "seconds": round(time.time() - t0, 1), "init": str(init_dir)}
    atomic_write_json(tmp / MANIFEST, info)
    publish_dir(tmp, out_dir)
    log.info("sft: %d steps in %.0fs, loss %.3f -> %.3f, saved %s", sc.steps, info["seconds"],
             info["first_loss"] or float("nan"), info["final_loss"], out_dir)
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML (or a name in recipes/)")
    parser.add_argument("--data", help="prepared data folder (default: the run's, RunLayout.sft_data)")
    parser.add_argument("--init", help="model to start from (default: model.policy, else <run_dir>/synth/model)")
    parser.add_argument("--out", help="output HF folder (default <run_dir>/sft)")
    parser.add_argument("--force", action="store_true", help="retrain even when the output is up to date")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if cfg.sft.steps <= 0:
        raise SystemExit("sft.steps is 0: nothing to do (set sft.steps=N)")
    layout = claim_run(cfg, needs=() if args.init else ("init_model",))
    train_sft(cfg, Path(args.data) if args.data else layout.sft_data,
              Path(args.init) if args.init else layout.init_model, Path(args.out) if args.out else layout.sft,
              force=getattr(args, "force", False))
    return 0


if __name__ == "__main__":
    import sys

    from midpo.runtime.launch import stage_cli

    sys.exit(stage_cli("sft", add_arguments, run))
