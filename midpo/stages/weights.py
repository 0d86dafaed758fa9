"""TIS-DPO token weights (`midpo weights`): per-token importance from two contrastive models.

Launch (same launchers as `midpo ref`; the models come from the recipe):

    midpo weights --config RECIPE ref.weights_forward=DIR ref.weights_reverse=DIR [--nproc N]
    torchrun --nproc_per_node N -m midpo.stages.weights --config RECIPE [overrides]
    srun --ntasks N python -m midpo.stages.weights --config RECIPE [overrides]

For every response token (docs/algorithms.md, TIS-DPO):
    s_t = log p_fwd(y_t) - log p_rev(y_t)      chosen tokens
    s_t = -(log p_fwd(y_t) - log p_rev(y_t))   rejected tokens
then, per response, a rank-based map into [ref.weights_min, ref.weights_max] (default [0.7, 1.3]):
the lowest-scored token gets the minimum, the highest the maximum, ties share their mean rank. The
EOS token (last of each response) is stored with weight 0, the TIS-DPO loss convention ("EOS weight
0"), so the column can be used as is. Ranking per response (not over the whole split) keeps every
chunk independent, which is what makes the run resumable; a response with one non-EOS token gets
the midpoint.

Output: `<run_dir>/weights/<split>/` (id, tokens_hash, chosen_weights, rejected_weights; same row order
as the data) and `<run_dir>/weights/manifest.json` (written last), with the same chunked, resumable,
lockstep machinery as the reference stage (content hashes, up-to-date check, value check, `--force`). Both models are held at once (2x one model's memory; use
`ref.zero3=true` to shard them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from midpo.config import Config
from midpo.core.token_weights import rank_weights, tis_scores
from midpo.runtime import dist as pdist
from midpo.runtime.cache import WEIGHTS_SCHEMA, row_tokens_hash
from midpo.runtime.chunks import StageError, StageSpec, run_stage
from midpo.runtime.files import save_config
from midpo.runtime.launch import run_or_spawn, stage_cli
from midpo.runtime.layout import claim_run_on_all_ranks
from midpo.runtime.models import pad_id_of
from midpo.runtime.prepared import available_splits, data_fingerprints
from midpo.stages.ref import load_reference


def score_weight_rows(fwd, rev, rows: list[dict], *, packing: bool, pad_id: int, lo: float, hi: float) -> list[dict]:
    """Both models on one micro-batch (the trainer's forward), then per-response rank weights."""
    from midpo.core.batching import collate_pairs
    from midpo.core.logprobs import response_logps

    batch = collate_pairs(rows, layout="packed" if packing else "padded", pad_id=pad_id).to(pdist.device())
    with torch.no_grad():
        outs = [response_logps(m, batch) for m in (fwd, rev)]
    result = []
    for i, row in enumerate(rows):
        rec = {"id": row["id"], "tokens_hash": row_tokens_hash(row)}
        for side in ("chosen", "rejected"):
            n = len(row[f"{side}_ids"])
            lp_f, lp_r = (getattr(o, side)[i, :n].float().cpu().numpy() for o in outs)
            rec[f"{side}_weights"] = rank_weights(tis_scores(lp_f, lp_r, side), lo, hi)
        result.append(rec)
    return result


def main(cfg: Config, splits: list[str] | None = None, force: bool = False) -> dict | None:
    from midpo.runtime.models import model_fingerprint, resolve_attn, resolve_dtype
    from midpo.runtime.prepared import read_manifest

    r = cfg.ref
    if not r.weights_forward or not r.weights_reverse:
        raise StageError("midpo weights needs ref.weights_forward and ref.weights_reverse (HF folders of "
                                  "the forward and reverse DPO models)")
    if not r.weights_min <= r.weights_max:
        raise StageError(f"ref.weights_min ({r.weights_min}) must be <= ref.weights_max ({r.weights_max})")
    owned = not torch.distributed.is_initialized()  # a caller's process group is the caller's to destroy
    pdist.init_distributed()
    try:
        layout = claim_run_on_all_ranks(cfg)
        data_dir, out_dir = layout.data, layout.weights
        manifest = read_manifest(data_dir)
        data_fp, tok_fp = data_fingerprints(manifest, data_dir)
        splits = splits or available_splits(manifest)
        plan = {
            "data_fingerprint": data_fp, "tokenizer_fingerprint": tok_fp,
            "forward_fingerprint": model_fingerprint(r.weights_forward),
            "reverse_fingerprint": model_fingerprint(r.weights_reverse),
            "dtype": str(resolve_dtype(cfg.model.dtype)).removeprefix("torch."),
            "attn_implementation": resolve_attn(cfg.model.attn_implementation, r.weights_forward),
            "transform": "rank", "weights_min": r.weights_min, "weights_max": r.weights_max, "eos_weight": 0.0,
            "rows_per_shard": r.rows_per_shard,
        }
        fwd, rev = load_reference(Path(r.weights_forward), cfg), load_reference(Path(r.weights_reverse), cfg)
        pad_id = pad_id_of(fwd)
        spec = StageSpec(
            name="weights", out_dir=out_dir, schema=WEIGHTS_SCHEMA, plan=plan,
            score=lambda rows: score_weight_rows(fwd, rev, rows, packing=r.packing, pad_id=pad_id,
                                                 lo=r.weights_min, hi=r.weights_max),
            packing=r.packing, micro_batch_tokens=r.micro_batch_tokens, rows_per_shard=r.rows_per_shard,
        )
        if pdist.is_main():
            save_config(cfg, out_dir / "config.yaml")
        manifest = run_stage(spec, data_dir, splits, {"forward_path": r.weights_forward,
                                                      "reverse_path": r.weights_reverse}, force)
        pdist.barrier()  # every rank done before any tears down
        return manifest
    finally:
        if owned:
            pdist.cleanup()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from midpo.stages.ref import add_arguments as ref_arguments

    ref_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return run_or_spawn(args, "midpo.stages.weights", lambda cfg: main(cfg, args.split, force=args.force), splits=True)


if __name__ == "__main__":
    sys.exit(stage_cli("weights", add_arguments, run))
