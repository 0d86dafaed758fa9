"""Builders for the prior-network tests: tiny Llamas, random pairs, an independent full-vocab computation."""

from __future__ import annotations

import torch

from midpo.core.logprobs import response_logps
from midpo.core.prior_net import PriorLM, warmup_lambda
from midpo.core.priors import SidePair
from midpo.train.prior_engine import PriorNetwork, bos_of

V, PAD, BOS, EOS = 200, 0, 1, 2


BETA = 0.1


def llama(seed: int, layers: int = 2, tied: bool = False, scale: float = 1.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=BOS,
                      eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=tied, attn_implementation="sdpa")
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(scale)  # scale > 1: peakier distributions than the default init
    return m


def rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi, eos):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(3, V, (k,), generator=g).tolist() + ([EOS] if eos else [])

    return [{"prompt_ids": [BOS] + seq(1, 4, False), "chosen_ids": seq(1, 7, True), "rejected_ids": seq(1, 7, True)}
            for _ in range(n)]


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()  # (T, V)


def independent(policy, prior, rs: list[dict]) -> dict:
    """Per pair: KL(pi || zeta) summed over both responses, log zeta and log pi of each response, from
    single-sequence forwards; the unconditioned prior reads [BOS] + response."""
    out = {"kl": [], "zw": [], "zl": [], "pw": [], "pl": []}
    for r in rs:
        kl = 0.0
        for side, z_key, p_key in (("chosen_ids", "zw", "pw"), ("rejected_ids", "zl", "pl")):
            y, P = r[side], len(r["prompt_ids"])
            lp = torch.log_softmax(full_logits(policy, r["prompt_ids"] + y)[P - 1 : -1], -1)  # (L, V)
            lq = torch.log_softmax(full_logits(prior, [BOS] + y)[:-1], -1)  # (L, V)
            kl += float((lp.exp() * (lp - lq)).sum())
            idx = torch.tensor(y)[:, None]
            out[z_key].append(float(lq.gather(-1, idx).sum()))
            out[p_key].append(float(lp.gather(-1, idx).sum()))
        out["kl"].append(kl)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


class TorchEngine:
    """A plain-PyTorch stand-in for midpo.runtime.engine.Engine (one process): the same protocol (engine(...),
    backward(loss) scaled by 1/accumulation, step() at the boundary returning the grad norm, skip(), lr,
    module), AdamW with the prior's warmup."""

    def __init__(self, module: torch.nn.Module, *, lr: float, warmup_steps: int = 0, grad_accum: int = 1,
                 max_grad_norm: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8):
        self.module = module
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, betas=betas,
                                           eps=eps, weight_decay=0.0)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(warmup_steps))
        self.accum, self.max_grad_norm, self.backwards = grad_accum, max_grad_norm, 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()
        self.backwards += 1

    def step(self) -> float:
        assert self.backwards == self.accum, (self.backwards, self.accum)
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm) if self.max_grad_norm \
            else torch.zeros(())
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.backwards = 0
        return float(norm)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.backwards = 0

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.module.load_state_dict(s["module"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.lr_scheduler.load_state_dict(s["lr_scheduler"])


def torch_prior(prior_model: torch.nn.Module, cfg, *, beta: float, pad_id: int, grad_accum: int = 1,
                init_model: torch.nn.Module | None = None, max_grad_norm: float = 0.0) -> PriorNetwork:
    """A PriorNetwork on TorchEngine. ``prior_model`` is trained in place; ``init_model`` (joint + kl_init): a frozen
    copy of its initialization."""
    engine = TorchEngine(PriorLM(prior_model, cfg.chunk_size), lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                         grad_accum=grad_accum, max_grad_norm=max_grad_norm)
    init = None
    if init_model is not None:
        init_model.requires_grad_(False)
        init = PriorLM(init_model.eval(), cfg.chunk_size)
    return PriorNetwork(engine, cfg, beta=beta, pad_id=pad_id, bos_id=bos_of(cfg, prior_model), init_engine=init)


def train_step(prior_net, policy, batch, step: int) -> dict:
    """One optimizer step of the prior as midpo.train.step.train_step runs it, with a fixed (not updated) policy."""
    update = prior_net.update_due(step)
    pol = response_logps(policy, batch, return_logits=True)
    zeta, loss = prior_net.forward(batch, pol, update=update)
    assert isinstance(zeta, SidePair)
    updated = None
    if update:
        lr = prior_net.engine.lr
        updated = bool(torch.isfinite(loss))
        if updated:
            prior_net.engine.backward(loss)
            prior_net.add_loss(loss, batch.num_pairs)
            prior_net.engine.step()
        else:
            prior_net.engine.skip()
        return prior_net.end_step(step, updated=updated, lr=lr)
    return prior_net.end_step(step, updated=updated)


def mean(metrics: dict, name: str) -> float:
    s, c = metrics[name].tolist()
    return s / c

