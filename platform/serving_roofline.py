"""The serving roofline: the least time a chunk can take on an accelerator, and what batching robots can gain.

A server denoises a chunk in `passes` transformer forwards over its session's KV cache (WamModel.predict; two
cache rows with classifier-free guidance) and then writes the observed frames into it (WamModel.observe). Each
forward takes at least the longer of its FLOPs at the chip's tensor-core peak (matmuls against weights at the
serving compute path's precision, attention in bf16) and its bytes at HBM bandwidth (the weights once per
forward, every row's cached keys and values). Chunks are averaged over a context window (chunk 0..K-1, the
cache growing). The engine denoises every session's chunk in the same forwards (continuous batching), so n
sessions cost one forward of n sessions' rows: where one session's forward is compute-bound, n sessions take n
times as long and batching gains nothing; where it is memory-bound, they share the weights' read.

This is a bound, not a prediction: kernel launches, Python, non-matmul operators and imperfect kernels only add
time (benchmarks/serve.py measures what runs). FLOPs come from the platform's accounting, which
tests/test_accounting.py checks against torch's FLOP counter on the real predict and observe.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from wam.platform.accelerators import Accelerator
from wam.platform.accounting import (
    FROZEN_ENCODER_PARAMS,
    FlopCount,
    block_params,
    context_layout,
    count_params,
    observation_flops,
    prediction_flops,
)
from wam.platform.config import SamplerSection, guided
from wam.platform.errors import ConfigError
from wam.platform.presets import SampleShape, WamArch

# Bytes per block weight of a serving compute path: NVFP4 is 4 bits plus an FP8 scale per 16 values.
WEIGHT_BYTES = {"nvfp4": 0.5 + 1 / 16, "fp8": 1.0, "bf16-dequantized": 2.0}
KV_BYTES = 2  # bf16 keys and values
_PEAKS = {"nvfp4": lambda acc: acc.peak_fp4_flops, "fp8": lambda acc: acc.peak_fp8_flops,
          "bf16-dequantized": lambda acc: acc.peak_bf16_flops}  # dense matmul peak of a compute path


@dataclass(frozen=True)
class ServingLoad:
    """What one session's chunk asks of the transformer."""

    passes: int  # transformer forwards per chunk: the sampler's steps, fewer with the DiT step cache
    rows: int  # cache rows per session: 2 with classifier-free guidance (conditional and unconditional)


@dataclass(frozen=True)
class ChunkTime:
    sessions: int  # chunks denoised together (one per session)
    seconds: float  # per chunk, at best
    compute_s: float  # of which the FLOPs at peak ...
    memory_s: float  # ... and the bytes at HBM bandwidth (summed over forwards; each forward takes the larger)

    @property
    def chunks_per_s(self) -> float:
        return self.sessions / self.seconds

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def rows_per_device(sampler: SamplerSection, devices: int) -> int:
    """Cache rows one session holds on a serving device: both guidance branches, or one of them when guidance runs
    in parallel on two devices (serving.devices 2)."""
    return 2 if guided(sampler) and devices == 1 else 1


def check_compute(acc: Accelerator, compute: str) -> None:
    """Refuse a serving compute path that `acc` has no matmuls for (the CPU's fp32 path included)."""
    if compute not in WEIGHT_BYTES:
        raise ConfigError(f"serving.compute = {compute} is the CPU's path; plan a GPU's with auto, nvfp4, fp8 or "
                          "bf16-dequantized")
    if not _PEAKS[compute](acc):
        raise ConfigError(f"serving.compute = {compute}: {acc.name} has no {compute} matmuls; use auto "
                          f"({acc.serving_compute} there) or bf16-dequantized")


def weight_bytes(a: WamArch, compute: str) -> float:
    """The served model's weights: its blocks at the compute path's precision, the rest (embeddings, heads, kept in
    bf16 by quantization) in bf16."""
    if compute not in WEIGHT_BYTES:
        raise ValueError(f"compute path {compute!r} is not one of {', '.join(WEIGHT_BYTES)}")
    blocks = a.num_layers * block_params(a)
    return WEIGHT_BYTES[compute] * blocks + 2 * (count_params(a).total - blocks)


