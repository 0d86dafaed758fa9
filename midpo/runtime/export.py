"""Export a consolidated Hugging Face model folder (safetensors, config, tokenizer, generation config).

Two sources, one writer (`write_hf_folder`):
- `export_engine`, at the end of training, from a live ZeRO-3 engine: a COLLECTIVE (every rank gathers each
  parameter with `deepspeed.zero.GatheredParameters`, rank 0 keeps a CPU copy and writes);
- `checkpoint_state_dict`, offline in one process (`midpo export`, midpo.stages.export): DeepSpeed's
  `get_fp32_state_dict_from_zero_checkpoint` merges the ZeRO-3 shards.

The key set is checked against the model class; tied embeddings are written once (as transformers
expects); the folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
from pathlib import Path

import torch

from midpo.errors import MissingPathError
from midpo.runtime import dist as pdist
from midpo.runtime.files import check_replaceable, mark_output, publish_dir, temp_dir_for

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "*.model", "chat_template*", "vocab*", "merges.txt",
                    "added_tokens.json")
MAX_SHARD_BYTES = 4 * 10 ** 9  # export.max_shard_size's default


@contextlib.contextmanager
def no_zero3_init():
    """While a trainer's HfDeepSpeedConfig is alive, transformers builds every new model through ZeRO-3
    initialization, which cannot run on the meta device; a key-set skeleton needs none of it."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _state_keys(model) -> set[str]:
    """state_dict() key names without calling state_dict() (no tensors touched: safe on ZeRO-3 placeholders)."""
    keys = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for mod_name, mod in model.named_modules():
        for b, _ in mod.named_buffers(recurse=False):
            if b not in mod._non_persistent_buffers_set:
                keys.add(f"{mod_name}.{b}" if mod_name else b)
    return keys


def expected_keys(hf_config, model=None) -> tuple[set[str], set[str]]:
    """(keys the exported state dict must have, keys dropped as tied) for this model class.

    `model`: the live HF model when there is one; else a skeleton is built on the meta device (under a
    live HfDeepSpeedConfig that would go through ZeRO-3 initialization, hence the live model first)."""
    if model is None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"), no_zero3_init():
            model = AutoModelForCausalLM.from_config(hf_config)
    keys = _state_keys(model)
    tied: set[str] = set()
    out = model.get_output_embeddings()
    if getattr(hf_config, "tie_word_embeddings", False) and out is not None:
        # keep the input embedding, drop the output one (transformers re-ties on load); both names
        # point at one Parameter, so select the output one by its module's name, not by identity
        name = next(n for n, m in model.named_modules() if m is out)
        tied = {f"{name}.weight"} & keys
        keys -= tied
    return keys, tied


