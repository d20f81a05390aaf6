"""The Wan DiT block with per-token adaLN modulation (DreamZero: every token carries its own timestep)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.nn_modules import GELU, Identity
from torchtitan.protocols.module import Module, Sequential

from wam.trainer.model.attention import (
    CrossAttention,
    CrossContext,
    PooledContext,
    SelfAttention,
    SessionContexts,
)
from wam.trainer.model.kv_cache import LayerCache, PooledRows, SessionRows
from wam.trainer.model.layers import FP32LayerNorm
from wam.trainer.model.mask import AttentionMask, PaddedMask


class Conditioning(NamedTuple):
    """Embedded cross-attention tokens shared by all blocks: text (B, text_len, dim), image (B, n, dim). For
    windows packed along the tokens (batch 1), one row per window and `windows` their token counts."""

    text: torch.Tensor
    image: torch.Tensor | None
    windows: tuple[int, ...] | None = None


class TokenModulation(NamedTuple):
    """Per-span time projection and the span index of every token, so each block gathers its adaLN terms."""

    e0: torch.Tensor  # (B, spans, 6, dim) fp32
    span_of_token: torch.Tensor  # (L,) int64


class WanBlock(Module):
    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        dim: int
        eps: float
        cross_attn_norm: bool
        self_attn: SelfAttention.Config
        cross_attn: CrossAttention.Config
        ffn_in: Linear.Config
        ffn_out: Linear.Config

    def __init__(self, config: Config):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = FP32LayerNorm.Config(normalized_shape=dim, eps=eps).build()
        self.self_attn = config.self_attn.build()
        self.norm3 = (FP32LayerNorm.Config(normalized_shape=dim, eps=eps, elementwise_affine=True).build()
                      if config.cross_attn_norm else Identity.Config().build())
        self.cross_attn = config.cross_attn.build()
        self.norm2 = FP32LayerNorm.Config(normalized_shape=dim, eps=eps).build()
        self.ffn = Sequential(config.ffn_in.build(), GELU.Config(approximate="tanh").build(), config.ffn_out.build())
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def cross_context(self, conditioning: Conditioning) -> CrossContext:
        return self.cross_attn.context(conditioning.text, conditioning.image, conditioning.windows)

    def forward(self, x: torch.Tensor, modulation: TokenModulation, rope: tuple[torch.Tensor, torch.Tensor],
                mask: AttentionMask | PaddedMask | None,
                context: Conditioning | CrossContext | SessionContexts | PooledContext,
                cache: LayerCache | PooledRows | SessionRows | None = None) -> torch.Tensor:
        """x: (B, L, dim) fp32 residual stream. Sub-layers run in the weights' dtype; the residual and the
        modulation stay fp32, as in Wan. With a cache, self-attention also sees the cache's committed keys."""
        dtype = self.ffn[0].weight.dtype
        mod = self.modulation + modulation.e0  # (B, spans, 6, dim): shift1, scale1, gate1, shift2, scale2, gate2

        def term(i: int) -> torch.Tensor:  # (B, L, dim), each token its span's: gathered when used, not all six
            return mod[:, :, i].index_select(1, modulation.span_of_token)  # at once (24 bytes a token and width)

        h = self.norm1(x).float() * (1 + term(1)) + term(0)
        y = self.self_attn(h.to(dtype), rope, mask, cache)
        x = x + y.float() * term(2)

        if isinstance(context, Conditioning):
            context = self.cross_context(context)
        x = x + self.cross_attn(self.norm3(x).to(dtype), context).float()

        h = self.norm2(x).float() * (1 + term(4)) + term(3)
        x = x + self.ffn(h.to(dtype)).float() * term(5)
        return x
