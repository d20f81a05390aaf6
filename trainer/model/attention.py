"""Self- and cross-attention of the Wan DiT block, with a pluggable masked-attention kernel.

Tensors are (batch, tokens, heads, head_dim) between modules, as in torchtitan. The kernel is chosen by
`model.attention`: `sdpa` (dense boolean mask; runs everywhere, the CPU training path), `flex`
(flex_attention with the block-sparse BlockMask; compiled on GPU, forward-only on CPU) or `triton` (the
platform's own block-sparse kernels, wam.trainer.kernels; GPU, or Triton's interpreter in tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from torchtitan.models.common.linear import Linear
from torchtitan.protocols.module import Module

from wam.trainer.model.kv_cache import KV, LayerCache, PooledRows, SessionRows
from wam.trainer.model.layers import FP32RMSNorm
from wam.trainer.model.mask import AttentionMask, PaddedMask
from wam.trainer.model.rope import apply_rope


class SDPAKernel(Module):
    """F.scaled_dot_product_attention with the dense boolean mask."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        pass

    def __init__(self, config: Config):
        super().__init__()

    def prepare(self, mask: AttentionMask, device: torch.device) -> None:
        for window in mask.masks:
            window.dense(device)
            window.split_queries(device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: AttentionMask | PaddedMask) -> torch.Tensor:
        if isinstance(mask, PaddedMask) or len(mask.masks) == 1:
            return self._attend(q, k, v, mask)
        # packed windows: each over its own keys, so the cost is the sum of their squares, not the whole's square
        q_parts = q.split([m.queries.length for m in mask.masks], dim=1)
        k_parts, v_parts = (t.split([m.keys.length for m in mask.masks], dim=1) for t in (k, v))
        return torch.cat([self._attend(*qkv, m)
                          for *qkv, m in zip(q_parts, k_parts, v_parts, mask.masks, strict=True)], dim=1)

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | PaddedMask) -> torch.Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, tokens, head_dim)
        full, partial = mask.split_queries(q.device)
        if 8 * len(partial) > q.shape[2]:  # many rows see only some keys (training; a batch of padded rows)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(q.device)).transpose(1, 2)
        # Nearly every query sees every key (a served chunk): those run with no mask, which lets SDPA take its
        # fastest (flash) kernel, and the few that see less run apart under their rows of the mask.
        out = q.new_empty(q.shape[:3] + v.shape[3:])
        out = out.index_copy(2, full, F.scaled_dot_product_attention(q.index_select(2, full), k, v))
        if len(partial):
            rows = F.scaled_dot_product_attention(q.index_select(2, partial), k, v,
                                                  attn_mask=mask.dense(q.device)[..., partial, :])
            out = out.index_copy(2, partial, rows)  # not in place: autograd keeps SDPA's own outputs
        return out.transpose(1, 2)


class FlexKernel(Module):
    """flex_attention over the layout's BlockMask: only tiles the mask allows are computed."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        block_size: int = 128

    _compiled: ClassVar = None

    def __init__(self, config: Config):
        super().__init__()
        self.block_size = config.block_size

    @classmethod
    def _flex(cls, device: torch.device):
        if device.type == "cpu":  # inductor's CPU flex path only matters for tests; eager is exact
            return flex_attention
        if cls._compiled is None:
            cls._compiled = torch.compile(flex_attention, dynamic=False)
        return cls._compiled

    def prepare(self, mask: AttentionMask, device: torch.device) -> None:
        mask.block_mask(device, self.block_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        block_mask = mask.block_mask(q.device, self.block_size)
        out = self._flex(q.device)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)


class TritonKernel(Module):
    """The platform's Triton flash-attention kernels (wam.trainer.kernels): only tiles the mask allows are
    visited, one custom op with its own backward. CUDA GPUs; on CPU only under TRITON_INTERPRET=1 (tests)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        # Rotate q/k inside the kernels instead of before them (training, no KV cache). Off by default: it is
        # correct (tests) but not yet measured faster on a GPU (benchmarks/attention.py --fuse-rope).
        fuse_rope: bool = False

    def __init__(self, config: Config):
        super().__init__()
        from wam.trainer.kernels import block_sparse_attention  # Triton is imported only for this backend
        from wam.trainer.kernels.op import span_tables

        self.attention, self._span_tables = block_sparse_attention, span_tables
        self.fuses_rope = config.fuse_rope

    def prepare(self, mask: AttentionMask, device: torch.device) -> None:
        self._span_tables(mask)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.attention(q, k, v, mask, rope=rope)


_SDPA = SDPAKernel(SDPAKernel.Config())
KERNELS = {"sdpa": SDPAKernel, "flex": FlexKernel, "triton": TritonKernel}
# Each kernel's `prepare(mask, device)` builds the form of the mask it reads (dense, BlockMask, span tables),
# once per mask and before the blocks run: built lazily inside a compiled block, the first call would trace
# the building and every later one recompile; under activation checkpointing the recomputation would then
# run a different graph than the forward did.


