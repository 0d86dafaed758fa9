"""DeepSpeed engines behind one step protocol, for the policy and the MI-DPO prior network alike.

    engine = Engine.build(module, ds_config, lr_scheduler=...)     # COLLECTIVE (deepspeed.initialize)
    out = engine(batch, ...)                                       # forward through DeepSpeed
    engine.backward(loss)           # every micro-step whose loss all ranks found finite
    norm = engine.step()            # at the accumulation boundary: clip, optimizer, lr schedule; the grad norm
    engine.skip()                   # instead, when some micro-step was not finite on some rank

DeepSpeed's accumulation protocol (its engine.step() after EVERY backward, the optimizer running only at the
boundary) lives here and nowhere else: the loop says backward / step / skip. A skipped step drops the
accumulated gradients and moves DeepSpeed's micro-step counter to the next boundary without an optimizer or
lr-schedule step (as DeepSpeed's own fp16-overflow path does).

Also here: `PolicyLogps`, the module every engine wraps so that its forward is the log-prob code the reference
stage uses (`core.logprobs.response_logps`), with the output head applied in the same number of chunks on every
rank (`equal_chunk_size`); and the frozen online reference (`OnlineReference`).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from midpo.runtime import dist as pdist
from midpo.runtime.ds_config import inference_ds_config

log = logging.getLogger(__name__)

HEAD_CHUNK_TOKENS = 1024  # default response positions per output-head call (train.head_chunk_tokens)


class Engine:
    """One DeepSpeed engine with the step protocol above."""

    def __init__(self, ds_engine):
        self.ds = ds_engine
        self.accum = int(ds_engine.gradient_accumulation_steps())
        self._backwards = 0  # backward calls in the current optimizer step
        self._variable = False  # set_accumulation: the boundary is set by hand, the loss comes scaled
        # DeepSpeed's stage-0 fp32 path clips without keeping the norm: take it from the (all-reduced) gradients
        self._norm_from_grads = (ds_engine.zero_optimization_stage() == 0
                                 and not (ds_engine.bfloat16_enabled() or ds_engine.fp16_enabled()))

    @classmethod
    def build(cls, module: torch.nn.Module, ds_config: dict, *, lr_scheduler=None) -> Engine:
        """COLLECTIVE: `module` on a DeepSpeed engine that optimizes its trainable parameters; `lr_scheduler`:
        optimizer -> scheduler (stepped by DeepSpeed at each boundary)."""
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config, lr_scheduler=lr_scheduler,
                                               model_parameters=[p for p in module.parameters() if p.requires_grad])
        return cls(engine)

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def eval(self) -> None:
        self.ds.eval()

    def set_accumulation(self, micro_steps: int) -> None:
        """The next optimizer step accumulates `micro_steps` backward calls (token-budget micro-batches: the count
        varies per step, the same on every rank). From then on the boundary is set by hand and backward() takes
        its loss already scaled (DeepSpeed does not divide it by its configured accumulation)."""
        if self._backwards:
            raise RuntimeError("Engine.set_accumulation inside an optimizer step")
        self.accum, self._variable = int(micro_steps), True

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate `loss`'s gradients (DeepSpeed scales by 1/accumulation, unless set_accumulation was used).
        Not at the boundary: DeepSpeed's step() only counts the micro-step."""
        if self._variable:
            self.ds.set_gradient_accumulation_boundary(self._backwards + 1 == self.accum)
            self.ds.backward(loss, scale_wrt_gas=False)
        else:
            self.ds.backward(loss)
        self._backwards += 1
        if self._backwards < self.accum:
            self.ds.step()

    def step(self) -> float:
        """The optimizer step at the accumulation boundary (all `accum` backward calls made); the global gradient
        norm (before clipping)."""
        if self._backwards != self.accum:
            raise RuntimeError(f"Engine.step after {self._backwards} backward calls; the boundary is {self.accum}")
        own = _grad_norm(self.ds.module) if self._norm_from_grads else None
        self.ds.step()
        self._backwards = 0
        return own if own is not None else float(self.ds.get_global_grad_norm() or 0.0)

    def skip(self) -> None:
        """Drop this step's accumulated gradients: no optimizer or lr-schedule step; DeepSpeed's micro-step counter
        moves to the next boundary."""
        self.ds.optimizer.zero_grad(set_to_none=True)
        self.ds.micro_steps += self.accum - self._backwards
        self._backwards = 0

    def params_finite(self) -> bool:
        """This rank's parameters (its ZeRO-3 partitions) are finite."""
        for p in self.ds.module.parameters():
            t = getattr(p, "ds_tensor", None)
            t = p.data if t is None else t
            if t.numel() and not bool(torch.isfinite(t).all()):
                return False
        return True


def _grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the gradients (whole, all-reduced: ZeRO stage 0)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


