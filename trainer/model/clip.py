"""CLIP ViT-H/14 vision tower (frozen), key-compatible with the `visual.*` part of Wan's
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`.

Wan2.1-I2V conditions on the penultimate block's tokens of the first frame: 1 class + 16x16 patch tokens
= 257 tokens of width 1280, without the final norm or projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wam.platform.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipConfig:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: int = 4
    out_dim: int = 1024
    num_heads: int = 16
    num_layers: int = 32
    eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


CLIP_CONFIGS = {
    "clip-vit-h-14": ClipConfig(),
    "tiny": ClipConfig(image_size=28, dim=32, out_dim=16, num_heads=2, num_layers=2),
}


def clip_config(name: str) -> ClipConfig:
    if name not in CLIP_CONFIGS:
        raise ConfigError(f"unknown image encoder {name!r}; available: {', '.join(CLIP_CONFIGS)}")
    return CLIP_CONFIGS[name]


class _LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        hidden = cfg.dim * cfg.mlp_ratio
        self.norm1 = _LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = _SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = _LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        gain = cfg.dim**-0.5
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(gain * torch.randn(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(gain * torch.randn(1, cfg.num_tokens, cfg.dim))
        self.pre_norm = _LayerNorm(cfg.dim, eps=cfg.eps)
        self.transformer = nn.Sequential(*[_Block(cfg) for _ in range(cfg.num_layers)])
        # Unused by Wan's conditioning (it stops one block early) but part of the checkpoint.
        self.post_norm = _LayerNorm(cfg.dim, eps=cfg.eps)
        self.head = nn.Parameter(gain * torch.randn(cfg.dim, cfg.out_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, S, S) -> penultimate-block tokens (B, 1 + (S/14)^2, dim)."""
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pre_norm(x + self.pos_embedding.to(x.dtype))
        return self.transformer[:-1](x)


class ClipImageEncoder(nn.Module):
    """First frame in [-1, 1] (B, 3, H, W) -> CLIP tokens (B, 257, 1280) for the DiT's image branch."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.visual = VisionTransformer(cfg)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected frames (B, 3, H, W) in [-1, 1], got {tuple(frames.shape)}")
        size = self.visual.cfg.image_size
        x = F.interpolate(frames.float(), size=(size, size), mode="bicubic", align_corners=False)
        x = (x * 0.5 + 0.5 - self.mean) / self.std
        return self.visual(x).float()
