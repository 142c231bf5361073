"""Losses: ``(output, target) -> one loss per sample, shape (B,)``.

The trainer minimizes the mean over a batch (micro-batches add up their sums divided by the
batch size, so splitting a batch changes nothing) and evaluates the mean over a split. A loss
with a ``correct(output, target) -> (B,)`` method (the fraction of each sample predicted
right) gives ``test_acc`` / ``val_acc`` too; a plain function gives the losses alone. An
optional ``reduce(output, target, reduction)`` ("mean" or "sum") equal to the mean or sum of
the per-sample losses is used in their place (the built-in's: torch's fused cross-entropy).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class CrossEntropy:
    """Cross-entropy over class ids (``model.loss: cross_entropy``, the paper's loss).

    ``output`` (B, C) logits with ``target`` (B,) class ids; or per-token (B, T, C) logits with
    (B, T) ids (a language model), where a sample's loss is the mean over its T tokens."""

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.dim() == 2:
            return F.cross_entropy(output, target, reduction="none")
        per_token = F.cross_entropy(output.flatten(0, -2), target.flatten(), reduction="none")
        return per_token.view(target.shape).flatten(1).mean(1)

    def reduce(self, output: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
        if output.dim() == 2:
            return F.cross_entropy(output, target, reduction=reduction)
        losses = self(output, target)
        return losses.sum() if reduction == "sum" else losses.mean()

    def correct(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hit = (output.argmax(-1) == target).to(output.dtype)
        return hit if hit.dim() == 1 else hit.flatten(1).mean(1)
