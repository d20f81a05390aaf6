"""The NVFP4 weight format: FP4 E2M1 values, one FP8 E4M3 scale per 16 consecutive elements of a row and one
FP32 scale per tensor (NVIDIA's two-level scheme; the same numerics as torchao's NVFP4Tensor, see the tests).

A weight (N, K), K a multiple of 16, becomes
  packed        (N, K/2)  uint8           element 2j in the low nibble, 2j+1 in the high one; nibble =
                                          sign bit (8) | E2M1 magnitude code (0..7 = 0 .5 1 1.5 2 3 4 6)
  scales        (N, K/16) float8_e4m3fn   amax of the block / 6 / global_scale, rounded to E4M3
  global_scale  ()        float32         amax of the tensor / (448 * 6)
and weight ~= fp4(packed) * scales * global_scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 16
FP4_MAX = 6.0
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
FP8_TINY = torch.finfo(torch.float8_e4m3fn).tiny  # smallest normal scale; an all-zero block gets it

_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes, and whether a value exactly on one rounds up: ties go to the
# even code (round half to even, as the hardware conversion does).
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


@dataclass
class NVFP4Weight:
    packed: torch.Tensor  # (N, K/2) uint8
    scales: torch.Tensor  # (N, K/16) float8_e4m3fn
    global_scale: torch.Tensor  # () float32

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.global_scale.nbytes


def quantizable(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[1] % BLOCK == 0 and shape[1] > 0


def encode_fp4(x: torch.Tensor) -> torch.Tensor:
    """float32 values already in [-6, 6] -> E2M1 codes (uint8, sign in bit 3), rounded to nearest, ties to even."""
    magnitude = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for midpoint, tie_up in _MIDPOINTS:
        code += (magnitude >= midpoint if tie_up else magnitude > midpoint).to(torch.uint8)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def decode_fp4(code: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(_MAGNITUDES + tuple(-m for m in _MAGNITUDES), dtype=torch.float32, device=code.device)
    return table[code.long()]


def quantize(weight: torch.Tensor) -> NVFP4Weight:
    """Quantize a 2D weight (N, K) with K a multiple of 16. NaN or Inf is refused: it would poison a block."""
    if not quantizable(tuple(weight.shape)):
        raise ValueError(f"NVFP4 takes 2D weights whose rows are multiples of {BLOCK}, got {tuple(weight.shape)}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or Inf values")
    n, k = w.shape
    amax = w.abs().amax()
    # An all-zero tensor keeps scale 1 (torchao would divide by zero); its blocks quantize to exact zeros.
    global_scale = amax / (FP8_MAX * FP4_MAX) if amax > 0 else torch.ones((), dtype=torch.float32)
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    block_scale = blocks.abs().amax(dim=-1) / FP4_MAX
    scales = torch.clamp(block_scale / global_scale, min=FP8_TINY, max=FP8_MAX).to(torch.float8_e4m3fn)
    # Multiply by the reciprocal of the combined scale, in this order, as the reference kernels do.
    reciprocal = (1.0 / global_scale) / scales.float()
    scaled = torch.clamp(blocks * reciprocal.unsqueeze(-1), -FP4_MAX, FP4_MAX).reshape(n, k)
    codes = encode_fp4(scaled)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return NVFP4Weight(packed.contiguous(), scales, global_scale.reshape(()).float())


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) E2M1 codes."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def dequantize(q: NVFP4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = q.shape
    values = decode_fp4(unpack(q.packed)).view(n, k // BLOCK, BLOCK)
    scales = q.global_scale * q.scales.float()
    return (values * scales.unsqueeze(-1)).view(n, k).to(dtype)
