"""Typed run configuration: dataclass defaults < YAML recipe < `key.sub=value` CLI overrides.

One `Config` describes a whole run; every stage reads the same resolved config and writes only
inside `cfg.run_dir`. The resolved config is saved into the run folder (and every checkpoint) so
a run can always be reproduced from its own folder.

Every key is documented once, as its field's help (`knob(default, "help")`, `section(Cls)` for a section whose
docstring is its help): `midpo config show RECIPE` prints the resolved config with that help, and prep's flags reuse
it. `__post_init__` rejects contradictions.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import re
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from midpo.errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"  # shipped as package data (pyproject.toml)
DS_CONFIGS_DIR = PACKAGE_DIR / "ds_configs"

log = logging.getLogger(__name__)


def knob(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A Config field with its help text, the one place a key is documented: `midpo config show` prints it, prep's
    flags reuse it. `knob(2000, "pairs to generate")`, or `knob(help=..., factory=list)` for a mutable default."""
    if not help.strip():  # a key without help would show up blank in `midpo config show`
        raise TypeError("knob() needs a non-empty help text")
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(cls: type) -> Any:
    """A Config field holding a section dataclass; its help is the section's docstring (documented once)."""
    return field(default_factory=cls, metadata={"help": inspect.cleandoc(cls.__doc__ or "")})


@dataclass
class SynthConfig:
    """The embedded default: a verifiable preference task, a local tokenizer and a tiny Llama."""

    n_pairs: int = knob(2000, "preference pairs to generate")
    seed: int = knob(0, "seed of the generated pairs and prompts and of the model's random initialization")
    min_items: int = knob(3, "list length range of the task prompts: shortest list")
    max_items: int = knob(8, "list length range of the task prompts: longest list")
    tasks: list[str] = knob(help="task kinds to draw from (sort | reverse | dedupe)",
                            factory=lambda: ["sort", "reverse", "dedupe"])
    vocab_size: int = knob(512, "sentencepiece vocabulary (byte fallback on)")
    hidden_size: int = knob(128, "tiny Llama: hidden size")
    intermediate_size: int = knob(344, "tiny Llama: MLP intermediate size")
    num_layers: int = knob(4, "tiny Llama: decoder layers")
    num_heads: int = knob(4, "tiny Llama: attention heads")
    num_kv_heads: int = knob(2, "tiny Llama: key/value heads (grouped-query attention when fewer than num_heads)")
    max_position_embeddings: int = knob(512, "tiny Llama: longest sequence, in tokens")
    n_eval_prompts: int = knob(200, "held-out prompts (disjoint seed) for generation-based evaluation")
    n_onpolicy_prompts: int = knob(0, "fresh prompts (unseen by SFT, disjoint from eval) for on-policy sampling")


