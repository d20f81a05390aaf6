"""Rotary position embeddings of the joint sequence.

Video tokens use Wan's 3D RoPE: a head's dim/2 complex pairs are split into time / height / width parts
of c - 2*(c//3), c//3, c//3 pairs (c = head_dim/2), each with its own frequency ladder. Clean and noisy
copies of a frame share its position. Action and state tokens use 1D RoPE over the full head in their own
index spaces (action j of chunk i at i*actions_per_chunk + j; state i at i), as DreamZero does.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from wam.platform.layout import TokenKind, TokenLayout


def _inv_freq(pairs: int, theta: float) -> torch.Tensor:
    # Wan's rope_params(dim = 2*pairs): 1 / theta^(2k/dim), k < pairs, in float64.
    return 1.0 / theta ** (torch.arange(pairs, dtype=torch.float64) * 2 / (2 * pairs))


def _video_angles(frame_start: int, frames: int, grid: tuple[int, int], head_dim: int, theta: float) -> torch.Tensor:
    c = head_dim // 2
    t_pairs, s_pairs = c - 2 * (c // 3), c // 3
    h, w = grid
    f_pos = torch.arange(frame_start, frame_start + frames, dtype=torch.float64)
    ang_t = torch.outer(f_pos, _inv_freq(t_pairs, theta))[:, None, None, :].expand(frames, h, w, t_pairs)
    ang_h = torch.outer(torch.arange(h, dtype=torch.float64), _inv_freq(s_pairs, theta))
    ang_w = torch.outer(torch.arange(w, dtype=torch.float64), _inv_freq(s_pairs, theta))
    ang_h = ang_h[None, :, None, :].expand(frames, h, w, s_pairs)
    ang_w = ang_w[None, None, :, :].expand(frames, h, w, s_pairs)
    return torch.cat([ang_t, ang_h, ang_w], dim=-1).reshape(frames * h * w, c)


def _index_angles(start: int, length: int, head_dim: int, theta: float) -> torch.Tensor:
    pos = torch.arange(start, start + length, dtype=torch.float64)
    return torch.outer(pos, _inv_freq(head_dim // 2, theta))


@lru_cache(maxsize=64)
@unset_fake_temporarily()  # computed for real even inside a fake-tensor trace (`wam plan`): the cache outlives it
def _layout_angles(layout: TokenLayout, grid: tuple[int, int], head_dim: int, theta: float) -> torch.Tensor:
    parts = []
    for span in layout.spans:
        if span.kind in (TokenKind.FIRST, TokenKind.CLEAN, TokenKind.NOISY):
            parts.append(_video_angles(span.frame_start, span.frames, grid, head_dim, theta))
        elif span.kind == TokenKind.ACTION:
            parts.append(_index_angles(span.chunk * layout.actions_per_chunk, span.length, head_dim, theta))
        else:
            parts.append(_index_angles(span.chunk, span.length, head_dim, theta))
    return torch.cat(parts)


def rope_tables(layout: TokenLayout, grid: tuple[int, int], head_dim: int, theta: float,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (tokens, head_dim/2) fp32, for every token of `layout`; `grid` = patches per frame (h, w)."""
    angles = _layout_angles(layout, grid, head_dim, theta).to(device)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved (real, imag) pairs of x (B, L, heads, head_dim) by per-token angles (L, head_dim/2), or
    per-row ones (B, L, head_dim/2), in fp32."""
    b, n, h, d = x.shape
    pairs = x.float().reshape(b, n, h, d // 2, 2)
    real, imag = pairs.unbind(-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.reshape(b, n, h, d).type_as(x)
