"""LoRA through PEFT (`model.lora`): the adapters on the policy, the base with adapters disabled as the online
reference, and the export (PEFT's adapter folder; with `export.merge_lora` also a merged HF folder).

    peft_model = apply_lora(model, cfg.model.lora)   # in place: `model` (the HF model) now holds the adapters
    with adapters_disabled(peft_model): ...          # the frozen base: the reference, no second model
    write_lora_export(adapter_sd, cfg, base_dir=..., out=...)

The engine wraps the HF model itself (`engine.PolicyLogps.model`), not PEFT's wrapper, so the forward is the one
every other run takes and parameter names are the HF model's plus PEFT's `lora_A.default` / `base_layer` parts.
Only parameters with requires_grad (the adapters, `modules_to_save` copies) reach the optimizer
(`runtime.engine.Engine.build`); the base is frozen.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from midpo.config import LoraSettings

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # PeftModel's name of the HF model's parameters


def peft_config(s: LoraSettings):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                      target_modules=s.target_modules, modules_to_save=list(s.modules_to_save) or None,
                      init_lora_weights=s.init_weights)


def apply_lora(model: torch.nn.Module, s: LoraSettings):
    """PEFT's LoRA on `model` (in place; under ZeRO-3 the base may be partitioned already: adapters are created
    whole and partitioned by deepspeed.initialize). Returns the PeftModel (for adapters_disabled and naming)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config(s))
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    n_all = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log.info("LoRA r=%d alpha=%g on %s: %.3fM trainable of %.3fM parameters (%.2f%%)", s.r, s.alpha,
             s.target_modules, n_train / 1e6, n_all / 1e6, 100.0 * n_train / max(n_all, 1))
    return peft_model


@contextlib.contextmanager
def adapters_disabled(peft_model):
    """The frozen base (adapters and modules_to_save copies off) for the duration; PEFT restores them (and their
    requires_grad) on exit."""
    with peft_model.disable_adapter():
        yield


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_lora_model(base_dir: str | Path, model_cfg, s: LoraSettings, adapter_sd: dict[str, torch.Tensor]):
    """One process, CPU, fp32: the base at `base_dir` with adapters whose values are `adapter_sd` (the HF model's
    names, as the engine's module names them without PolicyLogps' `model.` prefix). Every trainable parameter
    must be there. -> the PeftModel."""
    import dataclasses

    from midpo.runtime.export import no_zero3_init
    from midpo.runtime.models import load_model

    with no_zero3_init():  # rank 0 alone at the end of a ZeRO-3 run: no partitioned construction
        model = load_model(base_dir, dataclasses.replace(model_cfg, dtype="fp32"), device="cpu")
        peft_model = apply_lora(model, s)
    own = dict(model.named_parameters())
    want = trainable_names(model)
    missing = [n for n in want if n not in adapter_sd]
    if missing:
        raise RuntimeError(f"adapter weights missing from the checkpoint: {missing[:6]}{'...' if len(missing) > 6 else ''}")
    with torch.no_grad():
        for n in want:
            if own[n].shape != adapter_sd[n].shape:
                raise RuntimeError(f"adapter weight {n}: shape {tuple(adapter_sd[n].shape)}, the model wants "
                                   f"{tuple(own[n].shape)} (another model.lora than the checkpoint's?)")
            own[n].copy_(adapter_sd[n].float())
    peft_model.eval()
    return peft_model


def strip_policy_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of engine.PolicyLogps (`model.` + the HF model's name) -> the HF model's names."""
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}


def write_lora_export(adapter_sd: dict[str, torch.Tensor], cfg, *, base_dir: str | Path, out: str | Path,
                      tokenizer_dir: str | Path | None, step: int | None = None) -> list[Path]:
    """One process. `adapter_sd`: the trained parameters by the HF model's names (strip_policy_prefix of a
    checkpoint's). `out`: PEFT's adapter folder (adapter_config.json + adapter_model.safetensors, fp32, with the
    tokenizer; `PeftModel.from_pretrained(base, out)` loads it); with `cfg.export.merge_lora`, `out/merged`: the
    base with the adapters merged in (`merge_and_unload`), a full HF folder in model.dtype."""
    from midpo.runtime.export import copy_tokenizer_files, write_hf_folder
    from midpo.runtime.files import check_replaceable, mark_output, publish_dir, temp_dir_for
    from midpo.runtime.models import resolve_dtype

    out = Path(out)
    check_replaceable(out)
    peft_model = load_lora_model(base_dir, cfg.model, cfg.model.lora, adapter_sd)
    tmp = temp_dir_for(out, "export")
    if step is not None:
        mark_output(tmp, "export", step=int(step))
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, tmp)
    publish_dir(tmp, out)
    log.info("exported the LoRA adapter (PEFT format) to %s", out)
    written = [out]
    if cfg.export.merge_lora:  # after the adapter: publishing it replaced `out` as a whole
        merged = peft_model.merge_and_unload()
        written.append(write_hf_folder(merged.state_dict(), merged.config, out / "merged",
                                       dtype=resolve_dtype(cfg.model.dtype), tokenizer_dir=tokenizer_dir,
                                       source_dir=base_dir, model=merged, step=step))
    return written
