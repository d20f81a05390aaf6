"""Python launchers of the attention kernels: grids, strides, tile sizes from a Schedule."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from triton import cdiv

from wam.trainer.kernels import triton_attention as kernels
from wam.trainer.kernels.schedule import Schedule

_LOG2E = 1.4426950408889634
_DELTA_BLOCK = 64


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact products, not TF32


def _rope_args(rope: Sequence[Tensor], like: Tensor) -> tuple[Tensor, ...]:
    if rope:
        return tuple(rope)
    unused = torch.empty(0, device=like.device, dtype=torch.float32)
    return unused, unused, unused, unused


def launch_forward(q: Tensor, k: Tensor, v: Tensor, s: Schedule, rope: Sequence[Tensor],
                    scale: float) -> tuple[Tensor, Tensor]:
    b, lq, h, d = q.shape
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, lq, device=q.device, dtype=torch.float32)
    c = s.configs.forward
    kernels.attention_forward[(s.forward.programs, h, b)](
        q, k, v, out, lse, s.q_meta, s.k_meta, s.forward.rows, s.forward.tiles, *_rope_args(rope, q),
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), lq, k.shape[1], scale * _LOG2E,
        HEAD_DIM=d, BLOCK_M=c.block, BLOCK_N=c.tile, ROPE=bool(rope), PRECISION=_precision(q.dtype),
        num_warps=c.num_warps, num_stages=c.num_stages)
    return out, lse


def launch_backward(grad: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                     lse: Tensor, s: Schedule, rope: Sequence[Tensor], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, grad = (t.contiguous() for t in (q, k, v, out, grad))  # gradients share their input's strides
    b, lq, h, d = q.shape
    delta = torch.empty_like(lse)
    kernels.attention_backward_delta[(cdiv(lq, _DELTA_BLOCK), h, b)](
        out, grad, delta, delta if grad_lse is None else grad_lse.contiguous(), *_strides(out), *_strides(grad), lq,
        HEAD_DIM=d, BLOCK_M=_DELTA_BLOCK, HAS_DLSE=grad_lse is not None)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (s.q_meta, s.k_meta)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad), lq, k.shape[1], scale, scale * _LOG2E)
    c = s.configs.dkdv
    kernels.attention_backward_dkdv[(s.dkdv.programs, h, b)](
        q, k, v, grad, dk, dv, lse, delta, *common, s.dkdv.rows, s.dkdv.tiles, *_rope_args(rope, q), *strides,
        HEAD_DIM=d, BLOCK_N=c.block, BLOCK_M=c.tile, ROPE=bool(rope), PRECISION=_precision(q.dtype),
        num_warps=c.num_warps, num_stages=c.num_stages)
    c = s.configs.dq
    kernels.attention_backward_dq[(s.dq.programs, h, b)](
        q, k, v, grad, dq, lse, delta, *common, s.dq.rows, s.dq.tiles, *_rope_args(rope, q), *strides,
        HEAD_DIM=d, BLOCK_M=c.block, BLOCK_N=c.tile, ROPE=bool(rope), PRECISION=_precision(q.dtype),
        num_warps=c.num_warps, num_stages=c.num_stages)
    return dq, dk, dv
