"""`midpo export`: a consolidated Hugging Face folder from a training checkpoint (one process, no collectives).

    midpo export --config RECIPE                      # checkpoints/latest -> <run_dir>/export
    midpo export --config RECIPE --checkpoint runs/x/checkpoints/step-0000100 --out DIR

The recipe says where to write (its run_dir's export/, or --out); the checkpoint's own config only says which
model the weights belong to (its `model` section and tokenizer), so a run folder copied elsewhere exports into
the copy, never into the original. With `model.lora` the checkpoint holds the adapters: `<out>` is PEFT's adapter
folder and, with `export.merge_lora=true`, `<out>/merged` the merged full model. With MI-DPO (`loss.prior=learned`) the prior network is written to
`<out>/prior` after the policy. Every checkpoint file is read through the safe loader
(midpo.runtime.checkpoint.safe_load); an existing output folder is replaced only when midpo wrote it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from midpo.config import Config, load_config, parse_size
from midpo.errors import MissingPathError
from midpo.runtime.checkpoint import latest_checkpoint
from midpo.runtime.export import MAX_SHARD_BYTES, checkpoint_state_dict, write_hf_folder
from midpo.runtime.files import check_replaceable
from midpo.runtime.layout import claim_run
from midpo.runtime.models import resolve_dtype

PRIOR_TAG = "prior"  # <step>/prior: the prior network's DeepSpeed checkpoint; <step>/prior_hf_config: its config


def weights_config(recipe: Config, ckpt: Path, overrides: list[str]) -> Config:
    """The recipe, with the model the checkpoint's weights belong to: the `model` section and the tokenizer of
    the checkpoint's own resolved config (policy folder, dtype, remote code). Everything written (run_dir, the
    export folder) stays the recipe's."""
    saved = ckpt / "config.yaml"
    if not saved.exists():
        return recipe
    own = load_config(saved, overrides)
    return dataclasses.replace(recipe, model=own.model,
                               data=dataclasses.replace(recipe.data, tokenizer=own.data.tokenizer))


def find_checkpoint(cfg: Config, given: str) -> Path:
    if given == "latest":
        ckpt = latest_checkpoint(cfg.run_path / "checkpoints")
        if ckpt is None:
            raise MissingPathError(f"no checkpoint: {cfg.run_path}/checkpoints/latest does not exist (train first)")
        return ckpt
    ckpt = Path(given)
    if not (ckpt / "trainer_state.json").is_file():
        what = "is not a checkpoint folder (no trainer_state.json)" if ckpt.is_dir() else "does not exist"
        raise MissingPathError(f"--checkpoint {ckpt} {what}")
    return ckpt


def export_checkpoint(ckpt: Path, cfg: Config, out: Path) -> list[Path]:
    """The policy (and the prior network, when the checkpoint holds one) of `ckpt` as HF folders under `out`."""
    from transformers import AutoConfig

    layout = claim_run(cfg, needs=("policy", "tokenizer"))
    dtype = resolve_dtype(cfg.model.dtype)
    step = int(json.loads((ckpt / "trainer_state.json").read_text())["step"])
    # PolicyLogps may also hold a prior's parameters (`prior.*`, SparsePO's mask network): not the HF model
    sd = {k: v for k, v in checkpoint_state_dict(ckpt.parent, ckpt.name).items() if not k.startswith("prior.")}
    if cfg.model.lora.enabled:  # the checkpoint holds the adapters only; the base is the policy folder
        from midpo.runtime.lora import strip_policy_prefix, write_lora_export

        written = write_lora_export(strip_policy_prefix(sd), cfg, base_dir=layout.policy, out=out, tokenizer_dir=layout.tokenizer, step=step)
        if (ckpt / PRIOR_TAG).is_dir():
            written.append(export_prior(ckpt, out / PRIOR_TAG, dtype=dtype, tokenizer_dir=layout.tokenizer, step=step))
        return written
    hf_config = AutoConfig.from_pretrained(str(layout.policy), trust_remote_code=cfg.model.trust_remote_code)
    shard = parse_size(cfg.export.max_shard_size, "export.max_shard_size")
    written = [write_hf_folder(sd, hf_config, out, dtype=dtype, tokenizer_dir=layout.tokenizer,
                               source_dir=layout.policy, step=step, max_shard_bytes=shard)]
    if (ckpt / PRIOR_TAG).is_dir():  # after the policy: write_hf_folder replaces the policy folder as a whole
        written.append(export_prior(ckpt, out / PRIOR_TAG, dtype=dtype, tokenizer_dir=layout.tokenizer, step=step,
                                    max_shard_bytes=shard))
    return written


def export_prior(ckpt: Path, out: Path, *, dtype, tokenizer_dir, step: int | None = None,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """The MI-DPO prior network of checkpoint `ckpt` (`<ckpt>/prior`, its config in `<ckpt>/prior_hf_config`) as a
    HF folder at `out`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(ckpt / f"{PRIOR_TAG}_hf_config"))
    return write_hf_folder(checkpoint_state_dict(ckpt, PRIOR_TAG), config, out, dtype=dtype,
                           tokenizer_dir=tokenizer_dir, source_dir=None, step=step, max_shard_bytes=max_shard_bytes)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe (YAML path or name in recipes/)")
    p.add_argument("--checkpoint", default="latest",
                   help="checkpoint folder, or `latest` (default) = <run_dir>/checkpoints/latest")
    p.add_argument("--out", default=None, help="output folder (default <run_dir>/export)")


def run(args) -> int:
    overrides = list(getattr(args, "overrides", []))
    recipe = load_config(args.config, overrides)
    ckpt = find_checkpoint(recipe, args.checkpoint)
    cfg = weights_config(recipe, ckpt, overrides)
    out = Path(args.out) if args.out else cfg.run_path / "export"
    check_replaceable(out)  # before merging the checkpoint
    for folder in export_checkpoint(ckpt, cfg, out):
        print(f"exported {ckpt} -> {folder}")
    return 0


if __name__ == "__main__":
    from midpo.runtime.launch import stage_cli

    sys.exit(stage_cli("export", add_arguments, run))
