"""The block-causal mask of a (query layout, key layout) pair in the three forms attention kernels consume.

`RaggedMask` packs several windows one after another along the token axis (a ragged batch, batch size 1):
each keeps its own mask and no token attends across windows.

All three come from `wam.platform.layout.attends`, the single definition of the mask:
  - `dense()`: a (Lq, Lk) boolean matrix for SDPA (CPU training, references);
  - `block_mask()`: a flex_attention BlockMask built from the block layout, with `attends` as mask_mod;
  - `block_layout()`: which (query block, key block) tiles have any allowed pair, and which are entirely
    allowed; what a block-sparse kernel visits. Computed from spans, never from the dense matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn.attention.flex_attention import BlockMask

from wam.platform.layout import TokenLayout, attends

_PAD_KIND = -1  # padding tokens attend to nothing and are attended by nothing


def token_metadata(layout: TokenLayout, device: torch.device, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (kind, chunk) int32 tensors, padded with kind -1 to a multiple of `pad_to`."""
    length = -(-layout.length // pad_to) * pad_to
    kinds = torch.full((length,), _PAD_KIND, dtype=torch.int32)
    chunks = torch.zeros(length, dtype=torch.int32)
    for span, offset in zip(layout.spans, layout.offsets, strict=True):
        kinds[offset:offset + span.length] = int(span.kind)
        chunks[offset:offset + span.length] = span.chunk
    return kinds.to(device), chunks.to(device)


@dataclass(frozen=True)
class BlockLayout:
    """Tile classification for block sizes (block_q, block_k): `partial` tiles need the mask applied
    element-wise, `full` tiles are entirely allowed, all other tiles are skipped."""

    block_q: int
    block_k: int
    partial: torch.Tensor  # (q_blocks, k_blocks) bool
    full: torch.Tensor  # (q_blocks, k_blocks) bool

    @property
    def visited(self) -> torch.Tensor:
        return self.partial | self.full

    def density(self) -> float:
        return self.visited.float().mean().item()


def _span_block_overlap(layout: TokenLayout, block: int) -> torch.Tensor:
    """(blocks, spans) bool: does block b contain any token of span s."""
    n_blocks = -(-layout.length // block)
    starts = torch.arange(n_blocks) * block
    ends = torch.clamp(starts + block, max=layout.length)
    span_start = torch.tensor(layout.offsets)
    span_end = span_start + torch.tensor([s.length for s in layout.spans])
    return (span_start[None, :] < ends[:, None]) & (span_end[None, :] > starts[:, None])


def _packed_metadata(layouts: tuple[TokenLayout, ...], device: torch.device,
                     pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (kind, chunk, window) of layouts packed in order, padded with kind -1 to a multiple of `pad_to`."""
    kinds, chunks = (torch.cat(t) for t in zip(*(token_metadata(layout, torch.device("cpu")) for layout in layouts),
                                               strict=True))
    windows = torch.repeat_interleave(torch.arange(len(layouts), dtype=torch.int32),
                                      torch.tensor([layout.length for layout in layouts]))
    pad = -len(kinds) % pad_to
    kinds = torch.cat([kinds, torch.full((pad,), _PAD_KIND, dtype=torch.int32)])
    chunks, windows = (torch.cat([t, torch.zeros(pad, dtype=torch.int32)]) for t in (chunks, windows))
    return kinds.to(device), chunks.to(device), windows.to(device)


class AttentionMask:
    """Mask of `queries` attending to `keys` (keys = queries for a full training sequence)."""

    def __init__(self, queries: TokenLayout, keys: TokenLayout | None = None):
        self.queries = queries
        self.keys = keys if keys is not None else queries
        self._cache: dict[tuple, object] = {}

    @property
    def masks(self) -> tuple[AttentionMask, ...]:
        """The windows packed along the tokens, each with its own mask: this one alone."""
        return (self,)

    def _metadata(self, device: torch.device, pad_to: int = 1) -> tuple[tuple[torch.Tensor, ...], ...]:
        """((kind, chunk, window) of the queries, the same of the keys): per-token int32 tensors."""
        return tuple(_packed_metadata(tuple(getattr(m, side) for m in self.masks), device, pad_to)
                     for side in ("queries", "keys"))

    def _span_allowed(self) -> torch.Tensor:
        """(query spans, key spans) bool: `attends` per span pair, False between different windows."""
        return torch.block_diag(*(torch.tensor(m.queries.span_allowed(m.keys)) for m in self.masks))

    def cached(self, key: tuple, build):
        """`build()` once per key: every form of this mask (and the kernels' schedules) is made once."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        def build() -> torch.Tensor:
            (qk, qc, qw), (kk, kc, kw) = self._metadata(torch.device(device))
            return attends(qk[:, None], qc[:, None], kk[None, :], kc[None, :]) & (qw[:, None] == kw[None, :])

        return self.cached(("dense", str(device)), build)

    def split_queries(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(full, partial) int64 query indices: the tokens that attend to every key, and those that may not. A
        served chunk's partial ones are its one state token (it sees only itself): the others need no mask."""
        def build() -> tuple[torch.Tensor, torch.Tensor]:
            full = self._span_allowed().all(dim=1).tolist()  # per query span, of every packed window in order
            rows: tuple[list, list] = ([], [])
            start = 0
            for span, sees_all in zip((s for m in self.masks for s in m.queries.spans), full, strict=True):
                rows[0 if sees_all else 1].extend(range(start, start + span.length))
                start += span.length
            return tuple(torch.tensor(r, dtype=torch.long, device=device) for r in rows)

        return self.cached(("split", str(device)), build)

    def block_layout(self, block_q: int = 128, block_k: int = 128) -> BlockLayout:
        def build() -> BlockLayout:
            allowed = self._span_allowed().float()
            q_overlap = _span_block_overlap(self.queries, block_q).float()
            k_overlap = _span_block_overlap(self.keys, block_k).float()
            any_allowed = (q_overlap @ allowed @ k_overlap.T) > 0
            any_forbidden = (q_overlap @ (1 - allowed) @ k_overlap.T) > 0
            return BlockLayout(block_q, block_k, partial=any_allowed & any_forbidden, full=any_allowed & ~any_forbidden)

        return self.cached(("blocks", block_q, block_k), build)

    def block_mask(self, device: torch.device | str, block_size: int = 128) -> BlockMask:
        def build() -> BlockMask:
            dev = torch.device(device)
            tiles = self.block_layout(block_size, block_size)
            (qk, qc, qw), (kk, kc, kw) = self._metadata(dev, pad_to=block_size)

            def mask_mod(b, h, q_idx, kv_idx):
                return attends(qk[q_idx], qc[q_idx], kk[kv_idx], kc[kv_idx]) & (qw[q_idx] == kw[kv_idx])

            def as_indices(tiles_bool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                counts = tiles_bool.sum(-1, dtype=torch.int32)
                order = torch.argsort((~tiles_bool).to(torch.int8), dim=-1, stable=True).to(torch.int32)
                return counts[None, None].to(dev), order[None, None].contiguous().to(dev)

            kv_num, kv_idx = as_indices(tiles.partial)
            full_num, full_idx = as_indices(tiles.full)
            return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                            mask_mod=mask_mod, seq_lengths=(self.queries.length, self.keys.length))

        return self.cached(("flex", str(device), block_size), build)


class RaggedMask(AttentionMask):
    """Windows packed one after another along the token axis (a ragged batch: windows with different numbers
    of chunks, batch size 1). Each keeps its own mask; no token attends across windows. `dense()` is the whole
    block-diagonal matrix; SDPA attends window by window with the windows' own dense masks instead."""

    def __init__(self, masks: Sequence[AttentionMask]):
        if not masks:
            raise ValueError("a ragged batch needs at least one window")
        self._masks = tuple(masks)
        queries, keys = masks[0].queries, masks[0].keys
        for mask in self._masks[1:]:
            queries, keys = queries + mask.queries, keys + mask.keys
        super().__init__(queries, keys)

    @property
    def masks(self) -> tuple[AttentionMask, ...]:
        return self._masks


class PaddedMask(NamedTuple):
    """A dense per-row mask (B, 1, Lq, Lk) of a padded batch (the serving engine's rows sit at different chunks,
    their keys padded to one length); attention over it always runs SDPA. `full`/`partial`: split_queries'
    indices, made with the mask (outside a compiled forward)."""

    rows: torch.Tensor
    full: torch.Tensor
    partial: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor) -> PaddedMask:
        sees_all = rows.all(dim=-1).all(dim=0).squeeze(0)  # (Lq,): the queries every row lets see every key
        return cls(rows, sees_all.nonzero().squeeze(1), (~sees_all).nonzero().squeeze(1))

    def dense(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.rows

    def split_queries(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return self.full, self.partial
