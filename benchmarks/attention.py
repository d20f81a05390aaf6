"""Self-attention of the joint video-action sequence: the platform's Triton kernels vs flex_attention vs SDPA.

    python benchmarks/attention.py            # on a GPU: the 14B head layout at 1x and 2x the DreamZero context
    python benchmarks/attention.py --quick    # fewer repeats
    python benchmarks/attention.py --fuse-rope  # also time RoPE fused into the kernels vs applied before

On a GPU (bf16, 40 heads x 128, 880 tokens per latent frame, 24 actions per chunk; 4 chunks = 13,300 tokens
and 8 chunks = 27,480): forward and forward+backward time of
  - triton: wam.trainer.kernels (tuned per layout; tuning time reported apart),
  - flex:   torch.compile(flex_attention) with the same layout's BlockMask (128-token tiles),
  - sdpa-masked: F.scaled_dot_product_attention with the dense boolean mask,
  - sdpa-dense: the same sequence with NO mask (flash/cuDNN): the throughput reference per FLOP,
and effective TFLOP/s counting only the work the mask allows (4·D·H per allowed pair forward, 2.5x that
backward) - except sdpa-dense, which is credited with all pairs. Ratios are of the same run.

On CPU there is no compiled Triton: the script checks the kernels in Triton's interpreter against SDPA on
small shapes, reports the 14B schedule's tile statistics, and says that timings need a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must be decided before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

from wam.platform.layout import TokenLayout  # noqa: E402
from wam.trainer.kernels import block_sparse_attention  # noqa: E402
from wam.trainer.kernels.schedule import KernelConfigs, PassConfig, build_schedule  # noqa: E402
from wam.trainer.kernels.tuning import tuning_log  # noqa: E402
from wam.trainer.model.mask import AttentionMask  # noqa: E402
from wam.trainer.model.rope import apply_rope, rope_tables  # noqa: E402

HEADS, HEAD_DIM, TOKENS_PER_FRAME, ACTIONS = 40, 128, 880, 24  # the 14B at 352x640, DROID
GRID = (22, 40)  # 880 patches per latent frame
BACKWARD_FACTOR = 2.5  # backward FLOPs per forward FLOP of attention (FlashAttention's accounting)


def _layout(chunks: int) -> TokenLayout:
    return TokenLayout.teacher_forcing(chunks, 2, TOKENS_PER_FRAME, ACTIONS)


def _time_ms(fn, quick: bool) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 200, return_mode="median")


def _qkv(length: int, dtype: torch.dtype, requires_grad: bool):
    return [torch.randn(1, length, HEADS, HEAD_DIM, device="cuda", dtype=dtype, requires_grad=requires_grad)
            for _ in range(3)]


def _runners(mask: AttentionMask, fuse_rope: bool):
    """name -> fn(q, k, v) returning (B, L, H, D), all on the (B, L, H, D) layout the model uses."""
    block_mask = mask.block_mask("cuda", 128)
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    dense = mask.dense("cuda")

    def transposed(fn):
        return lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    runners = {
        "triton": lambda q, k, v: block_sparse_attention(q, k, v, mask),
        "flex": transposed(lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask)),
        "sdpa-masked": transposed(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)),
        "sdpa-dense": transposed(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
    }
    if fuse_rope:
        cos, sin = rope_tables(mask.queries, GRID, HEAD_DIM, 10_000.0, torch.device("cuda"))
        rope = torch.compile(apply_rope)  # as in a compiled block: inductor fuses the rotation
        runners["triton+rope-before"] = lambda q, k, v: block_sparse_attention(rope(q, cos, sin), rope(k, cos, sin),
                                                                               v, mask)
        runners["triton+rope-fused"] = lambda q, k, v: block_sparse_attention(q, k, v, mask, rope=(cos, sin))
    return runners


def _measure(run, q, k, v, grad, quick: bool) -> tuple[float, float]:
    """(forward ms, forward+backward ms)."""
    with torch.no_grad():
        forward = _time_ms(lambda: run(q, k, v), quick)

    def step():
        q.grad = k.grad = v.grad = None
        run(q, k, v).backward(grad)

    return forward, _time_ms(step, quick)


def gpu_benchmark(chunks_list: list[int], quick: bool, fuse_rope: bool) -> dict:
    import time

    dtype = torch.bfloat16
    results: dict = {"device": torch.cuda.get_device_name(), "dtype": str(dtype), "layouts": {}}
    print(f"device: {results['device']}, {dtype}, {HEADS} heads x {HEAD_DIM}")
    for chunks in chunks_list:
        layout = _layout(chunks)
        mask = AttentionMask(layout)
        pairs, dense_pairs = layout.allowed_pairs(), layout.length**2
        useful = 4 * HEAD_DIM * HEADS * pairs  # forward FLOPs of the allowed work
        all_pairs = 4 * HEAD_DIM * HEADS * dense_pairs
        q, k, v = _qkv(layout.length, dtype, requires_grad=True)
        grad = torch.randn_like(q)
        start = time.perf_counter()
        block_sparse_attention(q, k, v, mask).backward(grad)  # tunes the tile sizes for this layout
        torch.cuda.synchronize()
        tuning_s = time.perf_counter() - start
        tuned = tuning_log()[-1] if tuning_log() else None  # the tile sizes chosen, each candidate's time
        rows = {}
        runners = _runners(mask, fuse_rope)
        with torch.no_grad():  # reported, not asserted: tests/test_gpu.py checks correctness; timings still count
            diff = (runners["triton"](q, k, v).float() - runners["flex"](q, k, v).float()).abs().max().item()
        for name, run in runners.items():
            fwd, both = _measure(run, q, k, v, grad, quick)
            flops = all_pairs if name == "sdpa-dense" else useful
            rows[name] = dict(forward_ms=fwd, forward_backward_ms=both, forward_tflops=flops / fwd / 1e9,
                              forward_backward_tflops=flops * (1 + BACKWARD_FACTOR) / both / 1e9)
        t, f, dense = rows["triton"], rows["flex"], rows["sdpa-dense"]
        summary = dict(
            tokens=layout.length, allowed_fraction=pairs / dense_pairs, tuning_s=tuning_s, tuning=tuned, results=rows,
            triton_vs_flex_max_abs_diff=diff,
            triton_vs_flex_speedup_forward_backward=f["forward_backward_ms"] / t["forward_backward_ms"],
            triton_vs_sdpa_masked_speedup_forward_backward=rows["sdpa-masked"]["forward_backward_ms"]
            / t["forward_backward_ms"],
            triton_tflops_vs_dense_sdpa_forward_backward=t["forward_backward_tflops"]
            / dense["forward_backward_tflops"],
        )
        results["layouts"][f"{chunks}_chunks"] = summary
        print(f"\n{chunks} chunks: {layout.length} tokens, {pairs / dense_pairs:.1%} of pairs allowed, "
              f"tuning {tuning_s:.1f} s, max |triton - flex| {diff:.2g}")
        print(f"{'kernel':<20} {'fwd ms':>8} {'fwd TFLOP/s':>12} {'fwd+bwd ms':>11} {'fwd+bwd TFLOP/s':>16}")
        for name, r in rows.items():
            print(f"{name:<20} {r['forward_ms']:>8.2f} {r['forward_tflops']:>12.1f} {r['forward_backward_ms']:>11.2f} "
                  f"{r['forward_backward_tflops']:>16.1f}")
        print(f"triton vs flex (fwd+bwd time): {summary['triton_vs_flex_speedup_forward_backward']:.2f}x; "
              f"vs masked SDPA: {summary['triton_vs_sdpa_masked_speedup_forward_backward']:.2f}x; "
              f"effective TFLOP/s vs dense SDPA: {summary['triton_tflops_vs_dense_sdpa_forward_backward']:.0%} "
              "(target: >= 1.0x flex, >= 60% of dense)")
    return results


def cpu_check() -> dict:
    """Interpreter correctness on small shapes, and the 14B schedule's statistics (no timings)."""
    results: dict = {"device": "cpu", "timings": "need a CUDA GPU (compiled Triton); none measured here"}
    print("No CUDA GPU: Triton kernels run in Triton's interpreter. Correctness only; timings need a GPU.")
    checks = {}
    for chunks, actions in ((1, 24), (3, 48)):
        layout = TokenLayout.teacher_forcing(chunks, 2, 8, actions)
        mask = AttentionMask(layout)
        q, k, v = (torch.randn(1, layout.length, 2, 16, requires_grad=True) for _ in range(3))
        out, lse = block_sparse_attention(q, k, v, mask, return_lse=True)
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask.dense()).transpose(1, 2)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
        error = max((a - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads), strict=True))
        checks[f"{chunks}_chunks_{actions}_actions"] = error
        print(f"  {chunks} chunk(s), {actions} actions, {layout.length} tokens: max |triton - sdpa| over out and "
              f"grads = {error:.2e}")
    results["interpreter_max_abs_error"] = checks
    configs = KernelConfigs(PassConfig(128, 64), PassConfig(128, 64), PassConfig(128, 64))
    results["schedules"] = {}
    for chunks in (4, 8):
        layout = _layout(chunks)
        schedule = build_schedule(((layout, layout),), configs, torch.device("cpu"))
        rows = schedule.forward.rows
        tiles = -(-layout.length // 128) * -(-layout.length // 64)
        full = int((rows[:, 4] - rows[:, 3]).sum())
        stats = dict(tokens=layout.length, allowed_pairs=layout.allowed_pairs() / layout.length**2,
                     visited_tiles=len(schedule.forward.tiles) / tiles,
                     partial_of_visited=1 - full / len(schedule.forward.tiles))
        results["schedules"][f"{chunks}_chunks"] = stats
        print(f"  14B layout, {chunks} chunks ({layout.length} tokens), 128x64 tiles: {stats['allowed_pairs']:.1%} of "
              f"pairs allowed, {stats['visited_tiles']:.1%} of tiles visited, {stats['partial_of_visited']:.1%} of "
              "those need the element-wise mask")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--fuse-rope", action="store_true", help="also time RoPE fused into the kernels")
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8], help="context sizes in chunks")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    if torch.cuda.is_available():
        results = gpu_benchmark(args.chunks, args.quick, args.fuse_rope)
    else:
        results = cpu_check()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
