"""`block_sparse_attention`: the Triton kernels as one torch custom op with its own backward.

`wam::block_sparse_attention` returns (out, lse) and `wam::block_sparse_attention_backward` its gradients;
the autograd formula connects them and fake implementations let torch.compile trace them without running
them, so torch.compile and FSDP2 see one opaque op per call and no graph break.

The token layout travels as op arguments, as two small int32 CPU tables of spans (segment, kind, chunk,
length) for the queries and the keys. The op's implementation turns them into the block-sparse schedule
(schedule.py) and its tuned tile sizes once per (layout, shape, dtype, device) and caches them, so the
compiled graph holds no Python and the first real call, not the trace, does the work.

Runs on CUDA GPUs; on CPU only inside Triton's interpreter (`TRITON_INTERPRET=1` set before Triton is first
imported), which the tests use.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor
from triton import knobs

from wam.platform.layout import Span, TokenKind, TokenLayout
from wam.trainer.kernels.dispatch import launch_backward, launch_forward
from wam.trainer.kernels.schedule import KernelConfigs, Schedule, build_schedule
from wam.trainer.kernels.tuning import INTERPRETER, architecture, tuned_configs
from wam.trainer.model.mask import AttentionMask, RaggedMask

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _masks(mask: AttentionMask) -> tuple[AttentionMask, ...]:
    return mask.masks  # a RaggedMask's windows, or the mask alone


def span_tables(mask: AttentionMask | RaggedMask) -> tuple[Tensor, Tensor]:
    """(query spans, key spans): int32 CPU tensors (spans, 4) of (segment, kind, chunk, length)."""
    def build() -> tuple[Tensor, Tensor]:
        def table(layouts: Sequence[TokenLayout]) -> Tensor:
            rows = [[i, int(s.kind), s.chunk, s.length] for i, layout in enumerate(layouts) for s in layout.spans]
            return torch.tensor(rows, dtype=torch.int32)

        masks = _masks(mask)
        return table([m.queries for m in masks]), table([m.keys for m in masks])

    return mask.cached(("triton-spans",), build)


def _layouts(rows: tuple[tuple[int, ...], ...]) -> list[TokenLayout]:
    """Span table rows back to one layout per segment; only kind, chunk and length matter to the mask."""
    spans: dict[int, list[Span]] = {}
    for segment, kind, chunk, length in rows:
        spans.setdefault(segment, []).append(Span(TokenKind(kind), chunk, length))
    return [TokenLayout(tuple(s), 0, 0) for _, s in sorted(spans.items())]


def select_configs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, segments: tuple,
                   fused_rope: bool) -> KernelConfigs:
    """Tile configs for these shapes: fixed small ones in the interpreter; on a GPU the tuned winner for
    (architecture, dtype, shape, layouts), tuning on random inputs of that shape the first time."""
    if device.type == "cpu":
        if not knobs.runtime.interpret:
            raise RuntimeError("the triton attention backend runs on CUDA GPUs; on CPU it needs Triton's interpreter "
                               "(TRITON_INTERPRET=1 in the environment before starting; slow, meant for tests). "
                               "Use model.attention=sdpa on CPU.")
        return INTERPRETER
    if device.type != "cuda":
        raise RuntimeError(f"the triton attention backend does not run on {device.type}")
    arch = architecture(device)
    b, lq, h, d = shape

    def time_pass(name: str, configs: KernelConfigs) -> float:
        from triton.testing import do_bench

        schedule = build_schedule(segments, configs, device)
        lk = schedule.k_len
        q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype) for n in (lq, lk, lk))
        rope = [torch.ones(lq, d // 2, device=device), torch.zeros(lq, d // 2, device=device)] * 2 if fused_rope else []
        if name == "forward":
            return do_bench(lambda: launch_forward(q, k, v, schedule, rope, d ** -0.5))
        out, lse = launch_forward(q, k, v, schedule, rope, d ** -0.5)
        grad = torch.randn_like(out)
        return do_bench(lambda: launch_backward(grad, None, q, k, v, out, lse, schedule, rope, d ** -0.5))

    return tuned_configs((arch, dtype, shape, segments, fused_rope), arch, time_pass)


@lru_cache(maxsize=128)
def _cached_schedule(q_rows: tuple, k_rows: tuple, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                     fused_rope: bool) -> Schedule:
    segments = tuple(zip(_layouts(q_rows), _layouts(k_rows), strict=True))
    return build_schedule(segments, select_configs(shape, dtype, device, segments, fused_rope), device)


def _schedule(q: Tensor, q_spans: Tensor, k_spans: Tensor, fused_rope: bool) -> Schedule:
    """Keyed by the span tables' content (a few dozen ints), not by tensor identity."""
    q_rows, k_rows = (tuple(map(tuple, t.tolist())) for t in (q_spans, k_spans))
    return _cached_schedule(q_rows, k_rows, tuple(q.shape), q.dtype, q.device, fused_rope)