@dataclass
class DataConfig:
    """Stage 1 (`midpo prep`): raw preference files -> tokenized sharded Arrow + manifest."""

    inputs: list[str] = knob(help="paths or globs; empty = the synthetic default", factory=list)
    format: str = knob("auto", "auto | standard | conversational | implicit | hh | pku_saferlhf | shp | helpsteer2 | "
                       "helpsteer3 | ultrafeedback | nectar | rated (docs/data.md)")
    tokenizer: str | None = knob(None, "tokenizer folder; default: the policy model's folder")
    max_prompt_tokens: int = knob(256, "prompts longer than this keep their END")
    max_length: int = knob(512, "prompt + longest response, in tokens")
    response_overflow: str = knob("drop", "drop | truncate: what to do with over-long responses")
    eval_fraction: float = knob(0.05, "fraction of pairs held out as the eval split; deterministic by row id")
    shard_rows: int = knob(50_000, "rows per Arrow shard")
    num_proc: int = knob(1, "tokenization worker processes")
    max_reject_fraction: float = knob(
        0.05, "fail above this fraction of unusable rows (duplicates not counted), in [0, 1]")
    dedup: bool = knob(True, "reject repeats of a pair (same row id), keeping the first")
    system_prompt: str | None = knob(None, "prepended as a system message when the input has none")
    prompt_overflow: str = knob(
        "truncate", "truncate (keep the END, BOS kept) | drop: prompts over max_prompt_tokens")
    columns: dict[str, str] = knob(
        help="field -> column mapping for schemas with other column names, e.g. {prompt: question, chosen: "
        "answer_good, rejected: answer_bad, system: sys}; on the command line prompt=question,chosen=answer_good "
        "(fields: docs/data.md)", factory=dict)
    split: str | None = knob(None, "the split read from a DatasetDict folder or a folder of <split>-*.parquet/jsonl "
                             "shards (e.g. train_prefs); required when it holds several")
    eval_split: str | None = knob(None, "a split of the same folder used whole as the eval split (e.g. test_prefs), "
                                  "instead of an eval_fraction of the rows")
    pairing: str = knob("best_vs_worst", "rated/ranked lists -> pairs: best_vs_worst | best_vs_random (Zephyr) | "
                        "all_pairs; ties never become pairs")
    min_score_margin: float = knob(0.0, "rated/ranked lists: a pair's score (or rank) difference must be at least "
                                   "this (and > 0)")
    seed: int = knob(0, "seed of best_vs_random's draws and of data.mix's row selection")
    mix: list[dict] = knob(
        help="several inputs mixed (instead of data.inputs): a list of {path, weight | max_rows, format, columns, "
        "split, eval_split, pairing, min_score_margin}; weights are shares of the kept pairs, max_rows caps a "
        "source; unset keys take the data.* value", factory=list)

    def __post_init__(self) -> None:
        if self.prompt_overflow not in ("drop", "truncate"):
            raise ConfigError(f"data.prompt_overflow must be drop or truncate, got {self.prompt_overflow!r}")
        if self.response_overflow not in ("drop", "truncate"):
            raise ConfigError(f"data.response_overflow must be drop or truncate, got {self.response_overflow!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_prompt_tokens >= self.max_length:
            raise ConfigError("data.max_prompt_tokens must be smaller than data.max_length")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ConfigError(f"data.max_reject_fraction must be in [0, 1], got {self.max_reject_fraction}")
        check_data_sources(self)


PAIRINGS = ("best_vs_worst", "best_vs_random", "all_pairs")
MIX_KEYS = {"path": str, "weight": (int, float), "max_rows": int, "format": str, "columns": dict, "split": str,
            "eval_split": str, "pairing": str, "min_score_margin": (int, float)}


def check_data_sources(d: DataConfig) -> None:
    """data.pairing / min_score_margin / columns / mix: the checks that need no data layer (field names and format
    names are checked by midpo.data.prepare)."""
    for where, pairing, margin in [("data", d.pairing, d.min_score_margin),
                                   *((f"data.mix[{i}]", e.get("pairing"), e.get("min_score_margin"))
                                     for i, e in enumerate(d.mix) if isinstance(e, dict))]:
        if pairing is not None and pairing not in PAIRINGS:
            raise ConfigError(f"{where}.pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
        if margin is not None and not (isinstance(margin, (int, float)) and margin >= 0):
            raise ConfigError(f"{where}.min_score_margin must be a number >= 0, got {margin!r}")
    if d.mix and d.inputs:
        raise ConfigError("data.mix and data.inputs are both set; list every input in data.mix")
    for i, e in enumerate(d.mix):
        where = f"data.mix[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise ConfigError(f"{where} must be a mapping with a path, got {e!r}")
        for k, v in e.items():
            if k not in MIX_KEYS:
                raise ConfigError(f"{where}: unknown key {k!r}; keys: {', '.join(MIX_KEYS)}")
            if v is not None and (isinstance(v, bool) or not isinstance(v, MIX_KEYS[k])):
                raise ConfigError(f"{where}.{k}: wrong type {type(v).__name__}")
        if e.get("weight") is not None and not e["weight"] > 0:
            raise ConfigError(f"{where}.weight must be > 0, got {e['weight']}")
        if e.get("max_rows") is not None and e["max_rows"] < 1:
            raise ConfigError(f"{where}.max_rows must be >= 1, got {e['max_rows']}")
    weighted = [e.get("weight") is not None for e in d.mix]
    if any(weighted) and not all(weighted):
        raise ConfigError("data.mix: give every entry a weight, or none (weights are shares of the mix)")


@dataclass
class LoraSettings:
    """LoRA adapters through PEFT (`peft.get_peft_model`): only the adapters (and `modules_to_save` copies) are
    trained and sit in the optimizer; the base stays frozen. r=0: off (full fine-tuning). Checkpoints hold the
    adapters and their optimizer state; export writes PEFT's adapter folder (`export.merge_lora`: also a merged
    model). With an online reference, the reference is the base with the adapters disabled (no second model)."""

    r: int = knob(0, "LoRA rank; 0 = no LoRA (every parameter trains)")
    alpha: float = knob(16.0, "LoRA alpha: the update is (alpha / r) * B @ A")
    dropout: float = knob(0.0, "dropout on the adapters' input, in [0, 1)")
    target_modules: list[str] | str = knob(
        "all-linear", "module names (suffixes) that get adapters, e.g. [q_proj, v_proj]; all-linear = every linear "
        "layer but the output head")
    modules_to_save: list[str] = knob(
        help="modules trained in full beside the adapters (PEFT's modules_to_save; a trainable copy each), e.g. "
        "[lm_head]", factory=list)
    init_weights: bool | str = knob(
        True, "PEFT's init_lora_weights: true (B = 0: the policy starts as the base) | gaussian (B = 0 too) | "
        "false | orthogonal (both random: the start differs from the base, the start-of-run probe is skipped). "
        "pissa, olora, loftq, corda, eva, lora_ga and mica are refused: they rewrite the base or need data / an "
        "extra config, so the base with adapters disabled would no longer be the reference")

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ConfigError(f"model.lora.r must be >= 0, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.init_weights not in LORA_INITS:
            raise ConfigError(f"model.lora.init_weights must be one of true, false, gaussian, orthogonal; got "
                              f"{self.init_weights!r} (PEFT's base-rewriting or data-driven inits are not supported: "
                              "the frozen base must stay the reference)")
        if self.r and self.init_weights == "orthogonal" and self.r % 2:
            raise ConfigError(f"model.lora.init_weights=orthogonal needs an even rank, got r={self.r}")

    @property
    def enabled(self) -> bool:
        return self.r > 0


LORA_INITS = (True, False, "gaussian", "orthogonal")


@dataclass
class ModelConfig:
    """Which models the stages load, and how."""

    policy: str | None = knob(
        None, "HF folder; default: <run_dir>/sft (or <run_dir>/model for the tiny default)")
    reference: str | None = knob(None, "HF folder of pi_ref; default: the policy's initial weights")
    dtype: str = knob("auto", "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    attn_implementation: str = knob(
        "auto", "auto (flash_attention_2 on CUDA when installed, else sdpa; only what the model family supports: "
        "Gemma 2's attention soft-capping gets eager on CPU) | flash_attention_2 | sdpa | eager")
    trust_remote_code: bool = knob(False, "never on unless the recipe says so")
    gradient_checkpointing: bool = knob(
        False, "recompute activations in the backward pass instead of keeping them (memory for time)")
    lora: LoraSettings = section(LoraSettings)


@dataclass
class SftConfig:
    """A minimal supervised warm start on the chosen responses (`midpo sft`), so the reference of the
    embedded default can answer at all before preference training. Single process; steps=0 skips it."""

    steps: int = knob(0, "optimizer steps; 0 = no SFT stage")
    batch_size: int = knob(32, "pairs (their prompt + chosen response) per step")
    lr: float = knob(1e-3, "peak learning rate (AdamW; linear warmup, then cosine decay to 0)")
    warmup_steps: int = knob(20, "steps of linear lr warmup")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    num_threads: int = knob(
        1, "torch intra-op threads of this single-process stage (and of `midpo run`'s generation eval); 0 = "
        "torch's default (all cores). 1 by default: a tiny model gains little from a second thread, and "
        "with any other process on the cores OpenMP's spin-waiting makes 2 threads up to ~20x slower.")


@dataclass
class LossConfig:
    """The generalized MI-DPO loss: the prior that specializes it and the link, the function of the
    prior-adjusted margin (see docs/algorithms.md)."""

    prior: str = knob("dpo", "a name from midpo.core.priors.PRIORS")
    beta: float | None = knob(
        None, "a = beta_X of the recovered algorithm; None = the prior's official default (0.1; simpo 2.0)")
    label_smoothing: float = knob(
        0.0, "the label-noise rate eps, in [0, 0.5): cDPO's for the sigmoid link, and eps of the robust and exo_pair "
        "links (the same rate in their papers); refused when no link of the loss has an eps")
    sft_weight: float = knob(0.0, "weight of a token-mean NLL term on the chosen response (logged as loss/sft)")
    options: dict[str, Any] = knob(help="prior-specific (gamma_beta_ratio, c, r, alpha, ...)", factory=dict)
    link: str = knob(
        "sigmoid", "the function of the prior-adjusted margin, a name from midpo.core.links.LINK_NAMES: sigmoid (DPO) "
        "| ipo | hinge | robust | exo_pair | nca_pair | bco_pair | sppo_hard | apo_zero | apo_down (checked when "
        "training starts; docs/algorithms.md, 'Links')")
    link_options: dict[str, Any] = knob(
        help="the link's hyperparameters, named as in its paper: hinge delta [1]; robust eps (required: the label-flip "
        "rate); exo_pair eps [1e-3]; bco_pair delta (unset: the running mean of the rewards, kept by the trainer)",
        factory=dict)
    terms: list[dict[str, Any]] = knob(
        help="a weighted sum of links instead of loss.link (TRL's multi-loss): [{link: sigmoid, weight: 1}, {link: "
        "bco_pair, weight: 1, options: {}}] (weight default 1, options as loss.link_options); each term is logged as "
        "loss/<link>; loss.sft_weight adds the NLL term as before", factory=list)

    def __post_init__(self) -> None:
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(f"loss.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise ConfigError(f"loss.sft_weight must be >= 0, got {self.sft_weight}")
        # link names and hyperparameters are checked against the registry (midpo.core.losses.link_terms: config sits
        # below core) when training starts; the shape of the settings is checked here
        if self.terms and (self.link != "sigmoid" or self.link_options):
            raise ConfigError("loss.terms replaces loss.link and loss.link_options: set either loss.terms or "
                              "loss.link (with loss.link_options), not both")
        for i, t in enumerate(self.terms):
            where = f"loss.terms[{i}]"
            if set(t) - {"link", "weight", "options"} or not isinstance(t.get("link"), str):
                raise ConfigError(f"{where} must be a mapping {{link: NAME, weight: W, options: {{...}}}} (weight "
                                  f"default 1, options default {{}}), got {t!r}")
            w = t.get("weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
                raise ConfigError(f"{where}.weight must be a finite number > 0, got {w!r}")
            if not isinstance(t.get("options", {}) or {}, dict):
                raise ConfigError(f"{where}.options must be a mapping of the link's hyperparameters, got "
                                  f"{t['options']!r}")


@dataclass
class RefConfig:
    """Stage 2 (`midpo ref`): the offline per-token reference cache."""

    micro_batch_tokens: int = knob(4096, "token budget of one forward")
    packing: bool = knob(True, "packed (padding-free) or length-bucketed padded batches")
    zero3: bool = knob(False, "shard the reference with ZeRO-3 inference when it does not fit one device")
    topk: int = knob(0, ">0: also cache the top-k of the reference distribution per response token")
    rows_per_shard: int = knob(2048, "rows per cache chunk: the resume granularity")
    sequence_parallel: int = knob(
        1, "Ulysses sequence parallelism: ranks form groups of this many, each group scores one micro-batch split "
        "along the sequence (attention on all positions for a slice of the heads); 1 = off (docs/sequence_parallel.md)")
    weights_forward: str | None = knob(
        None, "TIS-DPO token weights (`midpo weights`): two contrastive models scored on the same data. "
        "HF folder of the forward DPO model (trained on chosen > rejected)")
    weights_reverse: str | None = knob(
        None, "TIS-DPO token weights (`midpo weights`): HF folder of the reverse DPO model (trained on "
        "rejected > chosen)")
    weights_min: float = knob(
        0.7, "TIS-DPO token weights: rank-based mapping of per-token scores into [weights_min, weights_max]")
    weights_max: float = knob(1.3, "TIS-DPO token weights: upper end of that mapping (see weights_min)")

    def __post_init__(self) -> None:
        if self.sequence_parallel < 1:
            raise ConfigError(f"ref.sequence_parallel must be >= 1, got {self.sequence_parallel}")


@dataclass
class TrainConfig:
    """Stage 3 (`midpo train`)."""

    ds_config: str = knob(
        "auto", "a file in ds_configs/ or a path; auto = chosen at start by `midpo plan`'s memory model: the cheapest "
        "ZeRO stage whose predicted peak fits the device's free memory (CUDA: torch.cuda.mem_get_info; CPU: the "
        "host's available memory / processes on the node), tried in the order stage 0, ZeRO-2, ZeRO-3, ZeRO-3 + "
        "optimizer/parameter offload (bf16 on CUDA only), from the shipped files of the model's dtype "
        "(zero*_bf16 / zero3_offload, zero*_cpu_fp32); the choice and its reason are logged and recorded in "
        "<run_dir>/config.yaml (a resume must resolve to the same, docs/plan.md)")
    micro_batch_size: int = knob(8, "pairs per micro-batch per rank")
    grad_accum: int = knob(1, "micro-batches per optimizer step (global batch = micro x accum x processes)")
    micro_batch_tokens: int = knob(
        0, "> 0: micro-batches filled up to this many tokens (as the layout lays them out) instead of "
        "micro_batch_size pairs; the global batch stays micro x accum x processes pairs, every rank runs the same "
        "number of micro-steps, the loss is normalized over the global batch (gradient = the fixed-count one's); "
        "0 = off. `midpo plan` proposes a value")
    max_steps: int = knob(-1, "optimizer steps; -1 = epochs * steps per epoch")
    epochs: int = knob(1, "passes over the training split (when max_steps is -1)")
    lr: float = knob(5e-7, "peak learning rate of the policy")
    weight_decay: float = knob(0.0, "AdamW weight decay of the policy")
    warmup_ratio: float = knob(0.1, "fraction of the steps with linear lr warmup")
    schedule: str = knob("cosine", "cosine | linear | constant")
    max_grad_norm: float = knob(1.0, "gradient clipping (global norm)")
    layout: str = knob(
        "auto", "how a micro-batch's pairs are laid out: packed (padding-free rows; flash-attn's varlen kernel, "
        "else a 4-D block mask) | padded (one row per sequence, a 2-D padding mask) | shared (one row per pair, "
        "prompt + chosen + rejected: the prompt computed once, P of 2P+C+R tokens saved; a dense 4-D mask, so "
        "sdpa/eager only) | auto: packed under flash-attn, shared under sdpa/eager, padded for a remote-code model "
        "(midpo cannot tell that its attention takes a 4-D mask); the choice and its reason are logged and "
        "recorded in <run_dir>/config.yaml. train.packing / train.share_prompt, when set, choose it as before "
        "(a contradiction is refused)")
    packing: bool | None = knob(
        None, "older spelling of train.layout: true = packed, false = padded (with share_prompt unset or false); "
        "unset = train.layout decides")
    share_prompt: bool | None = knob(
        None, "older spelling of train.layout=shared (true); takes precedence over `packing`; false with packing "
        "unset = packed, as it was; unset = train.layout decides")
    sequence_parallel: int = knob(
        1, "Ulysses sequence parallelism: ranks form groups of this many (consecutive ranks), each group trains on "
        "one micro-batch split along the sequence (attention on all positions for a slice of the heads, by "
        "all-to-all); data parallel and ZeRO across groups; 1 = off (docs/sequence_parallel.md)")
    compile: bool = knob(
        False, "torch.compile the policy's decoder stack (Inductor; fused norms/activations/rotary around the "
        "GEMMs). ZeRO stage <= 2 only (ZeRO-3's per-module gather hooks do not trace). The first steps pay the "
        "compile (~20-60 s on CPU: one graph per grad mode, one more when the sequence length first changes). Not "
        "turned on by `auto` (docs/plan.md: every launch pays that, for a per-step gain that varies run to run).")
    eval_every: int = knob(0, "evaluate every N steps; 0 = only at the end")
    save_every: int = knob(0, "checkpoint every N steps; 0 = only at the end")
    keep_last: int = knob(2, "checkpoints kept (older ones are removed once a new one is complete)")
    max_bad_steps: int = knob(5, "consecutive non-finite steps before the run stops")
    peak_flops: float = knob(0.0, "per device, for MFU; 0 = measure a GEMM at start")
    online_reference: bool = knob(False, "run pi_ref beside the policy instead of reading the cache")
    seed: int = knob(
        0, "seed of the training data order and of the training processes' random generators (python, numpy, torch)")
    log_every: int = knob(1, "steps between metric reductions/log lines (TensorBoard, progress bar, jsonl)")
    probe_rows: int = knob(8, "cached rows re-scored at start when the policy IS the reference (0 = off)")
    probe_tolerance: float = knob(
        0.0, "max mean |policy - cached| per-token log-prob; 0 = auto (fp32 1e-4, bf16/fp16 2e-2)")
    export_at_end: bool = knob(True, "write <run_dir>/export (HF folder) when training finishes")
    record_rows: bool = knob(True, "append each step's row ids (all ranks) to <run_dir>/logs/consumed_rows.jsonl")
    head_chunk_tokens: int = knob(
        1024, "response positions per output-head call: bounds the fp32 logits alive at once (chunks x vocab); the "
        "head runs in the same number of chunks on every rank (ZeRO-3 gathers it per call)")
    report_to: list[str] = knob(
        help="metric sinks, any of tensorboard | jsonl (<run_dir>/logs/metrics.jsonl) | wandb | mlflow (pip install "
        "midpo[wandb] / midpo[mlflow]); the same names everywhere (train/<metric>, eval/<metric>), rank 0 only, the "
        "resolved config logged as run parameters. wandb honours WANDB_MODE (offline: no network), WANDB_PROJECT "
        "(default midpo); mlflow logs to MLFLOW_TRACKING_URI, default the file store <run_dir>/mlruns",
        factory=lambda: ["tensorboard"])
    router_aux_loss_coef: float | None = knob(
        None, "mixture-of-experts policies (Mixtral, Qwen2-MoE): weight of the routers' load-balancing loss added to "
        "the policy's loss (logged as router/aux_loss); None = the model config's own router_aux_loss_coef; 0 = off. "
        "Refused for a dense model")
    profile_steps: list[int] = knob(
        help="a torch.profiler window over optimizer steps [A, B] (1-based, inclusive), e.g. [3, 5]: per-rank "
        "operator tables and Chrome traces in <run_dir>/logs/profile_rank<r>.{txt,json}; [] = off (the profiler "
        "slows those steps)", factory=list)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"train.schedule must be cosine, linear or constant, got {self.schedule!r}")
        self.layout = resolve_layout_spelling(self.layout, self.packing, self.share_prompt)
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1")
        if self.micro_batch_tokens < 0:
            raise ConfigError(f"train.micro_batch_tokens must be >= 0 (0 = off), got {self.micro_batch_tokens}")
        if self.log_every < 1:
            raise ConfigError("train.log_every must be >= 1")
        if self.head_chunk_tokens < 1:
            raise ConfigError(f"train.head_chunk_tokens must be >= 1, got {self.head_chunk_tokens}")
        if self.sequence_parallel < 1:
            raise ConfigError(f"train.sequence_parallel must be >= 1, got {self.sequence_parallel}")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ConfigError(f"train.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if self.profile_steps:
            check_step_window(self.profile_steps, "train.profile_steps")
        bad = sorted(set(self.report_to) - set(REPORT_TO))
        if bad:
            raise ConfigError(f"train.report_to: unknown {bad}; choose from {', '.join(REPORT_TO)}")


REPORT_TO = ("tensorboard", "jsonl", "wandb", "mlflow")
TRAIN_LAYOUTS = ("auto", "packed", "padded", "shared")


def resolve_layout_spelling(layout: str, packing: bool | None, share_prompt: bool | None) -> str:
    """train.layout as the recipe states it: the older booleans, when either is set, name a layout as they always
    did (share_prompt first, then packing, whose old default was true); train.layout must then be auto or the same
    one. Returns the layout (auto when nothing is stated)."""
    if layout not in TRAIN_LAYOUTS:
        raise ConfigError(f"train.layout must be one of {', '.join(TRAIN_LAYOUTS)}, got {layout!r}")
    if packing is None and share_prompt is None:
        return layout
    legacy = "shared" if share_prompt else "padded" if packing is False else "packed"
    if layout not in ("auto", legacy):
        said = ", ".join(f"train.{k}={str(v).lower()}" for k, v in (("packing", packing), ("share_prompt", share_prompt))
                         if v is not None)
        raise ConfigError(f"train.layout={layout} contradicts {said} (which means layout {legacy}): set only "
                          f"train.layout (the older booleans are kept for existing recipes)")
    return legacy


@dataclass
class PriorNetConfig:
    """The learnable token-level prior network of MI-DPO proper."""

    objective: str = knob(
        "marginal", "marginal (KL toward the policy's marginal over responses) | joint (the MI-DPO loss "
        "w.r.t. the prior + anchor_weight * anchor)")
    init: str = knob("reference", "reference | <HF folder>")
    num_layers: int = knob(0, "0 = all of the init model's layers, k = its first k layers")
    condition_on_prompt: bool = knob(False, "the prior sees prompt + response; off: [BOS] + response only")
    lr: float = knob(1e-5, "learning rate of the prior network")
    update_every: int = knob(
        1, "Update the prior on every k-th policy step. A speed knob: the other steps only run the prior's "
        "no-grad forward for log zeta, and (marginal) the policy forward skips its logits. The prior then "
        "trails the policy by up to k steps (fewer alternating steps toward the marginal); "
        "bench/midpo_vs_dpo.py --update-every.")
    warmup_steps: int = knob(0, "linear lr warmup over the prior's first updates")
    anchor: str = knob("kl_init", "joint objective's anchor: kl_init | nll")
    anchor_weight: float = knob(1.0, "weight of the joint objective's anchor term")
    zero_stage: int = knob(3, "ZeRO stage of the prior's own DeepSpeed engine")
    start_step: int = knob(0, "policy steps before the prior's first update (it stays at its init until then)")
    bos_token_id: int | None = knob(
        None, "context token of the unconditioned prior; None = the init model's bos_token_id")
    chunk_size: int = knob(1024, "response tokens per full-vocab chunk (prior logits, KL)")

    def __post_init__(self) -> None:
        if self.objective not in ("marginal", "joint"):
            raise ConfigError(f"prior_net.objective must be marginal or joint, got {self.objective!r}")
        if self.anchor not in ("kl_init", "nll"):
            raise ConfigError(f"prior_net.anchor must be kl_init or nll, got {self.anchor!r}")
        if self.update_every < 1 or self.warmup_steps < 0 or self.start_step < 0 or self.num_layers < 0:
            raise ConfigError("prior_net: update_every >= 1, warmup_steps >= 0, start_step >= 0, num_layers >= 0")
        if self.anchor_weight < 0 or not self.lr > 0:
            raise ConfigError("prior_net: anchor_weight >= 0 and lr > 0")


@dataclass
class OnPolicyConfig:
    """On-policy pairs (`midpo sample`): the start model answers the training prompts, the task checker
    labels the answers, and its wrong answers become the rejected responses. Needs a verifiable task
    (the embedded default); `midpo run` uses it when `enabled`."""

    enabled: bool = knob(False, "`midpo run` samples on-policy pairs and trains on them")
    prompts: str | None = knob(
        None, "JSONL of prompt + task record; None = <run_dir>/synth/onpolicy_prompts.jsonl")
    samples: int = knob(4, "answers per prompt")
    temperature: float = knob(1.0, "sampling temperature of the answers")
    pairs_per_prompt: int = knob(1, "distinct wrong answers kept per prompt (most frequent first)")
    chosen: str = knob(
        "sample", "sample (a correct sample; prompts without one skipped) | sample_or_gold | gold (the solution)")
    max_prompts: int = knob(0, "prompts to sample from; 0 = every prompt of the input file")
    batch_size: int = knob(64, "prompts per generate call")

    def __post_init__(self) -> None:
        if self.chosen not in ("sample", "sample_or_gold", "gold"):
            raise ConfigError(f"onpolicy.chosen must be sample, sample_or_gold or gold, got {self.chosen!r}")
        if self.samples < 1 or self.pairs_per_prompt < 1:
            raise ConfigError("onpolicy.samples and onpolicy.pairs_per_prompt must be >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"onpolicy.temperature must be > 0, got {self.temperature}")


@dataclass
class ExportConfig:
    """The exported Hugging Face folder (`midpo export`, and the end of `midpo train`)."""

    merge_lora: bool = knob(
        False, "with model.lora: also write <export>/merged, a full HF folder with the adapters merged in (W + "
        "alpha/r * B @ A); the adapter folder (PEFT format) is <export> itself")
    max_shard_size: str = knob(
        "4GB", "largest safetensors file of the export (e.g. 5GB, 500MB, or bytes); a bigger model is written as "
        "model-0000k-of-0000n.safetensors with model.safetensors.index.json, as transformers saves it")

    def __post_init__(self) -> None:
        parse_size(self.max_shard_size, "export.max_shard_size")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int, key: str) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (decimal units as transformers reads them)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"{key} must be a positive size such as 5GB, 500MB or a number of bytes; got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


@dataclass
class IterateConfig:
    """`midpo iterate`: rounds of on-policy preference training (DICE; iterative DPO). Per round the current policy
    answers prompts `samples` times, a labeller scores the answers, best vs worst become pairs (mixed with offline
    pairs at `replay_fraction`), then prep, a reference cache from the previous round's policy, train, export; the
    export is the next round's policy and reference."""

    rounds: int = knob(3, "rounds to run (`midpo iterate --rounds N` overrides it)")
    start: str = knob(
        "policy", "round 1's policy: policy (the run's initial policy: <run_dir>/sft after SFT) | export (the run's "
        "own preference-trained <run_dir>/export, built by `midpo run`'s stages when missing; DICE starts from a DPO "
        "model, whose reference is the run's reference)")
    labeller: str = knob(
        "implicit_reward", "implicit_reward (DICE: beta * (log pi_t(y|x) - log pi_{t-1}(y|x)), summed over response "
        "tokens, EOS included) | checker (the embedded task's checker: 1 right, 0 wrong) | reward_model (a local HF "
        "sequence-classification folder, iterate.reward_model: its first logit)")
    reward_model: str | None = knob(None, "HF sequence-classification folder of the reward_model labeller")
    prompts: str | None = knob(
        None, "JSONL of prompts (a `prompt` field; the checker needs the task record too); None = onpolicy.prompts, "
        "else <run_dir>/synth/onpolicy_prompts.jsonl")
    prompts_per_round: int = knob(
        0, "prompts per round: round k takes the k-th block of this many (wrapping around the file); 0 = all, every "
        "round")
    samples: int = knob(8, "answers generated per prompt (best vs worst of them make the pair)")
    temperature: float = knob(1.0, "sampling temperature")
    max_new_tokens: int = knob(64, "longest answer, in tokens")
    batch_size: int = knob(64, "prompts per generate call (each repeated `samples` times)")
    chunk_prompts: int = knob(64, "prompts per chunk of the generation stage: its resume granularity")
    beta: float | None = knob(None, "beta of the implicit reward; None = loss.beta, else 0.1")
    length_alpha: float = knob(
        0.0, "DICE's length regularization: pairs are selected by score - length_alpha * |y| (|y| in tokens, EOS "
        "included); applied to every labeller's score")
    min_margin: float = knob(
        0.0, "a prompt makes a pair only when best minus worst (length-regularized) exceeds this; equal ones (ties) "
        "are always dropped")
    replay_fraction: float = knob(
        0.0, "experience replay: the fraction of each round's pairs drawn from the offline pairs, in [0, 1)")
    replay_inputs: list[str] = knob(
        help="offline pairs (JSONL) for replay; empty = the pairs the run itself trained on (<run_dir>/onpolicy/pairs"
        ".jsonl with onpolicy.enabled, else data.inputs, else the embedded default's pairs)", factory=list)
    eval_prompts: int = knob(
        0, "greedy task accuracy of every round's policy on this many held-out prompts (<run_dir>/synth/eval_prompts"
        ".jsonl), paired against round 0; 0 = off")
    implicit_reference: str | None = knob(
        None, "set by `midpo iterate` in a round's own recipe: the model the implicit reward divides by (pi_{t-1})")

    def __post_init__(self) -> None:
        if self.start not in ("policy", "export"):
            raise ConfigError(f"iterate.start must be policy or export, got {self.start!r}")
        if self.labeller not in ("implicit_reward", "checker", "reward_model"):
            raise ConfigError(f"iterate.labeller must be implicit_reward, checker or reward_model, got {self.labeller!r}")
        if self.labeller == "reward_model" and not self.reward_model:
            raise ConfigError("iterate.labeller=reward_model needs iterate.reward_model (a local HF folder)")
        if self.rounds < 0 or self.samples < 2 or self.prompts_per_round < 0 or self.eval_prompts < 0:
            raise ConfigError("iterate: rounds >= 0, samples >= 2, prompts_per_round >= 0, eval_prompts >= 0")
        if self.batch_size < 1 or self.chunk_prompts < 1 or self.max_new_tokens < 1:
            raise ConfigError("iterate: batch_size, chunk_prompts and max_new_tokens must be >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"iterate.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ConfigError(f"iterate.replay_fraction must be in [0, 1), got {self.replay_fraction}")
        if self.min_margin < 0 or self.length_alpha < 0:
            raise ConfigError("iterate: min_margin >= 0 and length_alpha >= 0")


@dataclass
class Config:
    """A whole run: every stage reads this one resolved config and writes only inside run_dir."""

    run_dir: str = knob("runs/tiny", "the run folder: every stage's inputs and outputs live under it")
    seed: int = knob(0, "seed of the SFT warm start's data order, on-policy sampling and the sampled eval")
    synth: SynthConfig = section(SynthConfig)
    data: DataConfig = section(DataConfig)
    model: ModelConfig = section(ModelConfig)
    sft: SftConfig = section(SftConfig)
    onpolicy: OnPolicyConfig = section(OnPolicyConfig)
    loss: LossConfig = section(LossConfig)
    ref: RefConfig = section(RefConfig)
    train: TrainConfig = section(TrainConfig)
    prior_net: PriorNetConfig = section(PriorNetConfig)
    export: ExportConfig = section(ExportConfig)
    iterate: IterateConfig = section(IterateConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)


# Keys a resumed run may change (`midpo train` resuming from checkpoints/latest); every other key must equal the
# checkpoint's config.yaml, or `midpo train --force` starts the run over. One line each: why a change is safe.
RESUME_MUTABLE: dict[str, str] = {
    "run_dir": "where the run folder lives; moving it changes nothing it holds",
    "train.max_steps": "the run's length: it continues from its step; the lr schedule is laid over the new length",
    "train.epochs": "the run's length, as train.max_steps (it sets the length when max_steps is -1)",
    "train.micro_batch_size": "accepted only when micro x accum x processes (the global batch) stays the same",
    "train.grad_accum": "accepted only when micro x accum x processes (the global batch) stays the same",
    "train.eval_every": "when to evaluate: read-only passes",
    "train.save_every": "when to checkpoint",
    "train.keep_last": "how many checkpoints to keep",
    "train.log_every": "how often metrics are reduced and logged",
    "train.record_rows": "whether each step's row ids are logged",
    "train.export_at_end": "whether the end writes <run_dir>/export",
    "train.probe_rows": "the start-of-run probe runs on a fresh start only",
    "train.probe_tolerance": "the start-of-run probe runs on a fresh start only",
    "train.peak_flops": "the MFU denominator only",
    "train.max_bad_steps": "when to give up on non-finite steps; no effect on a finite step",
    "train.head_chunk_tokens": "how many response positions go through the output head at once: memory against "
                               "speed, the same math (rounding aside)",
    "train.profile_steps": "a profiler window: observes the steps, changes none",
    "train.packing": "an older spelling of train.layout, which is compared itself",
    "train.share_prompt": "an older spelling of train.layout, which is compared itself",
    "model.gradient_checkpointing": "recomputes activations instead of keeping them: memory for time, same math",
    "data.num_proc": "stage 1 worker processes; training checks the data by fingerprint",
    "data.shard_rows": "stage 1 file layout; training checks the data by fingerprint",
    "ref.micro_batch_tokens": "stage 2 batching; training checks the cache by fingerprint",
    "ref.rows_per_shard": "stage 2 resume granularity; training checks the cache by fingerprint",
    "ref.zero3": "how stage 2 holds the reference; training checks the cache by fingerprint",
    "sft.num_threads": "threads of the single-process stages",
    "export.max_shard_size": "how the exported weights are split into files",
}


def flat_items(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`section.key` -> value for every leaf of a Config (dicts such as loss.options flattened too)."""
    tree = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):  # an empty mapping has no leaves: {} -> {"c": 1} reads as `loss.options.c: None -> 1`
            out.update(flat_items(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every leaf that differs (None where a side lacks the key), key order."""
    a, b = flat_items(old), flat_items(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ---------------------------------------------------------------------------------------------
# help text and rendering (`midpo config show`)

HELP_WIDTH = 100  # columns of a rendered help comment


def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text of a config dataclass (its `knob`/`section` metadata)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _flow(value: Any) -> str:
    """One value as YAML in flow style (`[a, b]`, `{}`, `null`, quoted where YAML would misread it)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True, sort_keys=False)
    text = text.rstrip("\n")
    return text[: -len("\n...")] if text.endswith("\n...") else text  # a bare scalar's document-end marker


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), HELP_WIDTH - len(indent) - 2)]


def _render_fields(obj: Any, indent: str) -> list[str]:
    """`key: value` lines of one dataclass level, each key preceded by its help (and its default when the value
    differs from it); a section's docstring heads it."""
    lines: list[str] = []
    defaults = type(obj)()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines += ["", *_comment(f"== {f.name}: {f.metadata.get('help', '')}", indent), f"{indent}{f.name}:"]
            lines += _render_fields(value, indent + "  ")
            continue
        text = f.metadata.get("help", "")
        default = getattr(defaults, f.name)
        if value != default:
            text += f" (default: {_flow(default)})"
        lines += [*_comment(text, indent), f"{indent}{f.name}: {_flow(value)}"]
    return lines


def render_config(cfg: Config) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal Config, with each key's help as a
    comment above it and each section's docstring as its header."""
    header = _comment(inspect.cleandoc(type(cfg).__doc__ or ""), "")
    return "\n".join([*header, "", *_render_fields(cfg, "")]) + "\n"


def render_overrides(cfg: Config) -> list[str]:
    """One `key.sub=value` line per key (override syntax: any of them can be passed back on a command line)."""
    out: list[str] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}={_flow(value)}")

    walk(cfg, "")
    return out


# ---------------------------------------------------------------------------------------------
# building from plain data


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type; errors name the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{where or 'config'}: {e}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-5` -> (["train", "lr"], 1e-5). The value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def _apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
        node = nxt
    node[path[-1]] = value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def find_recipe(path: str | Path) -> Path:
    """A recipe file: `path` itself, else a name in the shipped recipes (with or without `.yaml`)."""
    p = Path(path)
    if not p.exists() and (RECIPES_DIR / p).exists():
        p = RECIPES_DIR / p
    if not p.exists() and (RECIPES_DIR / f"{p}.yaml").exists():
        p = RECIPES_DIR / f"{p}.yaml"
    if not p.exists():
        raise ConfigError(f"recipe {path} not found (also looked in {RECIPES_DIR})")
    return p


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < YAML at `path` < overrides (`key.sub=value`)."""
    tree: dict = {}
    if path is not None:
        p = find_recipe(path)
        with open(p, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a recipe must be a mapping at the top level")
        tree = {k: v for k, v in loaded.items() if k not in RECORD_SECTIONS}
    for ov in overrides:
        keys, value = parse_override(ov)
        _apply_override(tree, keys, value)
    try:
        return _build(Config, tree)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


# Sections midpo writes into a run's config.yaml beside the settings: derived records, never settings
# (`layout`: the run's resolved paths, midpo.runtime.layout; `auto`: what train.layout / train.ds_config `auto` chose
# and why, midpo.runtime.planning.resolve_auto: the settings hold the chosen values). load_config skips them.
RECORD_SECTIONS = ("layout", "auto")


def dump_config(cfg: Config, records: dict | None = None) -> str:
    """The resolved config as YAML text (`load_config` reads it back to an equal Config), with `records` (sections
    of RECORD_SECTIONS) after the settings; runtime.files writes it."""
    unknown = sorted(set(records or {}) - set(RECORD_SECTIONS))
    if unknown:
        raise ValueError(f"not record sections: {unknown}")
    return yaml.safe_dump({**to_dict(cfg), **(records or {})}, sort_keys=False)


def config_from_dict(data: dict) -> Config:
    return _build(Config, data)


# `section.key=value`, or one of the top-level keys (`run_dir=...`, `seed=...`).
_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+|run_dir|seed)=")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull `key.sub=value` tokens out of argv (they may appear anywhere after the subcommand)."""
    rest, overrides = [], []
    for tok in argv:
        (overrides if _OVERRIDE.match(tok) else rest).append(tok)
    return rest, overrides


def check_step_window(window: list[int], where: str) -> tuple[int, int]:
    """[A, B] (1-based optimizer steps, inclusive) -> (A, B); errors name `where`."""
    if len(window) != 2 or not 1 <= window[0] <= window[1]:
        raise ConfigError(f"{where} must be [A, B] with 1 <= A <= B (1-based steps, inclusive), got {window!r}")
    return int(window[0]), int(window[1])