def checkpoint_format(state_dict: dict[str, torch.Tensor], hf_config, model=None) -> dict[str, torch.Tensor]:
    """The tensors under the names (and shapes) transformers' own save_pretrained writes: a model class whose
    loading converts weights (transformers 5 fuses MoE experts into 3-D tensors; a Qwen2-MoE / Mixtral checkpoint
    holds one 2-D tensor per expert) gets them converted back, so other tools (vLLM, older transformers) read the
    export as they read the original checkpoint. Other models: unchanged."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: module names are the checkpoint's
        return state_dict
    if model is None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"), no_zero3_init():
            model = AutoModelForCausalLM.from_config(hf_config)
    return dict(revert_weight_conversion(model, state_dict))


def gather_engine_state_dict(engine, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """COLLECTIVE: every rank must call. Returns the full CPU state dict on rank 0, None elsewhere.
    `trainable_only`: only the parameters that train (LoRA: the adapters), no buffers."""
    import deepspeed

    module = getattr(engine.module, "model", engine.module)  # the HF model inside engine.PolicyLogps
    rank0 = pdist.is_main()
    sd: dict[str, torch.Tensor] = {}
    # One parameter at a time keeps peak memory at one full tensor per rank.
    for name, p in module.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank0:
                sd[name] = p.data.detach().to("cpu", copy=True)
    if rank0 and not trainable_only:  # persistent buffers only: a non-persistent one (rotary tables, Gemma's embed_scale) is no weight
        for mod_name, mod in module.named_modules():
            for b_name, b in mod.named_buffers(recurse=False):
                if b is not None and b_name not in mod._non_persistent_buffers_set:
                    sd.setdefault(f"{mod_name}.{b_name}" if mod_name else b_name, b.detach().to("cpu", copy=True))
    return sd if rank0 else None


def write_hf_folder(state_dict: dict[str, torch.Tensor], hf_config, out_dir: str | Path, *, dtype: torch.dtype,
                    tokenizer_dir: str | Path | None, source_dir: str | Path | None, model=None,
                    step: int | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `state_dict` as a HF folder (one process). Checks the key set first. `step`: the training step the
    weights are from, kept in the folder's output marker (a relaunch of a finished run reads it). Weights over
    `max_shard_bytes` go into model-0000k-of-0000n.safetensors files with model.safetensors.index.json (a tensor
    larger than a shard gets a shard of its own, as transformers does)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    want, tied = expected_keys(hf_config, model)
    if not set(state_dict) & want and all(k.startswith("model.") for k in state_dict):
        state_dict = {k[len("model."):]: v for k, v in state_dict.items()}  # checkpoint of engine.PolicyLogps
    sd = {k: v for k, v in state_dict.items() if k not in tied}
    for k in [k for k in sd if k not in want and "rotary" in k]:  # non-persistent buffers (gathered from modules)
        sd.pop(k)
    missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
    if missing or unexpected:
        raise RuntimeError(f"export key set mismatch: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                           f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    check_replaceable(out)  # before the work: never replace a folder midpo did not write
    tmp = temp_dir_for(out, "export")
    if step is not None:
        mark_output(tmp, "export", step=int(step))

    sd = checkpoint_format(sd, hf_config, model)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sorted(sd.items())}
    shards, cur, cur_bytes = [], {}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if cur and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = v
        cur_bytes += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    hf_config.dtype = dtype
    hf_config.save_pretrained(str(tmp))
    _write_generation_config(hf_config, tmp, source_dir, tokenizer_dir)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, tmp)

    publish_dir(tmp, out)
    log.info("exported %d tensors (%s) to %s", len(tensors), dtype, out)
    return out


def copy_tokenizer_files(tokenizer_dir: str | Path, out: Path) -> None:
    """The tokenizer's files (vocab/model, special tokens, chat template) into `out`; none found is an error."""
    copied = 0
    for pat in _TOKENIZER_FILES:
        for f in Path(tokenizer_dir).glob(pat):
            if f.is_file():
                shutil.copy2(f, out / f.name)
                copied += 1
    if not copied:
        raise MissingPathError(f"no tokenizer files found in {tokenizer_dir}")


def _write_generation_config(hf_config, out: Path, source_dir, tokenizer_dir) -> None:
    if source_dir is not None and (Path(source_dir) / "generation_config.json").exists():
        shutil.copy2(Path(source_dir) / "generation_config.json", out / "generation_config.json")
        return
    from transformers import GenerationConfig

    gen = GenerationConfig.from_model_config(hf_config)
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer_config.json").exists():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            gen.eos_token_id = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
            gen.bos_token_id = gen.bos_token_id if gen.bos_token_id is not None else tok.bos_token_id
            gen.pad_token_id = gen.pad_token_id if gen.pad_token_id is not None else tok.pad_token_id
        except Exception as e:  # a generation config without token ids still loads; say why
            log.warning("could not read token ids from the tokenizer in %s: %s", tokenizer_dir, e)
    gen.save_pretrained(str(out))


def export_engine(engine, out_dir: str | Path, *, dtype: torch.dtype, tokenizer_dir: str | Path | None,
                  source_dir: str | Path | None, step: int | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """COLLECTIVE: gather an engine's live (ZeRO-3) weights; rank 0 writes them as a HF folder at `out_dir`. The
    engine's module is `PolicyLogps` or `PriorLM` (the HF model is its `.model`)."""
    sd = gather_engine_state_dict(engine)
    if pdist.is_main():
        model = getattr(engine.module, "model", engine.module)
        write_hf_folder(sd, copy.deepcopy(model.config), out_dir, dtype=dtype, tokenizer_dir=tokenizer_dir,
                        source_dir=source_dir, model=model, step=step, max_shard_bytes=max_shard_bytes)
    pdist.barrier()
    return Path(out_dir)


def checkpoint_state_dict(load_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """One process, no collectives: the fp32 weights of the DeepSpeed checkpoint `load_dir/tag`: its ZeRO-2/3
    partitions merged (zero_to_fp32; LLaMA-Factory #2239: exporting shards without gathering gave a broken model),
    or a stage-0 checkpoint's whole model file. Every file is read through runtime.checkpoint.safe_load (zero_to_fp32's
    own torch.load included). Keys as the engine's module names them (`model.` prefix of PolicyLogps kept)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from midpo.runtime.checkpoint import safe_load, safe_torch_load

    folder = Path(load_dir) / tag
    if list(folder.glob("*zero_pp_rank_*")):
        with safe_torch_load():
            return get_fp32_state_dict_from_zero_checkpoint(str(load_dir), tag=tag)
    states = safe_load(folder / "mp_rank_00_model_states.pt", map_location="cpu")
    return {k: v.float() for k, v in states["module"].items()}
