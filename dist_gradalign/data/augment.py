"""Per-batch data augmentation with explicit, device-independent randomness."""
from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop_flip")
PAD = 4


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch ``x`` of shape ``(B, C, H, W)``.

    ``kind``:

    - ``"none"``: return ``x`` itself.
    - ``"crop_flip"``: per sample, zero-pad by 4 pixels, take a random ``H x W`` crop, and flip
      horizontally with probability 0.5 (torchvision's ``RandomCrop(pad=4)`` +
      ``RandomHorizontalFlip``), vectorized over the batch. The batch is already normalized,
      so the padding is the mean colour rather than torchvision's black.

    All random numbers are drawn on the CPU from ``generator`` (a CPU generator), so the result
    depends only on its state, never on the device; the result lies on ``x``'s device.
    """
    if kind == "none":
        return x
    if kind != "crop_flip":
        raise ValueError(f"unknown augmentation {kind!r}: choose one of {', '.join(AUGMENTATIONS)}")
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * PAD + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * PAD + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)  # (B, H): rows of the padded image
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    padded = F.pad(x, (PAD, PAD, PAD, PAD)).permute(0, 2, 3, 1)  # (B, H+8, W+8, C)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
