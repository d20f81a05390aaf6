"""Triton flash-attention kernels over the joint video-action sequence, block-sparse by schedule.

Tensors: q (B, Lq, H, D), k and v (B, Lk, H, D), any strides with a contiguous head dim; lse and delta
(B, H, Lq) fp32. One program per (schedule row, head, batch): the row names the block of tokens it owns
and the tiles it visits (schedule.py): `full` tiles first, with unmasked loads and no element-wise mask,
then `partial` tiles, where the mask is `wam.platform.layout.attends` itself, compiled by Triton and
evaluated on per-token (kind, chunk) metadata. Softmax in base 2 with fp32 statistics and accumulators
(FlashAttention-2); the backward recomputes probabilities from the saved log-sum-exp.

Fused RoPE (optional): q and k arrive un-rotated with per-token (cos, sin) tables, are rotated in fp32 on
load and cast back to the input dtype (as `apply_rope` does), and the gradients are rotated back in the
epilogue, so callers get gradients of the un-rotated inputs.

Written for Triton 3.9 with pointer arithmetic (no block pointers, no TMA descriptors), so the same code
runs compiled on Hopper/Blackwell and in Triton's CPU interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

from wam.platform.layout import attends


def _device_function(fn):
    """Compiled kernels inline jit functions. The interpreter runs them as plain Python on its own tensor
    type: calling them as interpreted jit functions re-patches triton.language on every call, which would
    dominate the CPU tests' time."""
    return fn if knobs.runtime.interpret else triton.jit(fn)


_attends = _device_function(attends)  # the mask's one definition, compiled into the kernels

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@_device_function
def _row(rows, pid):
    r = rows + pid * 6
    return tl.load(r), tl.load(r + 1), tl.load(r + 2), tl.load(r + 3), tl.load(r + 4), tl.load(r + 5)


