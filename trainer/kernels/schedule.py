"""Block-sparse schedules of the attention kernels: which tiles each Triton program visits.

The forward and the dq pass run one program per query block, looping over key tiles; the dk/dv pass runs
one program per key block, looping over query tiles. A pass's schedule is two int32 tensors:

    rows  (programs, 6): block_start, block_end, other_end, begin, mid, stop
    tiles (n,):          first token of each visited tile of the other side

Program r owns the tokens [block_start, block_start + BLOCK) ∩ [.., block_end) of its side and visits the
tiles tiles[begin:mid] (entirely allowed: no element-wise mask) and tiles[mid:stop] (partly allowed: the
kernel evaluates the mask per element and bounds tiles at other_end). Tiles come from
`AttentionMask.block_layout` (spans -> tiles, the mask's one definition), computed once per (layouts, block
sizes, device) and cached. Rows are ordered heaviest first, so the longest programs start in the first wave.

A schedule may cover several segments packed along the token axis (a ragged batch: samples with different
numbers of chunks, or an inference query against its cache): blocks and tiles never cross a segment, and
tile offsets are absolute token positions of the packed tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from wam.platform.layout import TokenLayout
from wam.trainer.model.mask import AttentionMask, token_metadata

ROW_FIELDS = 6


@dataclass(frozen=True)
class PassConfig:
    """Tile sizes and launch parameters of one kernel pass: `block` is the side a program owns (queries for
    forward/dq, keys for dk/dv), `tile` the side it loops over."""

    block: int
    tile: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class KernelConfigs:
    forward: PassConfig
    dq: PassConfig
    dkdv: PassConfig


@dataclass(frozen=True)
class PassSchedule:
    rows: torch.Tensor  # (programs, 6) int32, heaviest first
    tiles: torch.Tensor  # (n,) int32 token offsets

    @property
    def programs(self) -> int:
        return self.rows.shape[0]


@dataclass(frozen=True)
class Schedule:
    """Everything the kernels need for one (segments, configs) pair, on one device."""

    q_meta: torch.Tensor  # (2, Lq) int32: token kind (-1 = nothing), chunk
    k_meta: torch.Tensor  # (2, Lk)
    forward: PassSchedule
    dq: PassSchedule
    dkdv: PassSchedule
    configs: KernelConfigs

    @property
    def q_len(self) -> int:
        return self.q_meta.shape[1]

    @property
    def k_len(self) -> int:
        return self.k_meta.shape[1]


def _pass_rows(segments: Sequence[tuple[AttentionMask, int, int]], block: int, tile: int,
               keys_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and tiles of one pass over all segments (mask, query offset, key offset)."""
    rows: list[list[int]] = []
    tile_lists: list[torch.Tensor] = []
    count = 0
    for mask, q_off, k_off in segments:
        lq, lk = mask.queries.length, mask.keys.length
        bq, bk = (tile, block) if keys_major else (block, tile)
        layout = mask.block_layout(bq, bk)
        visited, full = layout.visited, layout.full.clone()
        # A tile may skip the element-wise mask only if it lies inside the segment on both sides: its loads are
        # then unmasked, and no token of a neighbouring segment or past the end can leak in.
        if lq % bq:
            full[-1, :] = False
        if lk % bk:
            full[:, -1] = False
        if keys_major:
            visited, full = visited.T, full.T
        own_off, own_len, other_off, other_len = (k_off, lk, q_off, lq) if keys_major else (q_off, lq, k_off, lk)
        starts = other_off + torch.arange(visited.shape[1], dtype=torch.int32) * tile
        for i in range(visited.shape[0]):
            full_tiles = starts[full[i]]
            partial_tiles = starts[visited[i] & ~full[i]]
            rows.append([own_off + i * block, own_off + own_len, other_off + other_len,
                         count, count + len(full_tiles), count + len(full_tiles) + len(partial_tiles)])
            tile_lists += [full_tiles, partial_tiles]
            count += len(full_tiles) + len(partial_tiles)
    table = torch.tensor(rows, dtype=torch.int32).reshape(-1, ROW_FIELDS)
    work = (table[:, 5] - table[:, 3]).to(torch.int64)
    table = table[torch.argsort(-work, stable=True)]  # heaviest programs first
    tiles = torch.cat(tile_lists) if tile_lists else torch.zeros(0, dtype=torch.int32)
    return table, tiles.to(torch.int32)


def _packed_metadata(layouts: Sequence[TokenLayout]) -> torch.Tensor:
    kinds, chunks = zip(*(token_metadata(layout, torch.device("cpu")) for layout in layouts), strict=True)
    return torch.stack([torch.cat(kinds), torch.cat(chunks)]).to(torch.int32)


@lru_cache(maxsize=64)
def build_schedule(segments: tuple[tuple[TokenLayout, TokenLayout], ...], configs: KernelConfigs,
                   device: torch.device) -> Schedule:
    """The schedule of (query layout, key layout) segments packed in order, for `configs`, on `device`."""
    masks, placed, q_off, k_off = [], [], 0, 0
    for queries, keys in segments:
        mask = AttentionMask(queries, keys)
        masks.append(mask)
        placed.append((mask, q_off, k_off))
        q_off, k_off = q_off + queries.length, k_off + keys.length

    def one_pass(config: PassConfig, keys_major: bool) -> PassSchedule:
        rows, tiles = _pass_rows(placed, config.block, config.tile, keys_major)
        return PassSchedule(rows.to(device), tiles.to(device))

    return Schedule(
        q_meta=_packed_metadata([q for q, _ in segments]).to(device),
        k_meta=_packed_metadata([k for _, k in segments]).to(device),
        forward=one_pass(configs.forward, keys_major=False),
        dq=one_pass(configs.dq, keys_major=False),
        dkdv=one_pass(configs.dkdv, keys_major=True),
        configs=configs,
    )
