"""What the classifier's input looks at: per-head attention of the last block and attention rollout across blocks.

Rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020): per block, average the heads,
add the identity for the residual connection and renormalise the rows; multiply the blocks' matrices, the last
block on the left. Row 0 of the product, over the patch columns, says how much of the class token's final state
traces back to each patch of the input. A model without a class token (``model.pool: mean``) classifies the mean of
its patch tokens, so its maps are the rows' mean: the attention the average token pays, in the last block or
traced back through all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.model import ViT


def rollout(maps: Sequence[Tensor]) -> Tensor:
    """Attention rollout of per-block maps (B, heads, T, T), first block first: (B, T, T), rows sum to 1."""
    if not maps:
        raise ValueError("attention rollout needs the maps of at least one block")
    joint = None
    for attn in maps:
        mixed = attn.mean(dim=1)  # (B, T, T): heads averaged
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)  # the residual path
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        joint = mixed if joint is None else mixed @ joint  # later blocks act on what earlier ones produced
    return joint


def class_token_attention(attn: Tensor) -> Tensor:
    """The class token's attention to each patch in a map (B, [heads,] T, T): (B, [heads,] T - 1).

    The class token's attention to itself is left out, so a row sums to 1 minus that share."""
    return attn[..., 0, 1:]


def pooled_attention(attn: Tensor, pool: str) -> Tensor:
    """What the head's input attends to in a map over tokens, (B, [heads,] T, T) -> (B, [heads,] patches): the class
    token's row over the patches (``pool: cls``, see ``class_token_attention``) or the mean of all rows
    (``pool: mean``, where every patch token feeds the head equally)."""
    return class_token_attention(attn) if pool == "cls" else attn.mean(dim=-2)


@dataclass
class AttentionSummary:
    """For each image: the last block's class-token attention per head over the patch grid (B, heads, g, g),
    the class-token rollout over the patch grid (B, g, g), and the model's predicted digit (B,); for a model without
    a class token (``model.pool: mean``), the same of the average patch token (``pooled_attention``)."""

    last_block: Tensor
    rollout: Tensor
    predictions: Tensor

    @property
    def grid(self) -> int:
        return self.rollout.shape[-1]


@torch.no_grad()
def summarize(model: ViT, pixels: Tensor) -> AttentionSummary:
    """Attention maps of ``model`` on ``pixels`` (floats in [0, 1], (B, C, H, W)) in eval mode, on the CPU."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        pixels = pixels.to(device)
        maps = model.attention_maps(pixels)
        predictions = model(pixels).argmax(dim=1)
    finally:
        model.train(was_training)
    grid = int(round(model.num_patches ** 0.5))
    b = pixels.shape[0]
    last = pooled_attention(maps[-1], model.cfg.pool).reshape(b, -1, grid, grid)
    rolled = pooled_attention(rollout(maps), model.cfg.pool).reshape(b, grid, grid)
    return AttentionSummary(last_block=last.float().cpu(), rollout=rolled.float().cpu(),
                            predictions=predictions.cpu())