@_device_function
def _load_tile(ptr, start, end, stride_l, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """(BLOCK, HEAD_DIM) rows [start, start + BLOCK) of a (L, D) view; rows >= end read as 0 when MASKED."""
    offs = start + tl.arange(0, BLOCK)
    ptrs = ptr + offs[:, None] * stride_l + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        return tl.load(ptrs, mask=(offs < end)[:, None], other=0.0)
    return tl.load(ptrs)


@_device_function
def _store_tile(ptr, value, start, end, stride_l, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    tl.store(ptr + offs[:, None] * stride_l + tl.arange(0, HEAD_DIM)[None, :], value, mask=(offs < end)[:, None])


@_device_function
def _load_rows(ptr, start, end, other, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    if MASKED:
        return tl.load(ptr + offs, mask=offs < end, other=other)
    return tl.load(ptr + offs)


@_device_function
def _load_meta(meta, length, start, end, BLOCK: tl.constexpr):
    """(kind, chunk) of tokens [start, start + BLOCK); tokens >= end are kind -1, which attends to nothing."""
    offs = start + tl.arange(0, BLOCK)
    inside = offs < end
    return tl.load(meta + offs, mask=inside, other=-1), tl.load(meta + length + offs, mask=inside, other=0)


@_device_function
def _rotate(x, cos, sin):
    """Rotate interleaved (real, imag) pairs of x (M, D) by per-row angles given as cos/sin (M, D/2), in fp32."""
    M: tl.constexpr = x.shape[0]
    D: tl.constexpr = x.shape[1]
    real, imag = tl.split(tl.reshape(x.to(tl.float32), (M, D // 2, 2)))
    return tl.reshape(tl.join(real * cos - imag * sin, real * sin + imag * cos), (M, D))


@_device_function
def _rope_tables(cos_ptr, sin_ptr, start, end, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    ptrs = offs[:, None] * (HEAD_DIM // 2) + tl.arange(0, HEAD_DIM // 2)[None, :]
    inside = (offs < end)[:, None]
    return tl.load(cos_ptr + ptrs, mask=inside, other=1.0), tl.load(sin_ptr + ptrs, mask=inside, other=0.0)


@_device_function
def _load_operand(ptr, start, end, stride_l, cos_ptr, sin_ptr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                  MASKED: tl.constexpr, ROPE: tl.constexpr):
    """A q or k tile, rotated by its tokens' RoPE angles when ROPE (rounded back to the input dtype)."""
    x = _load_tile(ptr, start, end, stride_l, BLOCK, HEAD_DIM, MASKED)
    if ROPE:
        cos, sin = _rope_tables(cos_ptr, sin_ptr, start, end, BLOCK, HEAD_DIM)
        x = _rotate(x, cos, sin).to(ptr.dtype.element_ty)
    return x


# -- forward -----------------------------------------------------------------------------------------------

@_device_function
def _forward_tile(acc, l_i, m_i, q, q_kind, q_chunk, K, V, stride_kl, stride_vl, k_meta, Lk, cos_k, sin_k,
                  k_start, k_end, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr,
                  MASKED: tl.constexpr, PRECISION: tl.constexpr):
    k = _load_operand(K, k_start, k_end, stride_kl, cos_k, sin_k, BLOCK_N, HEAD_DIM, MASKED, ROPE)
    v = _load_tile(V, k_start, k_end, stride_vl, BLOCK_N, HEAD_DIM, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (M, N), log2 units
    if MASKED:
        k_kind, k_chunk = _load_meta(k_meta, Lk, k_start, k_end, BLOCK_N)
        s = tl.where(_attends(q_kind[:, None], q_chunk[:, None], k_kind[None, :], k_chunk[None, :]), s, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # a row with nothing allowed so far keeps m = -inf; subtract 0 instead (p = 0, no NaN)
        m_new = tl.where(m_new == -float("inf"), 0.0, m_new)
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def attention_forward(
    Q, K, V, Out, LSE, q_meta, k_meta, rows, tiles, cos_q, sin_q, cos_k, sin_k,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh, Lq, Lk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, q_end, k_end, begin, mid, stop = _row(rows, pid)
    b64 = b.to(tl.int64)
    Q += b64 * stride_qb + h * stride_qh
    K += b64 * stride_kb + h * stride_kh
    V += b64 * stride_vb + h * stride_vh
    q = _load_operand(Q, q_start, q_end, stride_ql, cos_q, sin_q, BLOCK_M, HEAD_DIM, True, ROPE)
    q_kind, q_chunk = _load_meta(q_meta, Lq, q_start, q_end, BLOCK_M)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for t in range(begin, mid):
        acc, l_i, m_i = _forward_tile(acc, l_i, m_i, q, q_kind, q_chunk, K, V, stride_kl, stride_vl, k_meta, Lk,
                                      cos_k, sin_k, tl.load(tiles + t), k_end, qk_scale, BLOCK_N, HEAD_DIM, ROPE,
                                      False, PRECISION)
    for t in range(mid, stop):
        acc, l_i, m_i = _forward_tile(acc, l_i, m_i, q, q_kind, q_chunk, K, V, stride_kl, stride_vl, k_meta, Lk,
                                      cos_k, sin_k, tl.load(tiles + t), k_end, qk_scale, BLOCK_N, HEAD_DIM, ROPE,
                                      True, PRECISION)
    empty = l_i == 0.0  # padding rows only: every real token attends to something
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    _store_tile(Out + b64 * stride_ob + h * stride_oh, out.to(Out.dtype.element_ty), q_start, q_end, stride_ol,
                BLOCK_M, HEAD_DIM)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    tl.store(LSE + (b64 * tl.num_programs(1) + h) * Lq + offs_m, lse, mask=offs_m < q_end)


# -- backward ----------------------------------------------------------------------------------------------

@triton.jit
def attention_backward_delta(
    Out, DO, DELTA, DLSE, stride_ob, stride_ol, stride_oh, stride_db, stride_dl, stride_dh, Lq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(O * dO) - dLSE: the softmax backward's correction term (dLSE when lse is used)."""
    pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b64 = b.to(tl.int64)
    start = pid * BLOCK_M
    o = _load_tile(Out + b64 * stride_ob + h * stride_oh, start, Lq, stride_ol, BLOCK_M, HEAD_DIM, True)
    do = _load_tile(DO + b64 * stride_db + h * stride_dh, start, Lq, stride_dl, BLOCK_M, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs = start + tl.arange(0, BLOCK_M)
    row = (b64 * tl.num_programs(1) + h) * Lq
    if HAS_DLSE:
        delta -= tl.load(DLSE + row + offs, mask=offs < Lq, other=0.0)
    tl.store(DELTA + row + offs, delta, mask=offs < Lq)


@_device_function
def _dkdv_tile(dk, dv, k, v, k_kind, k_chunk, Q, DO, LSE, DELTA, stride_ql, stride_dl, q_meta, Lq, cos_q, sin_q,
               q_start, q_end, qk_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr,
               MASKED: tl.constexpr, PRECISION: tl.constexpr):
    q = _load_operand(Q, q_start, q_end, stride_ql, cos_q, sin_q, BLOCK_M, HEAD_DIM, MASKED, ROPE)
    do = _load_tile(DO, q_start, q_end, stride_dl, BLOCK_M, HEAD_DIM, MASKED)
    lse = _load_rows(LSE, q_start, q_end, float("inf"), BLOCK_M, MASKED) * LOG2E  # rows past the end: p = 0
    delta = _load_rows(DELTA, q_start, q_end, 0.0, BLOCK_M, MASKED)
    p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])  # (N, M)
    if MASKED:
        q_kind, q_chunk = _load_meta(q_meta, Lq, q_start, q_end, BLOCK_M)
        p_t = tl.where(_attends(q_kind[None, :], q_chunk[None, :], k_kind[:, None], k_chunk[:, None]), p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def attention_backward_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, q_meta, k_meta, rows, tiles, cos_q, sin_q, cos_k, sin_k,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_db, stride_dl, stride_dh, Lq, Lk, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, ROPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per key block: dK, dV over the query tiles that attend to it. DK/DV have K/V's strides."""
    pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_start, k_end, q_end, begin, mid, stop = _row(rows, pid)
    b64 = b.to(tl.int64)
    Q += b64 * stride_qb + h * stride_qh
    DO += b64 * stride_db + h * stride_dh
    row = (b64 * tl.num_programs(1) + h) * Lq
    k_off = b64 * stride_kb + h * stride_kh
    v_off = b64 * stride_vb + h * stride_vh
    k = _load_operand(K + k_off, k_start, k_end, stride_kl, cos_k, sin_k, BLOCK_N, HEAD_DIM, True, ROPE)
    v = _load_tile(V + v_off, k_start, k_end, stride_vl, BLOCK_N, HEAD_DIM, True)
    k_kind, k_chunk = _load_meta(k_meta, Lk, k_start, k_end, BLOCK_N)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    for t in range(begin, mid):
        dk, dv = _dkdv_tile(dk, dv, k, v, k_kind, k_chunk, Q, DO, LSE + row, DELTA + row, stride_ql, stride_dl,
                            q_meta, Lq, cos_q, sin_q, tl.load(tiles + t), q_end, qk_scale, BLOCK_M, HEAD_DIM, ROPE,
                            False, PRECISION)
    for t in range(mid, stop):
        dk, dv = _dkdv_tile(dk, dv, k, v, k_kind, k_chunk, Q, DO, LSE + row, DELTA + row, stride_ql, stride_dl,
                            q_meta, Lq, cos_q, sin_q, tl.load(tiles + t), q_end, qk_scale, BLOCK_M, HEAD_DIM, ROPE,
                            True, PRECISION)
    dk *= sm_scale
    if ROPE:  # back to the un-rotated k: rotate by the opposite angles
        cos, sin = _rope_tables(cos_k, sin_k, k_start, k_end, BLOCK_N, HEAD_DIM)
        dk = _rotate(dk, cos, -sin)
    _store_tile(DK + k_off, dk.to(DK.dtype.element_ty), k_start, k_end, stride_kl, BLOCK_N, HEAD_DIM)
    _store_tile(DV + v_off, dv.to(DV.dtype.element_ty), k_start, k_end, stride_vl, BLOCK_N, HEAD_DIM)


@_device_function
def _dq_tile(dq, q, do, lse, delta, q_kind, q_chunk, K, V, stride_kl, stride_vl, k_meta, Lk, cos_k, sin_k,
             k_start, k_end, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr,
             MASKED: tl.constexpr, PRECISION: tl.constexpr):
    k = _load_operand(K, k_start, k_end, stride_kl, cos_k, sin_k, BLOCK_N, HEAD_DIM, MASKED, ROPE)
    v = _load_tile(V, k_start, k_end, stride_vl, BLOCK_N, HEAD_DIM, MASKED)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
    if MASKED:
        k_kind, k_chunk = _load_meta(k_meta, Lk, k_start, k_end, BLOCK_N)
        p = tl.where(_attends(q_kind[:, None], q_chunk[:, None], k_kind[None, :], k_chunk[None, :]), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def attention_backward_dq(
    Q, K, V, DO, DQ, LSE, DELTA, q_meta, k_meta, rows, tiles, cos_q, sin_q, cos_k, sin_k,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_db, stride_dl, stride_dh, Lq, Lk, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per query block: dQ over the key tiles it attends to. DQ has Q's strides."""
    pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, q_end, k_end, begin, mid, stop = _row(rows, pid)
    b64 = b.to(tl.int64)
    q_off = b64 * stride_qb + h * stride_qh
    K += b64 * stride_kb + h * stride_kh
    V += b64 * stride_vb + h * stride_vh
    row = (b64 * tl.num_programs(1) + h) * Lq
    q = _load_operand(Q + q_off, q_start, q_end, stride_ql, cos_q, sin_q, BLOCK_M, HEAD_DIM, True, ROPE)
    do = _load_tile(DO + b64 * stride_db + h * stride_dh, q_start, q_end, stride_dl, BLOCK_M, HEAD_DIM, True)
    lse = _load_rows(LSE + row, q_start, q_end, float("inf"), BLOCK_M, True) * LOG2E
    delta = _load_rows(DELTA + row, q_start, q_end, 0.0, BLOCK_M, True)
    q_kind, q_chunk = _load_meta(q_meta, Lq, q_start, q_end, BLOCK_M)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for t in range(begin, mid):
        dq = _dq_tile(dq, q, do, lse, delta, q_kind, q_chunk, K, V, stride_kl, stride_vl, k_meta, Lk, cos_k, sin_k,
                      tl.load(tiles + t), k_end, qk_scale, BLOCK_N, HEAD_DIM, ROPE, False, PRECISION)
    for t in range(mid, stop):
        dq = _dq_tile(dq, q, do, lse, delta, q_kind, q_chunk, K, V, stride_kl, stride_vl, k_meta, Lk, cos_k, sin_k,
                      tl.load(tiles + t), k_end, qk_scale, BLOCK_N, HEAD_DIM, ROPE, True, PRECISION)
    dq *= sm_scale
    if ROPE:
        cos, sin = _rope_tables(cos_q, sin_q, q_start, q_end, BLOCK_M, HEAD_DIM)
        dq = _rotate(dq, cos, -sin)
    _store_tile(DQ + q_off, dq.to(DQ.dtype.element_ty), q_start, q_end, stride_ql, BLOCK_M, HEAD_DIM)
