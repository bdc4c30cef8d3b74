"""The training loss per sample, shared by the per-replica loop (hetsim.training) and the batched one
(hetsim.batched). A module of its own so that neither imports the other for it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample; for sequence targets (N, T) the mean over the sample's positions."""
    losses = F.cross_entropy(out, y, reduction="none")
    return losses.flatten(1).mean(1) if losses.dim() > 1 else losses