# ---------------------------------------------------------------------------------------------
# the module every engine wraps, and the frozen online reference


class PolicyLogps(torch.nn.Module):
    """The HF model behind one `forward(batch) -> ResponseLogps`, so DeepSpeed's engine forward (and
    with it ZeRO-3's per-forward parameter bookkeeping, which hangs off the root module's hooks) runs
    around exactly the log-prob code the reference stage uses. Checkpoint keys gain a `model.` prefix."""

    def __init__(self, model: torch.nn.Module, prior: torch.nn.Module | None = None,
                 head_chunk_tokens: int = HEAD_CHUNK_TOKENS, peft_model=None, router_aux: bool = False,
                 seq_groups=None):
        super().__init__()
        self.model = model
        # sequence parallelism (runtime.seqpar.SeqGroups, its attention installed on `model`): this rank's columns
        object.__setattr__(self, "seq_groups", seq_groups)
        self.head_chunk_tokens = int(head_chunk_tokens)
        self.router_aux = bool(router_aux)  # a MoE policy's forward also returns its routers' load-balancing loss
        # LoRA (runtime.lora): PEFT's wrapper of `model`, kept outside the module tree (its parameters are
        # `model`'s, registered once) for adapters_disabled
        object.__setattr__(self, "peft_model", peft_model)
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
        from midpo.core.logprobs import response_logps

        if self.seq_groups is not None:
            from midpo.runtime.seqpar import head_calls

            shard = self.seq_groups.shard
            calls = head_calls(batch, shard, self.head_chunk_tokens)
            out = response_logps(self.model, batch, return_logits=return_logits, return_hidden=return_hidden,
                                 return_flat_logits=return_flat_logits, shard=shard, head_calls=calls)
            return tuple(getattr(out, f.name) for f in dataclasses.fields(out))
        n_local = int(batch.target_index.numel())
        chunk = equal_chunk_size(n_local, pdist.all_max(n_local), self.head_chunk_tokens)
        out = response_logps(self.model, batch, return_logits=return_logits, return_hidden=return_hidden,
                             return_flat_logits=return_flat_logits, chunk_size=chunk,
                             router_aux=self.router_aux and self.training)
        return tuple(getattr(out, f.name) for f in dataclasses.fields(out))


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


def policy_logps(engine, batch, return_logits: bool = False, return_flat_logits: bool = False):
    """engine(batch) -> midpo.core.logprobs.ResponseLogps (per-token policy log-probs, with grad in training).
    return_logits / return_flat_logits: see midpo.core.logprobs.response_logps. Every rank must pass the same
    flags (they change the number of output-head calls, each a ZeRO-3 gather)."""
    from midpo.core.logprobs import ResponseLogps

    return ResponseLogps(*engine(batch, return_logits=return_logits, return_flat_logits=return_flat_logits))


# ---------------------------------------------------------------------------------------------
# Online reference (train.online_reference=true)




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


class AdapterReference:
    """The online reference of a LoRA policy: the policy's own engine with its adapters disabled (the frozen base;
    TRL's `null_ref_context`), no grad, no second model in memory. Called like `OnlineReference` (once per
    micro-batch on every rank, before the policy's forward), with the same equalized head chunks."""

    def __init__(self, policy_engine, *, return_logits: bool, return_hidden: bool):
        self.engine = policy_engine
        self.return_logits, self.return_hidden = bool(return_logits), bool(return_hidden)

    def __call__(self, batch):
        from midpo.core.logprobs import ResponseLogps
        from midpo.runtime.lora import adapters_disabled

        module = self.engine.module
        was_training = module.training
        module.eval()  # as the frozen reference runs: no dropout
        try:
            with torch.no_grad(), adapters_disabled(module.peft_model):
                out = self.engine(batch, return_logits=self.return_logits, return_hidden=self.return_hidden)
        finally:
            module.train(was_training)
        return ResponseLogps(*out)


def build_reference_engine(model: torch.nn.Module, ds_config: dict, *, return_logits: bool = False,
                           return_hidden: bool = False, head_chunk_tokens: int = HEAD_CHUNK_TOKENS,
                           seq_groups=None) -> OnlineReference:
    """COLLECTIVE (deepspeed.initialize): `model` (frozen, eval) on a ZeRO-3 inference engine whose config
    is the policy's resolved one without the optimizer."""
    import deepspeed

    model.requires_grad_(False)
    model.eval()
    engine, _, _, _ = deepspeed.initialize(model=PolicyLogps(model, head_chunk_tokens=head_chunk_tokens,
                                                             seq_groups=seq_groups),
                                           config=inference_ds_config(ds_config))
    engine.eval()
    return OnlineReference(engine, return_logits=return_logits, return_hidden=return_hidden)
