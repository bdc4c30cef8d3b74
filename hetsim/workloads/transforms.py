"""Batched image transforms in plain torch (torchvision has no CPU build here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 NCHW -> float, scaled to [0, 1] then standardised per channel."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def random_crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator | None) -> torch.Tensor:
    """Per-sample random crop of the original size after zero padding by `pad`, then a random
    horizontal flip with probability 0.5 (torchvision's RandomCrop(padding) + RandomHorizontalFlip)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    # random numbers come from the (CPU) generator, so a run draws the same crops on any device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    out = padded.gather(2, rows).gather(3, cols)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)
