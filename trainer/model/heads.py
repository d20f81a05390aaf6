"""Input and output heads around the DiT blocks: Wan's output head and CLIP projection, and DreamZero's
state encoder and action decoder (`ReluMLP`) and action encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.nn_modules import GELU
from torchtitan.protocols.module import Module, Sequential

from wam.trainer.model.layers import FP32LayerNorm, sinusoidal_embedding


class OutputHead(Module):
    """Wan `head`: LayerNorm, per-token shift/scale from the time embedding, Linear to patch * channels."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        dim: int
        eps: float
        head: Linear.Config

    def __init__(self, config: Config):
        super().__init__()
        self.norm = FP32LayerNorm.Config(normalized_shape=config.dim, eps=config.eps).build()
        self.head = config.head.build()
        self.modulation = nn.Parameter(torch.empty(1, 2, config.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim) fp32, e (B, N, dim) fp32 time embedding of each token."""
        shift, scale = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        h = self.norm(x).float() * (1 + scale) + shift
        return self.head(h.to(self.head.weight.dtype))


class ImageProjection(Module):
    """Wan `img_emb`: CLIP ViT-H penultimate tokens (1280) -> model width, LN-Linear-GELU-Linear-LN."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        image_dim: int
        dim: int
        fc1: Linear.Config
        fc2: Linear.Config

    def __init__(self, config: Config):
        super().__init__()
        self.proj = Sequential(
            FP32LayerNorm.Config(normalized_shape=config.image_dim, eps=1e-5, elementwise_affine=True).build(),
            config.fc1.build(),
            GELU.Config().build(),
            config.fc2.build(),
            FP32LayerNorm.Config(normalized_shape=config.dim, eps=1e-5, elementwise_affine=True).build(),
        )

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(image_tokens.to(self.proj[1].weight.dtype))


class ReluMLP(Module):
    """layer1 -> ReLU -> layer2: DreamZero's state encoder (state padded to 64 -> 1024 -> width, one token
    per chunk) and action decoder (action-token hidden states -> 1024 -> velocity padded to 32)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        layer1: Linear.Config
        layer2: Linear.Config

    def __init__(self, config: Config):
        super().__init__()
        self.layer1, self.layer2 = config.layer1.build(), config.layer2.build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(F.relu(self.layer1(x.to(self.layer1.weight.dtype))))


class ActionEncoder(Module):
    """Noisy actions (padded to 32) -> width, concatenated with a [sin, cos] encoding of the action's
    timestep (0..1000) -> width, swish -> width. Names W1/W2/W3 follow DreamZero's checkpoints."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        dim: int
        W1: Linear.Config
        W2: Linear.Config
        W3: Linear.Config

    def __init__(self, config: Config):
        super().__init__()
        self.dim = config.dim
        self.W1, self.W2, self.W3 = config.W1.build(), config.W2.build(), config.W3.build()

    def forward(self, actions: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """actions (B, N, action_dim), timesteps (B, N) -> (B, N, dim)."""
        dtype = self.W1.weight.dtype
        tau = sinusoidal_embedding(timesteps, self.dim, sin_first=True).to(dtype)
        h = torch.cat([self.W1(actions.to(dtype)), tau], dim=-1)
        return self.W3(F.silu(self.W2(h)))
