"""KV cache for chunk-wise autoregressive inference.

Each block keeps preallocated K/V buffers: committed tokens (the clean context: first frame and the
observed chunks) followed by scratch room for one pending query (a chunk being denoised, or a chunk being
observed). A forward extends into the scratch room without copying the context; `commit` makes the
pending tokens part of the context, and writing chunk c again first truncates the context to before c
(its later entries were computed from the old chunk c).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from wam.platform.layout import TokenLayout
from wam.trainer.model.mask import AttentionMask


class KV(NamedTuple):
    k: torch.Tensor  # (B, L, heads, head_dim); RoPE already applied for self-attention
    v: torch.Tensor


class LayerCache:
    def __init__(self, batch: int, capacity: int, heads: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype):
        # zeros, not empty: padded batches (PaddedKV) read unwritten rows under a mask, and 0 * NaN would leak
        self.k = torch.zeros(batch, capacity, heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # committed tokens
        self.pending = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Write k/v after the committed tokens and return committed + new keys/values (views, no copy)."""
        start, end = self.length, self.length + k.shape[1]
        if end > self.k.shape[1]:
            raise RuntimeError(f"KV cache capacity {self.k.shape[1]} exceeded ({end} tokens); "
                               "reset the cache or allocate it for more chunks")
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        self.pending = k.shape[1]
        return KV(self.k[:, :end], self.v[:, :end])


class PaddedKV(NamedTuple):
    """One block's committed keys/values of a batch of caches, each row padded to one length (masked): a
    prediction's new keys go after them, so nothing is written and the shapes stay static (predict_many)."""

    k: torch.Tensor  # (B, context, heads, head_dim)
    v: torch.Tensor

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> KV:
        return KV(torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1))


class SessionRows(NamedTuple):
    """One block's view of several sessions' rows in one eager forward (predict_many): the linear layers run on
    every row at once, attention per session over its own cache (extended in place, no copy) under its own mask
    (`masks`, an AttentionMask each) -- the work of serving each alone, with no key padded or copied."""

    sizes: tuple[int, ...]  # each session's rows, in order
    layers: tuple[LayerCache, ...]
    masks: tuple[AttentionMask, ...]


@dataclass
class KVCache:
    """Per-session inference state: block caches, cross-attention K/V and I2V conditioning."""

    layers: list[LayerCache]
    frames_per_chunk: int
    actions_per_chunk: int
    grid: tuple[int, int]  # patches per latent frame (h, w)
    max_chunks: int
    layout: TokenLayout | None = None  # committed tokens
    cross_context: list | None = None  # per block CrossContext, set by WamModel.set_conditioning
    i2v_cond: torch.Tensor | None = None  # (B, 4 + z, 1 + max_chunks * frames_per_chunk, h, w)
    observed_chunks: int = field(default=0)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def next_chunk(self) -> int:
        return self.observed_chunks

    def truncate(self, layout: TokenLayout | None) -> None:
        """Keep only the committed tokens of `layout` (a prefix of the current layout)."""
        self.layout = layout
        length = 0 if layout is None else layout.length
        for layer in self.layers:
            layer.length = min(layer.length, length)

    def commit(self, layout: TokenLayout) -> None:
        """Make the pending tokens (described by `layout`) part of the committed context."""
        self.layout = layout if self.layout is None else self.layout + layout
        for layer in self.layers:
            layer.length += layer.pending
            layer.pending = 0
