"""KV cache for chunk-wise autoregressive inference.

Each block keeps preallocated K/V buffers: committed tokens (the clean context: first frame and the
observed chunks) followed by scratch room for one pending query (a chunk being denoised, or a chunk being
observed). A forward extends into the scratch room without copying the context; `commit` makes the
pending tokens part of the context, and writing chunk c again first truncates the context to before c
(its later entries were computed from the old chunk c).

A compiled serving engine keeps every session's caches as rows of one KVPool, which its compiled forward reads in
place (PooledRows): nothing is copied outside the graph, and CUDA graphs need no copy of their own.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from wam.platform.layout import TokenLayout
from wam.trainer.model.mask import AttentionMask


class KV(NamedTuple):
    k: torch.Tensor  # (B, L, heads, head_dim); RoPE already applied for self-attention
    v: torch.Tensor


class LayerCache:
    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        """k, v: (B, capacity, heads, head_dim) zeros (not empty: a padded batch reads unwritten positions under a
        mask, and 0 * NaN would leak), the cache's own or its rows of a KVPool."""
        self.k, self.v = k, v
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


class KVPool:
    """The KV caches of every session a compiled engine serves, preallocated as rows of one tensor per kind: the
    self-attention keys and values of every block, and the cross-attention keys and values of the prompt and the
    image. The compiled forward takes these tensors themselves and gathers a batch's rows block by block inside its
    graph (PooledRows, PooledContext), so a batch's caches are never copied whole; their addresses never change,
    so CUDA graphs read them in place instead of copying them into their own memory pool on every replay (torch's
    CUDA graph trees copy every input not marked static)."""

    def __init__(self, rows: int, blocks: int, capacity: int, heads: int, head_dim: int, text_len: int,
                 image_tokens: int | None, device: torch.device, dtype: torch.dtype):
        def zeros(tokens: int) -> torch.Tensor:
            tensor = torch.zeros(blocks, rows, tokens, heads, head_dim, device=device, dtype=dtype)
            torch._dynamo.mark_static_address(tensor)
            return tensor

        self.k, self.v = zeros(capacity), zeros(capacity)  # (blocks, rows, capacity, heads, head_dim)
        self.text = KV(zeros(text_len), zeros(text_len))
        self.image = KV(zeros(image_tokens), zeros(image_tokens)) if image_tokens else None
        self._taken = [False] * rows
        self._freed = threading.Condition(threading.RLock())  # RLock: a cache may be collected while it is held

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def free_rows(self) -> int:
        with self._freed:
            return self._taken.count(False)

    def take(self, rows: int, wait_s: float = 600.0) -> int:
        """The first of `rows` adjacent free rows, now taken. When none are free (the warm-up's sessions, or a
        closed session not yet collected, still hold them) it waits up to `wait_s` for some to be released: as long
        as a compiled warm-up may take, which a robot's first chunk waits for anyway."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._freed:
                start = next((s for s in range(len(self._taken) - rows + 1) if not any(self._taken[s:s + rows])),
                             None)
                if start is not None:
                    self._taken[start:start + rows] = [True] * rows
                    return start
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"all {len(self._taken)} rows of the compiled engine's KV-cache pool are "
                                       f"taken; no {rows} free for a new session (more sessions than it was sized "
                                       "for: serving.max_sessions)")
                self._freed.wait(min(left, 1.0))
            gc.collect()  # a closed session's caches in a reference cycle

    def release(self, start: int, rows: int) -> None:
        with self._freed:
            self._taken[start:start + rows] = [False] * rows
            self._freed.notify_all()

    def layer_caches(self, start: int, rows: int) -> list[LayerCache]:
        """Every block's cache over rows start..start+rows (views: what they write is the pool's)."""
        return [LayerCache(self.k[i, start:start + rows], self.v[i, start:start + rows]) for i in range(len(self.k))]

    def hand_out(self, cache: KVCache) -> None:
        """Give `cache`'s rows back to the pool once nothing refers to it any more."""
        weakref.finalize(cache, self.release, cache.pooled.start, cache.pooled.rows)

    def keep(self, block: int, at: PoolSlot, text: KV, image: KV | None) -> tuple[KV, KV | None]:
        """Write a block's cross-attention keys/values of a cache's prompt (and image) into its rows; their views."""
        def keep(pooled: KV, kv: KV) -> KV:
            k, v = pooled.k[block, at.start:at.start + at.rows], pooled.v[block, at.start:at.start + at.rows]
            k.copy_(kv.k)
            v.copy_(kv.v)
            return KV(k, v)

        return keep(self.text, text), None if image is None else keep(self.image, image)


class PoolSlot(NamedTuple):
    """Where a cache lives in a KVPool."""

    pool: KVPool
    start: int
    rows: int


class PooledRows(NamedTuple):
    """One block's committed keys/values of a batch of caches in a KVPool (predict_many, compiled): the pool's own
    tensors, gathered here, inside the compiled graph, at each batch row's pool row and the positions of the
    longest context in the batch (a shorter context's extra positions are masked). A prediction's new keys go
    after them, so the cache is not written and the shapes change only with the context's length."""

    k: torch.Tensor  # KVPool.k: (blocks, pool rows, capacity, heads, head_dim)
    v: torch.Tensor
    block: int
    rows: torch.Tensor  # (B,) int64: each batch row's pool row
    positions: torch.Tensor  # (context,) int64: 0..context-1

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> KV:
        at = (self.rows[:, None], self.positions)
        return KV(torch.cat([self.k[self.block][at], k], dim=1), torch.cat([self.v[self.block][at], v], dim=1))


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
    pooled: PoolSlot | None = None  # its rows of a compiled engine's KVPool
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
