"""Loading models and tokenizers the same way in every stage (reference, training, export).

Policy and reference must go through one code path at one precision, or step-0 log-probs differ
(NeMo-Aligner #227, eric-mitchell/direct-preference-optimization #34). Loading is safe by default:
safetensors weights only, `trust_remote_code` off unless the recipe turns it on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from midpo.config import ConfigError, ModelConfig
from midpo.errors import MissingPathError, UnusableInputError
from midpo.runtime.fingerprint import TOKENIZER_FILES, hash_dir, hash_json

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` = bf16 on CUDA, fp32 on CPU (bf16 matmul on CPU runs at about half fp32's speed here)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"model.dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}") from None


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def model_class(model_config):
    """The causal-LM class of an HF config (None when transformers has none for it: remote code)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    except KeyError:
        return None


def attention_support(model_config) -> tuple[str, ...]:
    """The attention implementations a model family computes correctly, best first. Attention soft-capping
    (Gemma 2) runs only in eager and flash-attn (HF refuses sdpa for it); a family without sdpa support gets eager."""
    cls = model_class(model_config)
    flash = cls is None or bool(getattr(cls, "_supports_flash_attn", False))
    sdpa = (cls is None or bool(getattr(cls, "_supports_sdpa", False))) and not getattr(
        model_config, "attn_logit_softcapping", None)
    return tuple(n for n, ok in (("flash_attention_2", flash), ("sdpa", sdpa), ("eager", True)) if ok)


def resolve_attn(name: str, model_config=None) -> str:
    """`auto` = flash_attention_2 on CUDA when flash-attn is installed, else sdpa; either only when the model
    family (`model_config`: an HF config or a model folder) supports it, else the next (eager last). A named
    implementation the family cannot run is refused."""
    if name not in ("auto", "flash_attention_2", "sdpa", "eager"):
        raise ConfigError(f"model.attn_implementation must be auto, flash_attention_2, sdpa or eager; got {name!r}")
    if isinstance(model_config, (str, Path)):
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(str(model_config))
    supported = attention_support(model_config) if model_config is not None else ("flash_attention_2", "sdpa", "eager")
    if name == "auto":
        usable = [n for n in supported if n != "flash_attention_2" or flash_attn_available()]
        return usable[0]
    if name == "flash_attention_2" and not flash_attn_available():
        raise ConfigError("model.attn_implementation=flash_attention_2 needs CUDA and `pip install midpo[gpu]`")
    if name not in supported:
        raise ConfigError(f"model.attn_implementation={name} cannot run {type(model_config).__name__.removesuffix('Config')}"
                          f" models correctly (attention soft-capping or no support in transformers); use "
                          f"{' or '.join(supported)}, or auto")
    return name


def check_safe_weights(path: str | Path, trust_remote_code: bool) -> None:
    p = Path(path)
    if not p.is_dir():
        raise MissingPathError(f"model folder {p} does not exist")
    if not (p / "config.json").exists():
        raise MissingPathError(f"{p} has no config.json: not a Hugging Face model folder")
    if not any(p.glob("*.safetensors")):
        found = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise UnusableInputError(
            f"{p} has no .safetensors weights (found {found or 'none'}); midpo loads only safetensors. "
            "Convert once with `transformers` (`model.save_pretrained(dir, safe_serialization=True)`)."
        )
    if not trust_remote_code:
        cfg = json.loads((p / "config.json").read_text())
        if cfg.get("auto_map"):
            raise UnusableInputError(f"{p} needs custom code (auto_map in config.json); set model.trust_remote_code=true "
                             "only if you trust its source")


