"""The mixture-of-experts router's load-balancing loss, a pure function of the routers' logits.

Switch Transformer (Fedus et al. 2021, eq. 4) as transformers' `load_balancing_loss_func` computes it for
Mixtral / Qwen2-MoE: over the real tokens of every MoE layer, f_e = the share of top-k assignments that go
to expert e (summed over the k slots, so sum_e f_e = k) and P_e = the mean router probability of e; the loss is
E * sum_e f_e P_e (minimal, k, when routing is uniform). Its gradient reaches the routers through P_e only.
midpo adds `train.router_aux_loss_coef` x this to the policy's loss (midpo.train.step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """router_logits: per MoE layer (M, E), M = the forward's token slots (R*T) in one order for every layer;
    token_mask (M,) bool, False for padding slots (None: all real). -> () fp32."""
    logits = torch.stack([x.float() for x in router_logits])  # (L, M, E)
    E = logits.shape[-1]
    w = (torch.ones(logits.shape[1], device=logits.device) if token_mask is None
         else token_mask.reshape(-1).to(logits.device, torch.float32))  # (M,)
    probs = logits.softmax(-1)  # (L, M, E)
    chosen = probs.topk(top_k, -1).indices  # (L, M, k)
    counts = torch.zeros(E, device=logits.device).index_add_(
        0, chosen.reshape(-1), w[None, :, None].expand_as(chosen).reshape(-1))  # (E,) weighted assignments
    n = w.sum() * logits.shape[0]  # real token slots over all layers
    share = counts / n  # (E,) f_e, no gradient (from a top-k)
    mean_prob = (probs * w[None, :, None]).sum((0, 1)) / n  # (E,) P_e
    return E * (share * mean_prob).sum()
