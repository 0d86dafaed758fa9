"""DeepSpeed set-up of the policy engine, and the engine hook seam for the learnable prior.

`resolve_ds_config` is the ONE place that turns a ds_configs/*.json template plus the recipe into
the dict DeepSpeed receives: every "auto" field is filled here, explicit values that contradict the
recipe are refused, and train_batch_size == micro x accumulation x world size is enforced.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from midpo.config import DS_CONFIGS_DIR, Config, ConfigError
from midpo.runtime.models import resolve_dtype

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# DeepSpeed config


MIN_BUCKET = 2 ** 24  # elements (64 MiB of fp32): floor of the "auto" ZeRO-3 bucket sizes


def ds_config_path(name: str) -> Path:
    """`auto` = zero3_bf16 on CUDA, zero3_cpu_fp32 on CPU; a bare name is looked up in ds_configs/."""
    if name == "auto":
        name = "zero3_bf16" if torch.cuda.is_available() else "zero3_cpu_fp32"
    p = Path(name)
    for cand in (p, DS_CONFIGS_DIR / p, DS_CONFIGS_DIR / f"{name}.json"):
        if cand.is_file():
            return cand
    shipped = ", ".join(sorted(x.stem for x in DS_CONFIGS_DIR.glob("*.json")))
    raise ConfigError(f"train.ds_config {name!r} not found; shipped configs: {shipped}")


def _fill(node: dict, key: str, value: Any, where: str) -> None:
    """Set an "auto" (or missing) field; refuse an explicit value that differs."""
    cur = node.get(key, "auto")
    if cur == "auto":
        node[key] = value
    elif cur != value and not (isinstance(cur, (int, float)) and isinstance(value, (int, float))
                               and float(cur) == float(value)):
        raise ConfigError(f"ds_config {where}{key}={cur!r} contradicts the recipe ({value!r}); "
                          f"set it to \"auto\" or change the recipe")


def resolve_ds_config(cfg: Config, world_size: int, hidden_size: int, stage: int | None = None) -> dict:
    """The DeepSpeed config dict for the policy engine, every "auto" field filled from `cfg`. ``stage``
    overrides the JSON's ZeRO stage (the prior network's prior_net.zero_stage) before the stage's own
    bucket knobs are filled."""
    tc = cfg.train
    ds = copy.deepcopy(json.loads(ds_config_path(tc.ds_config).read_text()))
    _fill(ds, "train_micro_batch_size_per_gpu", tc.micro_batch_size, "")
    _fill(ds, "gradient_accumulation_steps", tc.grad_accum, "")
    _fill(ds, "train_batch_size", tc.micro_batch_size * tc.grad_accum * world_size, "")
    if ds["train_batch_size"] != tc.micro_batch_size * tc.grad_accum * world_size:  # pragma: no cover - _fill checks
        raise ConfigError("train_batch_size must equal micro x accumulation x world size")
    _fill(ds, "gradient_clipping", float(tc.max_grad_norm), "")

    dtype = resolve_dtype(cfg.model.dtype)
    for key, want in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = ds.setdefault(key, {"enabled": False})
        if section.get("enabled") == "auto":
            section["enabled"] = want
        if bool(section.get("enabled")) != want:
            raise ConfigError(
                f"ds_config {key}.enabled={section.get('enabled')} but model.dtype resolves to {dtype}; "
                f"use a ds_config that matches (zero3_bf16 for bf16, zero3_cpu_fp32 for fp32) or set model.dtype")

    zo = ds.setdefault("zero_optimization", {})
    if stage is not None:
        zo["stage"] = int(stage)
    stage = int(zo.get("stage", 3))
    if stage not in (0, 2, 3):
        log.warning("ds_config uses ZeRO stage %s; midpo is tested with stages 0, 2 and 3", stage)
    if tc.compile and stage == 3:
        raise ConfigError(f"train.compile needs ZeRO stage <= 2 ({tc.ds_config} is stage 3: its per-module "
                          "parameter gathers do not trace under torch.compile); use ds_config zero2_cpu_fp32 or "
                          "zero2_bf16 (one device, or a model whose optimizer state is what needs sharding), or "
                          "train.compile=false")
    # HF's sizing rule (hidden^2), floored: for small hidden sizes hidden^2 makes dozens of tiny
    # reduce-scatters per step, and each costs a fixed launch/latency overhead.
    # These are tuning knobs, not recipe facts: an explicit value in the JSON wins.
    bucket = max(hidden_size * hidden_size, MIN_BUCKET)
    stage3 = (("stage3_prefetch_bucket_size", int(0.9 * bucket)), ("stage3_param_persistence_threshold",
                                                                    10 * hidden_size))
    stage2 = (("allgather_bucket_size", bucket),)
    # the stage's own knobs; stage 0 has none (DeepSpeed's own all-reduce buckets)
    own = dict((("reduce_bucket_size", bucket), *{2: stage2, 3: stage3}[stage])) if stage in (2, 3) else {}
    for key, value in own.items():
        if zo.get(key, "auto") == "auto":
            zo[key] = value
    for key, _ in (*stage2, *stage3):  # a JSON of another stage under a `stage` override: its "auto" knobs go
        if key not in own and zo.get(key) == "auto":
            del zo[key]

    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        _fill(params, "lr", float(tc.lr), "optimizer.params.")
        _fill(params, "weight_decay", float(tc.weight_decay), "optimizer.params.")
        if not torch.cuda.is_available() and opt.get("type", "").lower() in ("adam", "adamw") \
                and not zo.get("offload_optimizer"):
            params.setdefault("torch_adam", True)  # FusedAdam is CUDA-only; torch's AdamW needs no JIT build
            # torch's fused CPU kernel: one pass over the flat ZeRO partition (2 ms vs 27 ms per step for the
            # bench's 4.7M parameters on 2 threads; the default single-tensor path runs ~10 separate ops)
            params.setdefault("fused", True)
    if "scheduler" in ds:
        raise ConfigError("ds_config must not define a scheduler: midpo sets it from train.schedule/warmup_ratio")

    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"ds_config fields left as \"auto\" that midpo cannot fill: {', '.join(leftover)}")
    return ds


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]


# ---------------------------------------------------------------------------------------------
# Hook seam for the learnable prior (MI-DPO proper)


class TrainHook(Protocol):
    """Called by the training loop on EVERY rank, in the same order and the same number of times
    (a hook may run collectives, e.g. its own ZeRO-3 engine)."""

    def policy_logits_due(self, step: int) -> bool:
        """Policy step ``step`` (1-based) must hand before_loss the policy's flat detached logits
        (``return_flat_logits``). A function of the step only: every rank must answer alike."""
        ...

    def before_loss(self, batch: Any, policy_out: Any) -> dict[str, Any]:
        """Extra inputs for the prior (e.g. prior per-token log-probs), merged into the loss inputs."""
        ...

    def after_step(self, step: int, batch: Any, policy_out: Any) -> dict[str, float]:
        """After the policy's optimizer step (e.g. update the prior); returns metrics to log."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def save_checkpoint(self, ckpt_dir: Path) -> None: ...

    def load_checkpoint(self, ckpt_dir: Path) -> None: ...