def load_model(path: str | Path, cfg: ModelConfig, *, device: torch.device | str = "cpu", train: bool = False):
    """An HF causal LM in the configured dtype and attention implementation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_safe_weights(path, cfg.trust_remote_code)
    dtype = resolve_dtype(cfg.dtype)
    attn = resolve_attn(cfg.attn_implementation,
                        AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code))
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
    )
    model.to(device)
    if train:
        model.train()
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    else:
        model.eval()
        model.requires_grad_(False)
    log.info("loaded %s (%s, attn=%s, %.1fM params)", path, dtype, attn, param_count(model) / 1e6)
    return model


def param_count(model) -> int:
    """Parameters of the whole model. Under ZeRO-3 a parameter is a placeholder of numel 0 whose real size is
    `ds_numel`; tied weights are counted once."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def compile_decoder(model) -> None:
    """torch.compile the decoder stack IN PLACE (``nn.Module.compile``: state-dict keys unchanged, so
    checkpoints and export are the same as eager). The output head stays eager: it runs chunk by chunk
    under activation checkpointing (midpo.core.logprobs). Shapes: static first, then Dynamo's automatic
    dynamic shapes after the first length change, so varying batch lengths cost one recompile, not one each."""
    model.get_decoder().compile()
    log.info("torch.compile: decoder of %s compiled (Inductor)", type(model).__name__)


def compile_stats() -> str:
    """Dynamo's counters as one log fragment: how many graphs were compiled and how many graph breaks."""
    from torch._dynamo.utils import counters

    return (f"{counters['stats'].get('unique_graphs', 0)} graphs, "
            f"{sum(counters['graph_break'].values())} graph breaks")


# Config keys that hold a model's position limit (Llama/Mistral/Qwen..., GPT-2, others).
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(config) -> int | None:
    """The longest sequence, in tokens, a model's positions cover: from an HF config object or a config.json
    dict; None when it names no limit."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    for key in _POSITION_KEYS:
        value = get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def folder_max_positions(folder: str | Path) -> int | None:
    """max_positions of the model whose folder this is (its config.json), or None (no model config there)."""
    path = Path(folder) / "config.json"
    try:
        return max_positions(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        return None


def longest_pair(ds) -> int:
    """The longest prompt + longer response, in tokens, of a tokenized split (a `datasets.Dataset` with
    prompt_ids/chosen_ids/rejected_ids): the most positions one forward of it uses. Reads list lengths only."""
    import pyarrow.compute as pc

    table = getattr(ds.data, "table", ds.data)
    longest = 0
    for batch in table.to_batches():
        lengths = [pc.list_value_length(batch.column(c)) for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
        n = pc.max(pc.add(lengths[0], pc.max_element_wise(lengths[1], lengths[2]))).as_py()
        longest = max(longest, n or 0)
    return longest


def positions_problem(longest: int, limit: int | None, *, what: str, model: str | Path) -> str | None:
    """Why `longest` tokens do not fit a model with `limit` positions (None when they do, or no limit is known).
    Past its limit a RoPE model runs on, silently, on positions it was never trained on."""
    if limit is None or longest <= limit:
        return None
    return (f"{what} is {longest} tokens, but the model {model} has max_position_embeddings={limit}. "
            f"Lower data.max_length to at most {limit} (or choose a model with more positions) and re-run `midpo prep`")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def model_fingerprint(path: str | Path) -> str:
    """Hash of config + weight files on disk (never of a module's state_dict: blind under ZeRO-3)."""
    files = hash_dir(path, ("config.json", "*.safetensors", "*.safetensors.index.json"))
    if not files:
        raise MissingPathError(f"no config/safetensors files under {path}")
    return hash_json(files)


def tokenizer_files(path: str | Path) -> dict[str, str]:
    """{file: sha256} of the tokenizer's files (vocab/model, special tokens, chat template: TOKENIZER_FILES)."""
    files = hash_dir(path, TOKENIZER_FILES)
    if not files:
        raise MissingPathError(f"tokenizer folder {path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return files


def tokenizer_fingerprint(path: str | Path) -> str:
    """The one tokenizer fingerprint: the hash of `tokenizer_files` (`midpo prep` records it in its manifest, the
    caches and training compare against it)."""
    return hash_json(tokenizer_files(path))


def pad_id_of(model) -> int:
    """The id that pads a batch: the config's pad token, else its EOS (masked out either way), else 0."""
    cfg = model.config
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(cfg, name, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0