# -- the custom ops ----------------------------------------------------------------------------------------

@torch.library.custom_op("wam::block_sparse_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, q_spans: Tensor, k_spans: Tensor, rope: list[Tensor],
                  scale: float) -> tuple[Tensor, Tensor]:
    return launch_forward(q, k, v, _schedule(q, q_spans, k_spans, bool(rope)), rope, scale)


@_attention_op.register_fake
def _(q, k, v, q_spans, k_spans, rope, scale):
    b, lq, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.custom_op("wam::block_sparse_attention_backward", mutates_args=())
def _attention_backward_op(grad: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                           lse: Tensor, q_spans: Tensor, k_spans: Tensor, rope: list[Tensor],
                           scale: float) -> tuple[Tensor, Tensor, Tensor]:
    schedule = _schedule(q, q_spans, k_spans, bool(rope))
    return launch_backward(grad, grad_lse, q, k, v, out, lse, schedule, rope, scale)


@_attention_backward_op.register_fake
def _(grad, grad_lse, q, k, v, out, lse, q_spans, k_spans, rope, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, q_spans, k_spans, rope, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_spans, k_spans, *rope)
    ctx.scale = scale


def _backward(ctx, grad: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, q_spans, k_spans, *rope = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad, grad_lse, q, k, v, out, lse, q_spans, k_spans, rope, ctx.scale)
    return dq, dk, dv, None, None, [None] * len(rope), None  # a list[Tensor] input takes a list of gradients


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# -- the public function -----------------------------------------------------------------------------------

def _check(q: Tensor, k: Tensor, v: Tensor, masks: Sequence[AttentionMask], rope) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B, Lq, H, D) and k, v (B, Lk, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, lq, h, d = q.shape
    if k.shape[0] != b or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head size")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {', '.join(map(str, _DTYPES))}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head size {d} is not supported: the kernels need a power of two >= 16")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a contiguous last (head) dimension")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if len(masks) > 1 and b != 1:
        raise ValueError(f"a ragged batch of {len(masks)} samples is packed along the tokens: batch must be 1, got {b}")
    lq_mask, lk_mask = sum(m.queries.length for m in masks), sum(m.keys.length for m in masks)
    if lq != lq_mask or k.shape[1] != lk_mask:
        raise ValueError(f"the mask describes {lq_mask} queries and {lk_mask} keys, the tensors hold {lq} and "
                         f"{k.shape[1]}")
    if rope is not None:
        if any(m.queries != m.keys for m in masks):
            raise ValueError("fused RoPE needs queries and keys of one layout (self-attention without a KV cache)")
        cos, sin = rope
        if cos.shape != (lq, d // 2) or sin.shape != cos.shape:
            raise ValueError(f"RoPE tables must be ({lq}, {d // 2}), got {tuple(cos.shape)} and {tuple(sin.shape)}")


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | RaggedMask, *,
                           rope: tuple[Tensor, Tensor] | None = None, scale: float | None = None,
                           return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Masked attention of q (B, Lq, H, D) over k, v (B, Lk, H, D) that visits only the tiles `mask` allows.

    `mask` may be a RaggedMask: samples packed along the tokens (B = 1). `rope` = (cos, sin), each
    (L, D/2): q and k are un-rotated and get rotated inside the kernels (training self-attention only).
    Returns the output (B, Lq, H, D), and with `return_lse` the log-sum-exp of each query's scaled scores
    (B, H, Lq) in fp32; both are differentiable."""
    _check(q, k, v, _masks(mask), rope)
    q_spans, k_spans = span_tables(mask)
    tables = [] if rope is None else [t.float().contiguous() for t in (*rope, *rope)]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = _attention_op(q, k, v, q_spans, k_spans, tables, float(scale))
    return (out, lse) if return_lse else out
