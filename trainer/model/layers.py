"""Small torchtitan `Module`s the WAM is built from, beyond torchtitan's own `Linear` / `GELU` / `SiLU`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchtitan.protocols.module import Module


class Conv3d(nn.Conv3d, Module):
    """Configurable nn.Conv3d (Wan's patch embedding: kernel = stride = patch)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        in_channels: int
        out_channels: int
        kernel_size: tuple[int, int, int]
        stride: tuple[int, int, int]
        bias: bool = True

    def __init__(self, config: Config):
        super().__init__(config.in_channels, config.out_channels, config.kernel_size,
                         stride=config.stride, bias=config.bias)


class FP32LayerNorm(nn.LayerNorm, Module):
    """LayerNorm computed in fp32 and cast back, as Wan does for bf16 stability."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        normalized_shape: int
        eps: float = 1e-6
        elementwise_affine: bool = False

    def __init__(self, config: Config):
        super().__init__(config.normalized_shape, eps=config.eps, elementwise_affine=config.elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class FP32RMSNorm(nn.RMSNorm, Module):
    """RMSNorm over the whole model width (Wan's q/k norm), normalised in fp32."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        normalized_shape: int
        eps: float = 1e-6

    def __init__(self, config: Config):
        super().__init__(config.normalized_shape, eps=config.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def sinusoidal_embedding(t: torch.Tensor, dim: int, *, sin_first: bool = False) -> torch.Tensor:
    """Sinusoidal embedding of timesteps on the 0..1000 scale, shape t.shape + (dim,), in fp32.

    Wan embeds diffusion timesteps as [cos, sin] (computed in float64); DreamZero's action encoder
    embeds them as [sin, cos].
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64).unsqueeze(-1) * freqs
    parts = (angles.sin(), angles.cos()) if sin_first else (angles.cos(), angles.sin())
    return torch.cat(parts, dim=-1).float()
