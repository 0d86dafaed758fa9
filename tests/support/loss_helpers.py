"""Random per-token log-prob batches for the loss tests."""

from __future__ import annotations

import torch

from midpo.core.logprobs import ResponseLogps


def rand_side(g, B, L, lens):
    mask = torch.arange(L)[None, :] < torch.tensor(lens)[:, None]  # (B, L)
    x = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    return torch.where(mask, x, 0.0).requires_grad_(), mask


def batch(seed=0, lens_c=(3, 1, 6), lens_r=(4, 4, 2)):
    g = torch.Generator().manual_seed(seed)
    c, cm = rand_side(g, len(lens_c), max(lens_c), lens_c)
    r, rm = rand_side(g, len(lens_r), max(lens_r), lens_r)
    zc, _ = rand_side(g, len(lens_c), max(lens_c), lens_c)
    zr, _ = rand_side(g, len(lens_r), max(lens_r), lens_r)
    return ResponseLogps(c, cm, r, rm), zc.detach(), zr.detach()