class NoOpHook:
    """The default hook: fixed priors need nothing beyond the batch and the cache."""

    def policy_logits_due(self, step) -> bool:
        return False

    def before_loss(self, batch, policy_out) -> dict[str, Any]:
        return {}

    def after_step(self, step, batch, policy_out) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_checkpoint(self, ckpt_dir: Path) -> None:
        pass

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Policy engine


class PolicyLogps(torch.nn.Module):
    """The HF model behind one `forward(batch) -> ResponseLogps`, so DeepSpeed's engine forward (and
    with it ZeRO-3's per-forward parameter bookkeeping, which hangs off the root module's hooks) runs
    around exactly the log-prob code the reference stage uses. Checkpoint keys gain a `model.` prefix."""

    def __init__(self, model: torch.nn.Module, prior: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        # A prior with trainable parameters (SparsePO's mask network) rides in the SAME engine: one ZeRO-3
        # optimizer, one lr schedule, one checkpoint (keys `prior.*`). It is called by the loss, outside
        # forward(); ZeRO-3's per-submodule hooks gather its parameters there as for any submodule.
        if prior is not None:
            self.prior = prior

    @property
    def config(self):
        return self.model.config

    def forward(self, batch, return_logits: bool = False, return_hidden: bool = False,
                return_flat_logits: bool = False) -> tuple:
        """A tuple of tensors (ZeRO-3's hooks find tensors in tuples, not in dataclasses); see `policy_logps`.
        Also the online reference's forward (`OnlineReference`): the same chunk equalization serves both."""
        import dataclasses

        from midpo.core.logprobs import response_logps

        n_local = int(batch.target_index.numel())
        base = int(os.environ.get(CHUNK_ENV, LOGIT_CHUNK))  # tests force many uneven chunks
        chunk = equal_chunk_size(n_local, _all_max(n_local), base)
        out = response_logps(self.model, batch, return_logits=return_logits, return_hidden=return_hidden,
                             return_flat_logits=return_flat_logits, chunk_size=chunk)
        return tuple(getattr(out, f.name) for f in dataclasses.fields(out))


LOGIT_CHUNK = 1024  # response positions per output-head call (bounds the fp32 logits alive at once)
CHUNK_ENV = "MIDPO_LOGIT_CHUNK"


def equal_chunk_size(n_local: int, n_max: int, base: int) -> int:
    """A chunk size that splits `n_local` response tokens into exactly K = ceil(n_max / base) chunks.

    Under ZeRO-3 every output-head call gathers the head's weights (and, in backward, reduce-scatters its
    gradient): ranks with different chunk counts issue different collectives and hang (TRL PR #6698). So
    all ranks use the chunk count of the largest micro-batch; the chunk SIZE varies instead."""
    k = max(1, math.ceil(n_max / base))
    if k == 1:
        return max(1, n_local)
    lo, hi = math.ceil(n_local / k), (n_local - 1) // (k - 1)  # sizes c with (k-1)*c < n_local <= k*c
    if n_local < k or lo > hi:
        raise RuntimeError(f"cannot split {n_local} response tokens into {k} chunks (largest rank has {n_max}); "
                           "micro-batches are too uneven across ranks: raise train.micro_batch_size")
    return lo


def _all_max(value: int) -> int:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.long, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def policy_logps(engine, batch, return_logits: bool = False, return_flat_logits: bool = False):
    """engine(batch) -> midpo.core.logprobs.ResponseLogps (per-token policy log-probs, with grad in training).
    return_logits / return_flat_logits: see midpo.core.logprobs.response_logps. Every rank must pass the same
    flags (they change the number of output-head calls, each a ZeRO-3 gather)."""
    from midpo.core.logprobs import ResponseLogps

    return ResponseLogps(*engine(batch, return_logits=return_logits, return_flat_logits=return_flat_logits))


def build_policy_engine(model: torch.nn.Module, ds_config: dict, *, total_steps: int, warmup_ratio: float,
                        schedule: str):
    """A ZeRO-3 DeepSpeed engine around `model` with midpo's lr schedule (stepped by DeepSpeed)."""
    import deepspeed

    from midpo.train.schedule import make_scheduler

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: make_scheduler(opt, total_steps, warmup_ratio, schedule),
    )
    return engine