def encoder_bytes(a: WamArch) -> float:
    """The frozen encoders a server holds in bf16 (it encodes every observation and prompt itself)."""
    return 2 * sum(FROZEN_ENCODER_PARAMS.get(name, 0) for name in (a.vae, a.image_encoder, a.text_encoder))


def kv_cache_bytes(a: WamArch, s: SampleShape, rows: int, element_bytes: int = KV_BYTES) -> int:
    """One session's KV cache (WamModel.new_cache: a context window of K chunks and room for one prediction, its
    prompt's cross-attention keys and values), for `rows` rows."""
    prediction = s.frames_per_chunk * s.tokens_per_frame(a) + s.actions_per_chunk + 1
    tokens = context_layout(a, s, s.num_chunks).length + prediction + a.text_len + a.image_tokens
    return rows * a.num_layers * 2 * a.dim * element_bytes * tokens


def sessions_that_fit(budget: float, cache_bytes: int, *, max_batch: int, compiled: bool = False,
                      blocks: int = 1, held: float = 0, activations: float = 0, transient: float = 0,
                      limit: int = 4096) -> int:
    """The most sessions whose KV caches (`cache_bytes` each, over `blocks` blocks) fit `budget` bytes, with what
    else serving takes: `held` bytes a session keeps besides its caches (its VAE stream's history), `activations`
    a session adds to a batched forward (a batch holds at most max_batch sessions), and `transient` bytes of one
    request's encoder work at its peak (the encoders serve one request at a time). Compiled, the engine keeps the
    caches as rows of one pool that its graphs read in place; each block's forward gathers the batch's keys and
    values (and appends the new ones to a second copy) inside the graph, one block at a time: twice a block's share
    of a batch's caches, which under CUDA graphs stays in their memory pool."""
    def needed(sessions: int) -> float:
        batch = min(sessions, max_batch)
        gathered = 2 * batch * cache_bytes / blocks if compiled else 0
        return sessions * (cache_bytes + held) + gathered + batch * activations + transient

    return next((n for n in range(limit) if needed(n + 1) > budget), limit)


def _matmul_peak(acc: Accelerator, compute: str) -> float:
    peak = _PEAKS[compute](acc)
    if not peak:
        raise ValueError(f"{acc.name} has no {compute} matmuls; use {acc.serving_compute}")
    return peak


def _forward(a: WamArch, flops: FlopCount, keys: int, rows: int, acc: Accelerator, compute: str,
             weights: float) -> tuple[float, float]:
    """(compute seconds, memory seconds) of one forward of `rows` cache rows attending to `keys` tokens each."""
    seconds = rows * (flops.linear / _matmul_peak(acc, compute)
                      + (flops.self_attention + flops.cross_attention) / acc.peak_bf16_flops)
    cached = rows * a.num_layers * 2 * a.dim * KV_BYTES * (keys + a.text_len + a.image_tokens)
    return seconds, (weights + cached) / acc.hbm_bytes_per_s


def chunk_time(a: WamArch, s: SampleShape, acc: Accelerator, load: ServingLoad, sessions: int = 1,
               compute: str | None = None) -> ChunkTime:
    """The least time per chunk when `sessions` sessions' chunks are denoised together on one `acc`, at the
    `compute` path (default: the chip's own, as serving.compute auto chooses)."""
    compute = compute or acc.serving_compute
    weights = weight_bytes(a, compute)
    rows = sessions * load.rows
    totals, compute_s, memory_s = [], 0.0, 0.0
    for chunk in range(s.num_chunks):
        context = context_layout(a, s, chunk).length
        total = 0.0
        for flops, forwards in ((prediction_flops(a, s, chunk), load.passes), (observation_flops(a, s, chunk), 1)):
            c, m = _forward(a, flops, context + flops.tokens, rows, acc, compute, weights)
            total += forwards * max(c, m)
            compute_s += forwards * c / s.num_chunks
            memory_s += forwards * m / s.num_chunks
        totals.append(total)
    return ChunkTime(sessions, statistics.fmean(totals), compute_s, memory_s)