class _Attention(Module):
    """q/k/v/o projections with Wan's q/k RMSNorm over the whole width."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        num_heads: int
        q: Linear.Config
        k: Linear.Config
        v: Linear.Config
        o: Linear.Config
        norm_q: FP32RMSNorm.Config
        norm_k: FP32RMSNorm.Config

    def __init__(self, config: Config):
        super().__init__()
        self.num_heads = config.num_heads
        self.q, self.k, self.v, self.o = (config.q.build(), config.k.build(), config.v.build(), config.o.build())
        self.norm_q, self.norm_k = config.norm_q.build(), config.norm_k.build()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))


class SelfAttention(_Attention):
    @dataclass(kw_only=True, slots=True)
    class Config(_Attention.Config):
        kernel: Module.Config

    def __init__(self, config: Config):
        super().__init__(config)
        self.kernel = config.kernel.build()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask | None,
                cache: LayerCache | PooledRows | SessionRows | None = None) -> torch.Tensor:
        """x (B, L, dim) attends under `mask` to its own keys, after the cache's committed keys if given (with
        SessionRows: each session's rows to its own cache, under its own mask)."""
        q, k, v = self._heads(self.norm_q(self.q(x))), self._heads(self.norm_k(self.k(x))), self._heads(self.v(x))
        if cache is None and getattr(self.kernel, "fuses_rope", False):
            return self.o(self.kernel(q, k, v, mask, rope=rope).flatten(2))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if isinstance(cache, SessionRows):
            outs = [self.kernel(q_s, *layer.extend(k_s, v_s), mask_s) for q_s, k_s, v_s, layer, mask_s in zip(
                q.split(cache.sizes), k.split(cache.sizes), v.split(cache.sizes), cache.layers, cache.masks,
                strict=True)]
            return self.o((outs[0] if len(outs) == 1 else torch.cat(outs)).flatten(2))
        if cache is not None:
            k, v = cache.extend(k, v)
        # a padded serving batch has a per-row dense mask, which only SDPA reads
        kernel = _SDPA if isinstance(mask, PaddedMask) else self.kernel
        return self.o(kernel(q, k, v, mask).flatten(2))


class CrossContext(NamedTuple):
    """Cross-attention keys/values of one block: text tokens, and CLIP image tokens for I2V models. `windows`:
    the token counts of windows packed along the tokens (batch 1), window i attending to row i's keys."""

    text: KV
    image: KV | None
    windows: tuple[int, ...] | None = None


class SessionContexts(NamedTuple):
    """One block's cross-attention context of each session in an eager batched forward (predict_many)."""

    sizes: tuple[int, ...]  # each session's rows, in order
    contexts: tuple[CrossContext, ...]


class PooledContext(NamedTuple):
    """One block's cross-attention context of a batch of caches in a KVPool (predict_many, compiled): the pool's
    prompt and image keys/values, gathered at each batch row's pool row inside the compiled graph (PooledRows)."""

    text: KV  # KVPool.text: (blocks, pool rows, text_len, heads, head_dim)
    image: KV | None
    block: int
    rows: torch.Tensor  # (B,) int64

    def gather(self) -> CrossContext:
        def rows(kv: KV) -> KV:
            return KV(kv.k[self.block].index_select(0, self.rows), kv.v[self.block].index_select(0, self.rows))

        return CrossContext(rows(self.text), None if self.image is None else rows(self.image))


class CrossAttention(_Attention):
    """Cross-attention to text tokens, plus (I2V) CLIP image tokens through k_img/v_img; results summed."""

    @dataclass(kw_only=True, slots=True)
    class Config(_Attention.Config):
        k_img: Linear.Config | None = None
        v_img: Linear.Config | None = None
        norm_k_img: FP32RMSNorm.Config | None = None

    def __init__(self, config: Config):
        super().__init__(config)
        self.has_image = config.k_img is not None
        if self.has_image:
            self.k_img, self.v_img = config.k_img.build(), config.v_img.build()
            self.norm_k_img = config.norm_k_img.build()

    def context(self, text: torch.Tensor, image: torch.Tensor | None,
                windows: tuple[int, ...] | None = None) -> CrossContext:
        """Project the (embedded) conditioning tokens once; reusable for every query of a session."""
        text_kv = KV(self._heads(self.norm_k(self.k(text))), self._heads(self.v(text)))
        image_kv = None
        if self.has_image:
            if image is None:
                raise ValueError("this model has an image (CLIP) branch: pass image tokens")
            image_kv = KV(self._heads(self.norm_k_img(self.k_img(image))), self._heads(self.v_img(image)))
        return CrossContext(text_kv, image_kv, windows)

    @staticmethod
    def _attend(q: torch.Tensor, kv: KV, windows: tuple[int, ...] | None) -> torch.Tensor:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

        if windows is None:
            out = attend(q, kv.k, kv.v)
        else:  # packed windows: each attends to its own prompt
            out = torch.cat([attend(part, kv.k[i:i + 1], kv.v[i:i + 1])
                             for i, part in enumerate(q.split(windows, dim=1))], dim=2)
        return out.transpose(1, 2).flatten(2)

    def forward(self, x: torch.Tensor, context: CrossContext | SessionContexts | PooledContext) -> torch.Tensor:
        q = self._heads(self.norm_q(self.q(x)))
        if isinstance(context, PooledContext):
            context = context.gather()
        if isinstance(context, SessionContexts):  # each session's rows to its own prompt
            outs = [self._attend_context(q_s, c) for q_s, c in zip(q.split(context.sizes), context.contexts,
                                                                   strict=True)]
            return self.o(outs[0] if len(outs) == 1 else torch.cat(outs))
        return self.o(self._attend_context(q, context))

    def _attend_context(self, q: torch.Tensor, context: CrossContext) -> torch.Tensor:
        out = self._attend(q, context.text, context.windows)
        if context.image is not None:
            out = out + self._attend(q, context.image, context.windows)
        return out