# ---------------------------------------------------------------------------------------------
# Online reference (train.online_reference=true)


def inference_ds_config(ds_config: dict) -> dict:
    """A resolved engine config (resolve_ds_config) minus the optimizer: a frozen engine of the same dtype,
    ZeRO-3 stage and bucket sizes. Derived, never re-resolved, so there is one place that fills configs.
    Under a ZeRO-1/2 policy the frozen copy gets stage 0: those stages partition optimizer state and
    gradients, which a model without an optimizer does not have (DeepSpeed refuses them without one)."""
    out = {k: v for k, v in copy.deepcopy(ds_config).items() if k != "optimizer"}
    zo = out.get("zero_optimization") or {}
    if int(zo.get("stage", 0)) in (1, 2):
        out["zero_optimization"] = {"stage": 0}
    return out


class OnlineReference:
    """The frozen reference on its own ZeRO-3 inference engine (no optimizer), run beside the policy on the
    same PairBatch: per-token log-probs and, when a prior needs them, full-vocab logits and per-layer
    hidden states at response positions.

    Collectives: the engine wraps `PolicyLogps`, so it uses the same equalized head-chunk count as the
    policy (`equal_chunk_size` over all ranks) and the same single full-logits head call; with
    per-rank-varying chunk counts ZeRO-3's head gathers would hang. Every rank calls it once per
    micro-batch (train, eval and the eval-tail dummy batches alike)."""

    def __init__(self, engine, *, return_logits: bool, return_hidden: bool):
        self.engine = engine
        self.return_logits, self.return_hidden = bool(return_logits), bool(return_hidden)

    def __call__(self, batch):
        from midpo.core.logprobs import ResponseLogps

        with torch.no_grad():
            out = self.engine(batch, return_logits=self.return_logits, return_hidden=self.return_hidden)
        return ResponseLogps(*out)


def build_reference_engine(model: torch.nn.Module, ds_config: dict, *, return_logits: bool = False,
                           return_hidden: bool = False) -> OnlineReference:
    """COLLECTIVE (deepspeed.initialize): `model` (frozen, eval) on a ZeRO-3 inference engine whose config
    is the policy's resolved one without the optimizer."""
    import deepspeed

    model.requires_grad_(False)
    model.eval()
    engine, _, _, _ = deepspeed.initialize(model=PolicyLogps(model), config=inference_ds_config(ds_config))
    engine.eval()
    return OnlineReference(engine, return_logits=return_logits, return_hidden=return_hidden)
