"""The Vision Transformer: batched tensor code end to end, logits out (no softmax: the loss applies its own)."""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ModelConfig


def sinusoidal_embedding(positions: int, dim: int, base: float = 10000.0) -> Tensor:
    """Fixed 1-D sinusoidal embedding (Vaswani et al.): channel pair i holds sin/cos(position / base^(2i/dim)),
    shape (positions, dim)."""
    position = torch.arange(positions, dtype=torch.float64).unsqueeze(1)
    pair = torch.arange(0, dim, 2, dtype=torch.float64)
    freq = torch.exp(-math.log(base) * pair / dim)
    table = torch.zeros(positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table.float()


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), patches in row-major grid order, each flattened row-major."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def conv_stem(cfg: ModelConfig) -> nn.Sequential:
    """The convolutional stems, log2(patch_size) halvings of the image, stem_channels doubling each time, then a 1x1
    convolution to ``dim``: (B, C, H, W) -> (B, dim, H/p, W/p), the grid ``patchify`` makes, so the tokens, positions
    and everything after them are those of the patch stem.

    - ``model.stem: conv``: each halving is a 3x3 stride-2 convolution with GELU (ViT_C, Xiao et al. 2021).
    - ``model.stem: conv-pool``: each is a 3x3 stride-1 convolution with GELU, then a 3x3 stride-2 max-pool (the
      tokenizer of compact convolutional transformers, Hassani et al. 2021): the same weights, each convolution at
      4x the positions."""
    pool = cfg.stem == "conv-pool"
    layers: list[nn.Module] = []
    channels = cfg.channels
    for i in range(cfg.patch_size.bit_length() - 1):
        out = cfg.stem_channels * 2**i
        layers += [nn.Conv2d(channels, out, 3, stride=1 if pool else 2, padding=1), nn.GELU()]
        layers += [nn.MaxPool2d(3, 2, padding=1)] if pool else []
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, cfg.dim, 1))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's scaled-dot-product kernel."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, out_proj: bool = False) -> None:
        super().__init__()
        assert dim % heads == 0, "heads must divide dim"
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim) if out_proj else nn.Identity()

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # each (B, heads, T, d_head)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self._split(x)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def attention_weights(self, x: Tensor) -> Tensor:
        """softmax(QK^T / sqrt(d_head)) per head, shape (B, heads, T, T); for inspection, not the hot path."""
        q, k, _ = self._split(x)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, dropout: float, attn_out_proj: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, attn_out_proj)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_hidden, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Input: pixel intensities in [0, 1], shape (B, C, H, W). Output: class logits (B, num_classes).

    Normalisation ((x - input_mean) / input_std) happens inside the model, so the exported ONNX file takes
    plain [0, 1] pixels and a consumer cannot get it wrong.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.num_patches = grid * grid
        patch_dim = cfg.channels * cfg.patch_size**2
        self.register_buffer("pixel_mean", torch.tensor(cfg.input_mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.input_std), persistent=False)
        if cfg.stem != "patch":
            self.stem = conv_stem(cfg)
        else:
            self.patch_embed = nn.Linear(patch_dim, cfg.dim)
        if cfg.pool == "cls":
            self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        positions = self.num_patches + (cfg.pool == "cls")
        if cfg.pos_embedding == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, positions, cfg.dim) * 0.02)
        else:
            table = sinusoidal_embedding(positions, cfg.dim, cfg.pos_base)
            self.register_buffer("pos_embed", table.unsqueeze(0), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_hidden, cfg.dropout, cfg.attn_out_proj) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def tokens(self, pixels: Tensor) -> Tensor:
        """Patch embeddings with positions added, the class token first with ``model.pool: cls``:
        (B, 1 + patches, dim), else (B, patches, dim)."""
        x = (pixels - self.pixel_mean) / self.pixel_std
        if self.cfg.stem != "patch":
            x = self.stem(x).flatten(2).transpose(1, 2)  # (B, dim, h, w) -> (B, h * w, dim), row-major as patchify
        else:
            x = self.patch_embed(patchify(x, self.cfg.patch_size))
        if self.cfg.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embed)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.tokens(pixels)
        for block in self.blocks:
            x = block(x)
        if self.cfg.pool == "cls":
            return self.head(self.norm(x[:, 0]))
        return self.head(self.norm(x).mean(dim=1))

    @torch.no_grad()
    def attention_maps(self, pixels: Tensor) -> list[Tensor]:
        """Per block, the attention weights (B, heads, T, T) of a forward pass in eval mode."""
        maps = []
        x = self.tokens(pixels)
        for block in self.blocks:
            maps.append(block.attn.attention_weights(block.norm1(x)))
            x = block(x)
        return maps


_INIT_LOCK = threading.Lock()


def build_model(cfg: ModelConfig, seed: int | None = None) -> ViT:
    """The one place a model is made from its configuration; ``seed`` makes the initial weights reproducible.

    The seeded initialisation runs under a lock on a forked RNG, so fold tasks in concurrent threads each get
    exactly the weights their seed names.
    """
    if seed is None:
        return ViT(cfg)
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViT(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
