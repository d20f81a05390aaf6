"""Policy serving and NVFP4 quantization, with the obvious alternatives measured in the same run.

1. Per-chunk denoising latency (p50/p99) of the last chunk of a context window: against the session's KV
   cache vs recomputing the whole sequence every denoising step, with 1 and 4 steps; and DreamZero's sampler
   built up (UniPC 16 steps, + guidance 5 batched or as two passes, + the DiT cache on 8 of the 16 steps).
   CPU: the tiny preset (fp32); with CUDA also a model of the 14B block width (dim 5120, 40 heads; --layers
   of them, bf16). And one served chunk's self-attention at the 14B token layout (880 tokens per latent
   frame, the last chunk of the window): SDPAKernel, which runs every query but the state token unmasked, vs
   SDPA under the dense mask (CPU: 4 heads of 128, fp32; CUDA: 40 heads, bf16). And a served chunk's encoding
   (--encoding below; with --quick 3 sessions).
2. Quantization: throughput (MB of float32 weights per second) and peak memory growth of the streaming
   quantizer vs loading the whole model first, on one checkpoint, each in a fresh process.
3. A burst of oversized requests (several clients at once, each sending a message larger than
   serving.max_request_mb): the server's peak memory growth when it refuses each from its frame header (ours)
   vs when websockets buffers up to 4x the limit and the size is checked after reading (the obvious
   alternative, and what this server did before), each server in a fresh process.

4. With --ablation (issue 20), in one run: DreamZero's speed-ups built up as the paper measures them (baseline
   UniPC 16 steps, guidance sequential, eager, no DiT cache -> + guidance batched (and on two processes/devices)
   -> + DiT cache -> + compile (CUDA graphs on CUDA) -> + quantized compute -> + Flash 1 step), per-chunk p50/p99,
   speed-up over the baseline and the action deviation from the baseline's actions on held-out windows; and
   1, 4 and 8 concurrent closed-loop sessions through the engine, batched vs one at a time, eager and compiled
   (each engine warmed up first, as `wam serve` does). CPU: the tiny preset and a model of 512-wide blocks;
   with CUDA: blocks of the 14B width (bf16).

    python benchmarks/serve.py [--quick] [--json out.json]
    python benchmarks/serve.py --ablation [--threads 1] [--model Q --data HELD_OUT] [--flash-model Q] [--json out.json]
    python benchmarks/serve.py --concurrency [--threads 1]      # only the concurrent sessions, eager and compiled
    python benchmarks/serve.py --threads-choice [--json out.json]
    python benchmarks/serve.py --memory [--json out.json]
    python benchmarks/serve.py --record [--chunks 60] [--json out.json]
    python benchmarks/serve.py --encoding [--threads 1] [--json out.json]

6. With --memory: serving memory at the 14B block width (2 blocks, bf16, guided sessions at their last chunk),
   traced on fake tensors as the admission traces it (wam.trainer.serve.memory; no memory is allocated, so it runs
   on a CPU): the weights, every session's KV cache and VAE stream, the activations a predict_many and an
   observe_many of 1, 4 and 8 sessions allocate and one request's own work, next to the peaks the H200 measured
   for the same blocks (docs/gpu-runs) and to what the admission counts.

7. With --record: the session recording's cost (serving.record): one robot's round trip through the policy server
   (the tiny preset, random weights, frames at DROID's 180x320) with its session recorded to a local folder vs
   not, the two servers on one runtime, their chunks interleaved (which goes first alternating): p50/p99 and the
   ratio, and what a chunk's recording takes on disk.

8. With --encoding: what a served chunk costs besides its denoising, the frozen encoders' work as a session runs
   it: a chunk's observed frames through the session's causal VAE stream, a new context window (first frame, CLIP
   features, the image-to-video channels over the window; every RoboArena call opens one), and 8 robots' chunks
   encoded one after another vs in one batched call (the ceiling), and 8 robots' chunks and new windows arriving
   at once through the server's encoder (wam.trainer.serve.encoding: the first alone, the rest batched while it
   runs) vs through it one at a time; next to the same preset's per-chunk denoising with DreamZero's sampler.
   CPU: the tiny preset; with CUDA also the 14B preset's canvas (bf16).

5. With --threads-choice: one robot through the engine on the CPU (eager; the tiny preset and the 512-wide
   blocks) at 1 torch thread, at every core, and at the engine's own choice (serving.cpu_threads unset: the
   faster of the two at a forward, measured at start): chunks per second and p50 per chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from wam.platform.accelerators import detect  # noqa: E402
from wam.platform.config import SamplerSection, load_config, resolve_preset  # noqa: E402
from wam.platform.serving_roofline import (  # noqa: E402
    WEIGHT_BYTES,
    ServingLoad,
    chunk_time,
    kv_cache_bytes,
    rows_per_device,
    weight_bytes,
)
from wam.trainer.flow import transformer_passes  # noqa: E402
from wam.trainer.inference import ChunkRollout  # noqa: E402
from wam.trainer.model import WamInputs  # noqa: E402
from wam.trainer.quantize.quantizer import quantize_checkpoint  # noqa: E402

from conftest import randomized_model, write_checkpoint  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(fn, device: str, repeats: int) -> dict:
    """p50/p99 milliseconds of `fn` after two warm-up calls."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": statistics.median(samples), "p99_ms": percentile(samples, 0.99)}


class LastChunk:
    """A model of `overrides` with random weights, and rollouts at the last chunk of a full context window."""

    def __init__(self, overrides: list[str], device: str, dtype: torch.dtype):
        preset = resolve_preset(load_config(None, overrides))
        self.sample = preset.sample
        self.model = randomized_model(preset.arch, preset.sample).to(device=device, dtype=dtype)
        self.inputs = WamInputs.random(preset.arch, preset.sample, batch=1, seed=0, device=device)
        self.state = self.inputs.state[:, -1]

    def rollout(self, sampler: SamplerSection) -> ChunkRollout:
        s, x = self.sample, self.inputs
        k, f = s.num_chunks, s.frames_per_chunk
        rollout = ChunkRollout(self.model, sampler, s,
                               negative_text=torch.zeros_like(x.text[:1]))  # a negative prompt's features
        rollout.reset(x.video[:, :, :1], x.text, x.image, x.i2v_cond)
        for c in range(k - 1):
            rollout.observe(x.video[:, :, 1 + c * f:1 + (c + 1) * f])
        return rollout


@torch.no_grad()
def chunk_latency(setup: LastChunk, device: str, repeats: int) -> dict:
    rows = {}
    for steps in (1, 4):
        rollout = setup.rollout(SamplerSection(steps=steps))

        def uncached(steps=steps) -> None:  # what a server without a cache does: the whole sequence, every step
            for _ in range(steps):
                setup.model(setup.inputs)

        timings = {"kv_cache": timed(lambda rollout=rollout: rollout.act(setup.state), device, repeats),
                   "recompute": timed(uncached, device, repeats)}
        timings["speedup_p50"] = timings["recompute"]["p50_ms"] / timings["kv_cache"]["p50_ms"]
        rows[f"{steps}_steps"] = timings
        print(f"{steps} step(s): KV cache {timings['kv_cache']['p50_ms']:.1f} ms, recompute "
              f"{timings['recompute']['p50_ms']:.1f} ms", file=sys.stderr, flush=True)
    return rows


# DreamZero's sampler built up: UniPC at 16 steps, guidance 5 as one batched forward or two passes, the DiT cache.
SAMPLERS = {
    "unipc_16": SamplerSection(solver="unipc", steps=16),
    "guided_batched": SamplerSection(solver="unipc", steps=16, guidance=5.0),
    "guided_sequential": SamplerSection(solver="unipc", steps=16, guidance=5.0, guidance_batch=False),
    "dreamzero": SamplerSection(solver="unipc", steps=16, guidance=5.0, dit_cache="static", dit_passes=8),
}


@torch.no_grad()
def sampler_latency(setup: LastChunk, device: str, repeats: int, names: list[str] | None = None) -> dict:
    """Per-chunk latency of each of SAMPLERS (or those `names`), and the transformer passes it ran."""
    rows = {}
    for name in names or SAMPLERS:
        rollout = setup.rollout(SAMPLERS[name])
        rows[name] = {**timed(lambda rollout=rollout: rollout.act(setup.state), device, repeats),
                      "transformer_passes": rollout.act(setup.state).forwards}
        print(f"{name}: {rows[name]['p50_ms']:.1f} ms", file=sys.stderr, flush=True)
    return rows


def served_encoding(repeats: int) -> dict:
    """--encoding: chunk_encoding next to the same preset's per-chunk denoising (DreamZero's sampler)."""
    tiny = ["sample.actions_per_chunk=24"]
    denoise = sampler_latency(LastChunk(tiny, "cpu", torch.float32), "cpu", repeats, ["dreamzero"])["dreamzero"]
    results = {"cpu_tiny": {**chunk_encoding(tiny, "cpu", repeats), "denoise_dreamzero": denoise}}
    if torch.cuda.is_available():
        results["cuda_14b"] = chunk_encoding(["model.preset=dreamzero-14b"], "cuda", repeats)
    return results


@torch.no_grad()
def chunk_encoding(overrides: list[str], device: str, repeats: int, sessions: int = 8) -> dict:
    """What a served chunk costs besides its denoising: the frozen encoders' work (the preset's VAE and CLIP networks;
    random weights where only published checkpoints exist), as a session runs it (wam.trainer.serve.policy). A chunk's
    observed frames continuing the session's causal VAE stream; a new context window (its first frame, the CLIP
    image features and the image-to-video channels over the window: what every RoboArena call pays); and `sessions`
    robots' chunks encoded one after another vs in one batched call (the ceiling); and the same robots' chunks, and
    their new windows (a fifth of the repeats: they take longer), arriving at once through the server's encoder,
    which batches those that wait (BatchedEncoder), vs through it one at a time (max_batch 1: the server before it
    batched)."""
    from wam.trainer.model.vae import StreamState
    from wam.trainer.serve.encoding import BatchedEncoder

    cfg = load_config(None, overrides)
    preset = resolve_preset(cfg)
    sample, canvas = preset.sample, preset.sample.canvas(preset.arch)
    encoders = frozen_encoders(cfg, torch.device(device))
    frames = encoders.vae.cfg.temporal_stride * sample.frames_per_chunk
    window = sample.window_frames  # latent frames of the image-to-video channels
    generator = torch.Generator().manual_seed(0)
    pixels = lambda batch, t: torch.randint(0, 256, (batch, 3, t, *canvas), generator=generator,  # noqa: E731
                                            dtype=torch.uint8).to(device)

    def stream(batch: int) -> StreamState:  # a session's stream after its window's first frame
        state = StreamState()
        encoders.vae.encode_stream(encoders.unit_range(pixels(batch, 1)), state)
        return state

    one, chunk = stream(1), pixels(1, frames)
    streams, chunks = [stream(1) for _ in range(sessions)], [pixels(1, frames) for _ in range(sessions)]
    together, batched = stream(sessions), torch.cat(chunks)
    first = pixels(1, 1)
    rows = {"canvas": list(canvas), "frames_per_chunk": frames, "window_latent_frames": window, "sessions": sessions,
            "observed_chunk": timed(lambda: encoders.vae.encode_stream(encoders.unit_range(chunk), one), device,
                                    repeats),
            "new_window": timed(lambda: encoders.encode_clip(first, stream=StreamState(), i2v_frames=window), device,
                                repeats),
            "sessions_one_at_a_time": timed(lambda: [encoders.vae.encode_stream(encoders.unit_range(c), s)
                                                     for c, s in zip(chunks, streams, strict=True)], device, repeats),
            "sessions_batched": timed(lambda: encoders.vae.encode_stream(encoders.unit_range(batched), together),
                                      device, repeats)}
    rows["batched_speedup_p50"] = rows["sessions_one_at_a_time"]["p50_ms"] / rows["sessions_batched"]["p50_ms"]

    firsts = [pixels(1, 1) for _ in range(sessions)]

    def arriving_at_once(max_batch: int, windows: bool) -> dict:
        """`sessions` robots' chunks (or new windows) sent at once, each from its own thread, as a server gets them."""
        encoder, calls = BatchedEncoder(encoders, threading.Lock(), max_batch), []
        hook = encoders.vae.encoder.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
        work = ([lambda f=f: encoder.open_window(f, StreamState(), window) for f in firsts] if windows else
                [lambda c=c, s=s: encoder.encode(c, s) for c, s in zip(chunks, streams, strict=True)])

        def robots() -> None:
            threads = [threading.Thread(target=w) for w in work]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        try:
            return {**timed(robots, device, max(1, repeats // 5) if windows else repeats),
                    "mean_batch": sum(calls) / len(calls)}
        finally:
            hook.remove()

    for kind, windows in (("chunks", False), ("windows", True)):
        rows[f"server_{kind}_one_at_a_time"] = arriving_at_once(1, windows)
        rows[f"server_{kind}_batching"] = arriving_at_once(sessions, windows)
        rows[f"server_{kind}_speedup_p50"] = (rows[f"server_{kind}_one_at_a_time"]["p50_ms"]
                                              / rows[f"server_{kind}_batching"]["p50_ms"])
    print(f"encoding: a chunk's {frames} frames {rows['observed_chunk']['p50_ms']:.1f} ms, a new window "
          f"{rows['new_window']['p50_ms']:.1f} ms, {sessions} sessions' chunks batched "
          f"{rows['batched_speedup_p50']:.2f}x one at a time; arriving at once through the server's encoder, chunks "
          f"{rows['server_chunks_speedup_p50']:.2f}x, new windows {rows['server_windows_speedup_p50']:.2f}x",
          file=sys.stderr, flush=True)
    return rows


@torch.no_grad()
def solver_batching(overrides: list[str], device: str, sessions: int = 8, repeats: int = 50) -> dict:
    """The serving engine's solver steps for `sessions` sessions out of phase (each at its own step of DreamZero's
    16 UniPC steps, video and actions as a served chunk shapes them): batched (FlowUniPC.step_many) vs one
    session at a time, p50/p99 ms per engine step (on CUDA the kernels' time included)."""
    from wam.trainer.flow import FlowUniPC, unipc_schedule

    preset = resolve_preset(load_config(None, overrides))
    arch, s = preset.arch, preset.sample
    shapes = ((1, arch.out_dim, s.frames_per_chunk, s.latent_height, s.latent_width),
              (1, s.actions_per_chunk, arch.action_dim))
    sigmas = unipc_schedule(16, 5.0).sigmas
    steps = [2 + 13 * k // sessions for k in range(sessions)]  # spread over the steps a corrector runs at
    def engine_step(batched: bool) -> float:
        """Milliseconds of one engine step's solver steps, every solver with a trajectory's history at its step."""
        seconds = 0.0
        for shape in shapes:
            solvers = []
            for i in steps:
                solver = FlowUniPC(sigmas)
                solver.x0 = [torch.randn(shape, device=device) for _ in range(2)]
                solver.start, solver.order = torch.randn(shape, device=device), min(2, 16 - i + 1, i)
                solvers.append(solver)
            samples, velocities = ([torch.randn(shape, device=device) for _ in steps] for _ in range(2))
            _synced(torch.device(device))
            start = time.perf_counter()
            FlowUniPC.step_many(solvers, steps, velocities, samples, batched=batched)
            _synced(torch.device(device))
            seconds += time.perf_counter() - start
        return seconds * 1000

    times: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    for repeat in range(repeats + 2):  # alternated, so a busy machine slows both alike; two warm-ups
        for mode in times:
            ms = engine_step(mode == "batched")
            if repeat >= 2:
                times[mode].append(ms)
    rows = {mode: {"p50_ms": statistics.median(t), "p99_ms": percentile(t, 0.99)} for mode, t in times.items()}
    rows["speedup_p50"] = rows["one_at_a_time"]["p50_ms"] / rows["batched"]["p50_ms"]
    print(f"solver steps of {sessions} sessions: batched {rows['batched']['p50_ms']:.2f} ms, one at a time "
          f"{rows['one_at_a_time']['p50_ms']:.2f} ms", file=sys.stderr, flush=True)
    return rows


# how operators (CPU) and kernels (CUDA: cuBLAS's gemm/xmma/nvjet, SDPA's flash and fmha) are told apart
ATTENTION_NAMES = ("attention", "flash", "fmha")
MATMUL_NAMES = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "gemm", "xmma", "nvjet",
                "cutlass")


def op_kind(name: str) -> str:
    name = name.lower()
    return ("attention" if any(n in name for n in ATTENTION_NAMES) else
            "matmul" if any(n in name for n in MATMUL_NAMES) else "other")


@torch.no_grad()
def chunk_profile(setup: LastChunk, device: str, sampler: str = "dreamzero", top: int = 15) -> dict:
    """Where one chunk's time goes (torch.profiler over `rollout.act` at SAMPLERS[sampler], after a warm-up chunk):
    the kernels (on CPU: operators) with the most self time, and each kind's share of the total (op_kind)."""
    from torch.profiler import ProfilerActivity, profile

    rollout = setup.rollout(SAMPLERS[sampler])
    rollout.act(setup.state)
    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        rollout.act(setup.state)
        if cuda:
            torch.cuda.synchronize()
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731
    events = sorted((e for e in prof.key_averages() if self_us(e) > 0), key=self_us, reverse=True)
    total = sum(self_us(e) for e in events)
    shares = {kind: sum(self_us(e) for e in events if op_kind(e.key) == kind) / total
              for kind in ("matmul", "attention", "other")}
    rows = [{"op": e.key[:100], "kind": op_kind(e.key), "self_ms": self_us(e) / 1000, "share": self_us(e) / total,
             "calls": e.count} for e in events[:top]]
    return {"sampler": sampler, "clock": "device" if cuda else "host", "total_ms": total / 1000, "shares": shares,
            "top": rows}


@torch.no_grad()
def served_attention(device: str, dtype: torch.dtype, heads: int, repeats: int) -> dict:
    """p50/p99 of one served chunk's self-attention at the 14B token layout, against its full context:
    SDPAKernel (unmasked but for the state row) vs F.scaled_dot_product_attention under the dense mask."""
    from wam.platform.layout import TokenLayout
    from wam.trainer.model.attention import SDPAKernel
    from wam.trainer.model.mask import AttentionMask

    tokens_per_frame, frames, actions, chunk = 880, 2, 24, 3
    context = TokenLayout.first_frame(tokens_per_frame, actions)
    for c in range(chunk):
        context = context + TokenLayout.clean_chunk(c, frames, tokens_per_frame, actions)
    query = TokenLayout.prediction(range(chunk, chunk + 1), frames, tokens_per_frame, actions)
    mask = AttentionMask(query, context + query)
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(1, query.length, heads, 128, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(1, mask.keys.length, heads, 128, generator=g, device=device, dtype=dtype) for _ in range(2))
    kernel, dense = SDPAKernel(SDPAKernel.Config()), mask.dense(device)
    masked = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=dense)
    rows = {"queries": query.length, "keys": mask.keys.length, "heads": heads,
            "sdpa_kernel": timed(lambda: kernel(q, k, v, mask), device, repeats),
            "dense_mask": timed(masked, device, repeats)}
    rows["speedup_p50"] = rows["dense_mask"]["p50_ms"] / rows["sdpa_kernel"]["p50_ms"]
    print(f"served chunk's attention: {rows['sdpa_kernel']['p50_ms']:.2f} ms, under the dense mask "
          f"{rows['dense_mask']['p50_ms']:.2f} ms", file=sys.stderr, flush=True)
    return rows


_QUANTIZE = textwrap.dedent("""
    import gc, json, sys, time, torch
    from wam.trainer.quantize.quantizer import quantize_checkpoint, kept_reason, _release_large_buffers_to_the_os
    from wam.trainer.quantize import nvfp4
    from wam.trainer.checkpoint_reader import open_checkpoint

    def kib(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

    mode, checkpoint, out = sys.argv[1:4]
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    before, start = kib("VmRSS:"), time.perf_counter()
    if mode == "streaming":
        quantize_checkpoint(checkpoint, out, shard_mb=64)
    else:  # the obvious alternative: the whole model in memory, then every weight quantized
        _release_large_buffers_to_the_os()
        state = open_checkpoint(checkpoint).read()
        quantized = {k: nvfp4.quantize(v) if not kept_reason(k, tuple(v.shape), []) else v.bfloat16()
                     for k, v in state.items()}
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_growth_mb": (kib("VmHWM:") - before) / 1024}))
""")


def quantization(layers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, ["name=bench", "model.dim=512", f"model.num_layers={layers}", "model.ffn_dim=2048",
                                 "model.num_heads=4", f"output_dir={tmp}/runs"])
        preset = resolve_preset(cfg)
        model = randomized_model(preset.arch, preset.sample)
        megabytes = sum(p.numel() * 4 for p in model.state_dict().values()) / 1e6
        checkpoint = write_checkpoint(Path(tmp) / "checkpoints", cfg, model)
        del model
        result = {"model_mb_fp32": megabytes}
        for mode in ("streaming", "whole_model"):
            run = subprocess.run([sys.executable, "-c", _QUANTIZE, mode, checkpoint, f"{tmp}/out-{mode}"],
                                 capture_output=True, text=True, check=True)
            measured = json.loads(run.stdout.strip().splitlines()[-1])
            result[mode] = {**measured, "mb_per_s": megabytes / measured["seconds"]}
        result["peak_memory_ratio"] = result["whole_model"]["peak_growth_mb"] / result["streaming"]["peak_growth_mb"]
        return result


_BURST_SERVER = textwrap.dedent("""
    import sys
    from wam.trainer.quantize.load import load_quantized
    from wam.trainer.serve.policy import PolicyRuntime
    from wam.trainer.serve.server import PolicyServer, serve_in_background
    from websockets.asyncio.server import serve

    model, limit_mb, buffered = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "buffered"

    class Buffering(PolicyServer):
        \"\"\"The alternative: websockets reads messages up to 4x the limit, then the size is checked.\"\"\"

        async def start(self, host, port):
            return await serve(self._session, host, port, compression=None, process_request=self._http,
                               max_size=4 * self.max_request_bytes)

        async def _reply(self, session, message, received):
            if len(message) > self.max_request_bytes:
                return "bad request: too large"
            return await super()._reply(session, message, received)

    server = (Buffering if buffered else PolicyServer)(PolicyRuntime(load_quantized(model)), max_request_mb=limit_mb)
    with serve_in_background(server) as port:
        print(port, flush=True)
        sys.stdin.read()  # serve until the benchmark closes stdin
""")


def _kib(pid: int, field: str) -> int:
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith(field))


def oversized_burst(limit_mb: float, message_mb: float, clients: int) -> dict:
    """Peak memory growth of a policy server while `clients` connections each send one message of `message_mb`
    (over the limit), refused from the header (ours) vs buffered up to 4x the limit first."""
    import threading

    from websockets.sync.client import connect

    payload = bytes(int(message_mb * 1e6))  # one buffer, shared by the client threads
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, ["name=burst", "data.source=synthetic", f"output_dir={tmp}/runs"])
        preset = resolve_preset(cfg)
        checkpoint = write_checkpoint(Path(tmp) / "checkpoints", cfg, randomized_model(preset.arch, preset.sample))
        model = quantize_checkpoint(checkpoint).out
        rows = {}
        servers = {mode: subprocess.Popen([sys.executable, "-c", _BURST_SERVER, model, str(limit_mb), mode.split("_")[0]],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                   for mode in ("refused_from_header", "buffered")}  # started together, each burst once both are up
        ports = {mode: int(server.stdout.readline()) for mode, server in servers.items()}
        for mode, server in servers.items():
            port = ports[mode]
            with open(f"/proc/{server.pid}/clear_refs", "w") as f:
                f.write("5")  # the peak (VmHWM) restarts from the current size
            before = _kib(server.pid, "VmRSS:")
            refused: list[str] = []

            def send(port: int = port, refused: list[str] = refused) -> None:
                with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None) as ws:
                    ws.recv()  # the metadata
                    try:
                        ws.send(payload)
                        refused.append(ws.recv())
                    except Exception as err:  # noqa: BLE001 - a closed connection is the refusal
                        refused.append(type(err).__name__)

            threads = [threading.Thread(target=send) for _ in range(clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            rows[mode] = {"peak_growth_mb": (_kib(server.pid, "VmHWM:") - before) / 1024,
                          "seconds": time.perf_counter() - start, "refused": len(refused)}
            server.stdin.close()
            server.wait(30)
        rows["ratio_peak_growth"] = rows["buffered"]["peak_growth_mb"] / max(rows["refused_from_header"]["peak_growth_mb"],
                                                                              1.0)
        rows["setup"] = {"limit_mb": limit_mb, "message_mb": message_mb, "clients": clients}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, a small quantization model (smoke)")
    parser.add_argument("--layers", type=int, default=2, help="14B-width blocks in the GPU latency model")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--ablation", action="store_true", help="DreamZero's speed-ups built up, each with its action "
                        "deviation, and 1/4/8 concurrent sessions batched vs one at a time (issue 20)")
    parser.add_argument("--model", help="--ablation: a quantized tiny model (default: random weights)")
    parser.add_argument("--data", help="--ablation: the held-out LeRobot dataset of --model")
    parser.add_argument("--flash-model", help="--ablation: a quantized Flash-trained model, its own table")
    parser.add_argument("--windows", type=int, default=4, help="--ablation: held-out windows")
    parser.add_argument("--repeats", type=int, default=3, help="--ablation: passes over the windows (tiny)")
    parser.add_argument("--rounds", type=int, default=2, help="--ablation: how long the concurrent robots are "
                        "timed, in context windows per robot (counted once all are running and out of phase)")
    parser.add_argument("--concurrency", action="store_true", help="only the ablation's 1/4/8 concurrent sessions, "
                        "eager and compiled, on the tiny preset (--model, or random weights)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (a shared machine: 1 keeps ratios stable)")
    parser.add_argument("--memory", action="store_true", help="only serving memory at the 14B "
                        "width, traced on fake tensors")
    parser.add_argument("--threads-choice", action="store_true", help="only one robot through the CPU engine at 1 "
                        "thread, every core, and the engine's choice")
    parser.add_argument("--record", action="store_true", help="only the session recording's cost: one robot's round "
                        "trip with its session recorded vs not")
    parser.add_argument("--chunks", type=int, default=60, help="--record: chunks each server answers")
    parser.add_argument("--encoding", action="store_true", help="only a served chunk's encoding: a chunk's frames, a "
                        "new window, 8 sessions' chunks batched vs one at a time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ablation or args.concurrency or args.threads_choice or args.memory or args.record or args.encoding:
        results = (run_concurrency(args) if args.concurrency else threads_choice(args.rounds) if args.threads_choice
                   else memory_breakdown() if args.memory else session_recording(args.chunks) if args.record
                   else served_encoding(args.repeats * 10) if args.encoding else run_ablation(args))
        print(json.dumps(results, indent=1, default=str))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        return
    repeats = 5 if args.quick else 30
    tiny_overrides = ["sample.actions_per_chunk=24"]
    tiny = LastChunk(tiny_overrides, "cpu", torch.float32)
    results = {"cpu_tiny": chunk_latency(tiny, "cpu", repeats), "cpu_tiny_samplers": sampler_latency(tiny, "cpu", repeats),
               "cpu_served_attention": served_attention("cpu", torch.float32, 4, 3 if args.quick else 10),
               "cpu_tiny_encoding": chunk_encoding(tiny_overrides, "cpu", 2 if args.quick else 10,
                                                   sessions=3 if args.quick else 8),
               "quantization": quantization(2 if args.quick else 16),
               "oversized_burst": oversized_burst(2, 7, 4) if args.quick else oversized_burst(64, 250, 4)}
    if torch.cuda.is_available():
        wide = LastChunk(["model.preset=dreamzero-14b", f"model.num_layers={args.layers}"], "cuda", torch.bfloat16)
        results["cuda_14b_width"] = chunk_latency(wide, "cuda", repeats)
        results["cuda_14b_width_samplers"] = sampler_latency(wide, "cuda", repeats)
        results["cuda_served_attention"] = served_attention("cuda", torch.bfloat16, 40, repeats)
        results["cuda_14b_encoding"] = chunk_encoding(["model.preset=dreamzero-14b"], "cuda", repeats)
        results["device"] = torch.cuda.get_device_name()
    for name, rows in results.items():
        print(name, json.dumps(rows, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))



# -- the ablation (issue 20): DreamZero's speed-ups built up, each with its quality cost ------------------

BASELINE = SamplerSection(solver="unipc", steps=16, guidance=5.0, negative_prompt="", guidance_batch=False)
# (row, sampler changes, compiled, quantized matmuls); each row adds to the one before it
ABLATION = [
    ("baseline: UniPC 16, guidance sequential, eager, no DiT cache", {}, False, False),
    ("+ guidance batched", {"guidance_batch": True}, False, False),
    ("+ DiT cache (8 of 16 steps)", {"dit_cache": "static", "dit_passes": 8}, False, False),
    ("+ compile (CUDA graphs on CUDA)", {}, True, False),
    ("+ quantized compute (fp8 Hopper, nvfp4 Blackwell)", {}, True, True),
    ("+ Flash: 1 step", {"steps": 1, "dit_cache": "none"}, True, True),
]


def _synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _chunks(rollout: ChunkRollout, windows: list, device: torch.device, repeats: int) -> tuple[list[float], list]:
    """Every chunk of every window from its real context (the real latents written after each): per-chunk
    milliseconds (after one warm-up window: compiling, and recording a CUDA graph per chunk position, is not
    timed) and the first pass's normalised actions."""
    f = rollout.frames_per_chunk
    ms, actions = [], []
    for repeat in range(-1, repeats):
        for i, w in enumerate(windows if repeat >= 0 else windows[:1]):
            rollout.reset(w.latents[:, :, :1], w.text, w.image, w.i2v)
            generator = torch.Generator(device).manual_seed(i)  # the same noise in every row
            for c in range(rollout.max_chunks):
                _synced(device)
                start = time.perf_counter()
                chunk = rollout.act(w.state[c][None].to(device), generator)
                _synced(device)
                if repeat >= 0:
                    ms.append((time.perf_counter() - start) * 1000)
                if repeat == 0:
                    actions.append(chunk.actions[0, :, w.dims].float().cpu())
                rollout.observe(w.latents[:, :, 1 + c * f:1 + (c + 1) * f])
    return ms, actions


def ablation(model_uri: str, device: str, windows: int, repeats: int, data: str | None, on_row=None) -> dict:
    """Per-chunk p50/p99 of each ABLATION row (and guidance on two processes/devices), speed-up over the baseline,
    and the mean action deviation from the baseline's actions as a share of the actions' q01-q99 range (2 in
    the normalised units, which map q01..q99 to -1..1). A row that fails is reported as failed; `on_row(rows)`
    is called after each row that ran."""
    from wam.trainer.eval.heldout import held_out
    from wam.trainer.quantize.load import compute_path, load_quantized

    dev = torch.device(device)
    dequantized = "fp32-dequantized" if dev.type == "cpu" else "bf16-dequantized"
    policies = {dequantized: load_quantized(model_uri, dev, dequantized)}
    cfg = policies[dequantized].config
    heldout = held_out(cfg, data, None, windows, frozen_encoders(cfg, dev))
    chosen = [heldout.window(i) for i in heldout.select(windows)]
    for w in chosen:
        for name in ("latents", "text", "image", "i2v"):
            if getattr(w, name) is not None:
                setattr(w, name, getattr(w, name).to(dev))
    rows, sampler, base_actions = {}, BASELINE, None
    variants = [(name, changes, compiled, quantized, None) for name, changes, compiled, quantized in ABLATION]
    two = dev.type == "cpu" or torch.cuda.device_count() >= 2
    if two:  # beside the stack: guidance on two processes (CPU) or GPUs, DreamZero's CFG parallelism
        variants.insert(2, ("guidance parallel (2 processes/devices), in place of batched", {}, False, False,
                            torch.device("cpu") if dev.type == "cpu" else torch.device("cuda", 1)))
    quantized_path = compute_path(dev)  # the rows from "+ quantized compute" on; the CPU has none
    for name, changes, compiled, quantized, peer_device in variants:
        path = quantized_path if quantized else dequantized
        if quantized and not changes and path == dequantized:
            rows[name] = {"skipped": f"no quantized matmuls on {device}: the rows below keep {path} weights"}
            continue
        row_sampler = dataclasses.replace(sampler, **changes)
        if peer_device is None:
            sampler = row_sampler
        try:
            if path not in policies:
                policies[path] = load_quantized(model_uri, dev, path)
            rows[name] = _ablation_row(policies[path].model, cfg, row_sampler, heldout, chosen, dev, repeats, path,
                                       compiled, peer_device and (model_uri, peer_device))
        except Exception as err:  # noqa: BLE001 - one row that fails on a new device is reported; the others run
            traceback.print_exc()
            rows[name] = {"failed": f"{type(err).__name__}: {err}"[:500]}
            continue
        actions = rows[name].pop("actions")
        base_actions = base_actions or actions
        deviation = statistics.fmean((a - b).abs().mean().item() for a, b in zip(actions, base_actions, strict=True))
        rows[name]["action_deviation_of_range"] = deviation / 2
        baseline = next(iter(rows.values()))
        if "p50_ms" in baseline:
            rows[name]["speedup_p50"] = baseline["p50_ms"] / rows[name]["p50_ms"]
        print(f"{name}: p50 {rows[name]['p50_ms']:.1f} ms ({path})", file=sys.stderr, flush=True)
        if on_row is not None:
            on_row(rows)
    rows["setup"] = {"device": device, "windows": len(chosen), "chunks_per_window": sampler_chunks(cfg),
                     "flash_trained": cfg.flow.schedule == "flash", "held_out": data or "procedural episodes"}
    return rows


def _ablation_row(model, cfg, sampler: SamplerSection, heldout, windows: list, device: torch.device, repeats: int,
                  path: str, compiled: bool, peer: tuple[str, torch.device] | None) -> dict:
    """One ablation row: per-chunk p50/p99 and the first pass's actions (popped by the caller)."""
    from wam.trainer.eval.rollouts import new_rollout
    from wam.trainer.guidance_peer import GuidancePeer
    from wam.trainer.inference import Denoiser

    rows = rows_per_device(sampler, 1 if peer is None else 2)
    rollout = new_rollout(model, cfg, sampler, heldout, Denoiser(model, compiled, rows))
    if peer is not None:
        rollout.peer = GuidancePeer.spawn(peer[0], device, peer[1], path, compiled, rows)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms, actions = _chunks(rollout, windows, device, repeats)
    return {"p50_ms": statistics.median(ms), "p99_ms": percentile(ms, 0.99), "chunks_timed": len(ms),
            "compute_path": path, "roofline_ms": roofline_ms(cfg, sampler, path, device), "peak_gib": _peak_gib(device),
            "actions": actions}


def sampler_chunks(cfg) -> int:
    return resolve_preset(cfg).sample.num_chunks


@torch.no_grad()
def concurrency(model_uri: str, device: str, sessions: tuple[int, ...], rounds: int, data: str | None,
                compiled: bool = False, cpu_threads: int | None = 0) -> dict:
    """Closed-loop robots (denoise a chunk; its real frames written with the next one's request, as `wam serve`'s
    sessions do) through one DenoiseEngine: chunks per second and per-chunk p50/p99 (the engine's wait and the
    frames' write included) while all n are running (_SteadyWindow: `rounds` context windows' chunks per robot),
    with every session's steps batched (max_batch = sessions) vs one chunk at a time (max_batch 1), at the full
    non-Flash stack, eager or `compiled` (both engines warmed up first, as `wam serve` does: CUDA graphs on CUDA);
    and the forward's own ceiling for batching n sessions on this device, at one chunk and out of phase
    (forward_ceiling). `cpu_threads`: the engine's (DenoiseEngine's; None: its own choice), by default this
    process's torch threads."""
    from wam.trainer.eval.heldout import held_out
    from wam.trainer.eval.rollouts import new_rollout
    from wam.trainer.inference import Denoiser
    from wam.trainer.quantize.load import load_quantized
    from wam.trainer.serve.engine import DenoiseEngine
    from wam.trainer.serve.memory import serving_memory

    dev = torch.device(device)
    policy = load_quantized(model_uri, dev, "fp32-dequantized" if dev.type == "cpu" else "bf16-dequantized")
    cfg = policy.config
    heldout = held_out(cfg, data, None, max(sessions), frozen_encoders(cfg, dev))
    windows = [heldout.window(i) for i in heldout.select(max(sessions))]
    sampler = dataclasses.replace(BASELINE, guidance_batch=True, dit_cache="static", dit_passes=8)
    preset = resolve_preset(cfg)
    session_gib = kv_cache_bytes(preset.arch, preset.sample, rows_per_device(sampler, 1), policy.model.dtype.itemsize) / 2**30
    weights_gib = sum(t.nbytes for t in policy.model.parameters()) / 2**30
    # on CUDA, next to the peak: a batched forward's activations per session as the admission traces them
    activations_gib = (serving_memory(preset.arch, preset.sample, rows_per_device(sampler, 1), policy.model.dtype,
                                      torch.bfloat16).activations / 2**30 if dev.type == "cuda" else None)
    rows = {}
    for n in sessions:
        for mixed in (False, True):  # sessions at one chunk, and out of phase as the robots below
            rows[f"{n}_sessions_forward_ceiling{'_mixed' * mixed}"] = forward_ceiling(
                policy.model, cfg, sampler, heldout, windows, n, dev, compiled, mixed)
        for mode, max_batch in (("batched", n), ("one_at_a_time", 1)):
            denoiser = Denoiser(policy.model, compiled, n * rows_per_device(sampler, 1))
            threads = torch.get_num_threads() if cpu_threads == 0 else cpu_threads
            engine = DenoiseEngine(denoiser, max_batch, threads if dev.type == "cpu" else None)
            # as wam serve warms up (PolicyRuntime): compiled, for its graphs; on the CPU, to choose its threads
            warm = (2 if max_batch > 1 else 1) if compiled else int(dev.type == "cpu" and threads is None)
            engine.start(*(_started(new_rollout(policy.model, cfg, sampler, heldout, denoiser), windows[0], dev)
                           for _ in range(warm)))
            engine.ready.wait()
            steady = _SteadyWindow(n, n * rounds * preset.sample.num_chunks, engine)

            def robot(i: int, engine=engine, steady=steady) -> None:
                w = windows[i % len(windows)]
                rollout = new_rollout(policy.model, cfg, sampler, heldout, engine.denoiser)
                generator = torch.Generator(dev).manual_seed(i)
                f, step, frames = rollout.frames_per_chunk, 0, []
                while not steady.over():
                    c = step % rollout.max_chunks
                    if c == 0:  # a new window (the last chunk's frames go with the old one, as a server does)
                        _started(rollout, w, dev)
                        frames = []
                    start = time.perf_counter()  # the last chunk's frames written, then this chunk: one request
                    engine.act(frames, lambda c=c: rollout.start(w.state[c][None].to(dev), generator))
                    _synced(dev)
                    step += 1
                    steady.served(i, start, time.perf_counter(), lead_in=step <= i % rollout.max_chunks)
                    frames = rollout.observations(w.latents[:, :, 1 + c * f:1 + (c + 1) * f].to(dev), c)

            threads = [threading.Thread(target=robot, args=(i,)) for i in range(n)]
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall, latencies = steady.closed - steady.opened, steady.latencies_ms
            rows[f"{n}_sessions_{mode}"] = {"chunks_per_s": len(latencies) / wall, "p50_ms": statistics.median(latencies),
                                            "p99_ms": percentile(latencies, 0.99), "chunks": len(latencies),
                                            # against what the admission counts: the weights and the sessions' caches
                                            "peak_gib": _peak_gib(dev), "caches_gib": n * session_gib,
                                            "weights_gib": weights_gib,
                                            "activations_gib": None if activations_gib is None else n * activations_gib,
                                            # the engine thread's host time in the window, shares of it
                                            **{f"engine_{part}_share": steady.counted[f"{part}_s"] / wall
                                               for part in ("forward", "solver", "observe")},
                                            # sessions' chunks per forward (at most n)
                                            "mean_batch": steady.counted["chunk_steps"] / steady.counted["forwards"],
                                            "cpu_threads": engine.cpu_threads,
                                            "thread_timings_ms": engine.thread_timings_ms}
        batched, alone = rows[f"{n}_sessions_batched"], rows[f"{n}_sessions_one_at_a_time"]
        rows[f"{n}_sessions_throughput_ratio"] = batched["chunks_per_s"] / alone["chunks_per_s"]
        print(f"{n} sessions: batched {batched['chunks_per_s']:.2f} chunks/s, one at a time "
              f"{alone['chunks_per_s']:.2f}", file=sys.stderr, flush=True)
        rows[f"{n}_sessions_p99_over_lone_session"] = batched["p99_ms"] / rows["1_sessions_batched"]["p99_ms"]
        path = "bf16-dequantized" if dev.type == "cuda" else "fp32-dequantized"
        if (bound := roofline_ms(cfg, sampler, path, dev, n)) is not None:  # what batching n can gain at best here
            rows[f"{n}_sessions_roofline_gain"] = n * roofline_ms(cfg, sampler, path, dev) / bound
    return rows


# a DenoiseEngine's counters: its thread's time in forwards, solver steps and observes; its forwards and the
# sessions' chunk steps they ran
_COUNTERS = ("forward_s", "solver_s", "observe_s", "forwards", "chunk_steps")


class _SteadyWindow:
    """The part of a concurrency run in which all its robots are running and past their out-of-phase lead-in: it
    opens when the last robot's lead-in ends and closes when `chunks` more chunks are done; throughput and
    latencies count the chunks done inside it. (The lead-in and the tail, when fewer robots are running, have
    fewer sessions to batch: counting them understates what n concurrent sessions get.)"""

    def __init__(self, robots: int, chunks: int, engine):
        self.chunks, self._engine = chunks, engine
        self.leading = set(range(robots))  # robots still in their lead-in
        self.opened = self.closed = None
        self.latencies_ms: list[float] = []
        self.counted: dict[str, float] = {}  # the engine's counters (_COUNTERS) inside the window
        self._lock = threading.Lock()

    def served(self, robot: int, start: float, done: float, lead_in: bool) -> None:
        """Robot `robot` was served a chunk from `start` to `done`."""
        with self._lock:
            if self.closed is not None:
                return
            if self.opened is not None:
                self.latencies_ms.append((done - start) * 1000)
                if len(self.latencies_ms) == self.chunks:
                    self.closed = done
                    self.counted = {name: getattr(self._engine, name) - then for name, then in self.counted.items()}
                return
            if not lead_in:
                self.leading.discard(robot)
            if not self.leading:
                self.opened, self.counted = done, {name: getattr(self._engine, name) for name in _COUNTERS}

    def over(self) -> bool:
        return self.closed is not None


@torch.no_grad()
def forward_ceiling(model, cfg, sampler: SamplerSection, heldout, windows: list, n: int, device: torch.device,
                    compiled: bool = False, mixed: bool = False, repeats: int = 20) -> float:
    """The most batching `n` sessions can give on this device: each session's denoising forward alone, summed,
    over one forward of all n sessions' rows. Each at its first chunk, or with `mixed` session i at chunk i mod K,
    as robots out of phase meet in the engine (compiled: keys padded to the longest context, the dense mask). Near
    1 when the forward is compute-bound, near n when it is bound by per-forward overhead (launches, Python); the
    engine's throughput ratio stays below it."""
    from wam.trainer.eval.rollouts import new_rollout
    from wam.trainer.inference import Denoiser

    denoiser, jobs = Denoiser(model, compiled, n * rows_per_device(sampler, 1)), []
    for i in range(n):
        w = windows[i % len(windows)]
        rollout = _started(new_rollout(model, cfg, sampler, heldout, denoiser), w, device)
        chunk, f = i % rollout.max_chunks if mixed else 0, rollout.frames_per_chunk
        for c in range(chunk):
            rollout.observe(w.latents[:, :, 1 + c * f:1 + (c + 1) * f].to(device))
        jobs.append(rollout.start(w.state[chunk][None].to(device), torch.Generator(device).manual_seed(i)))
    forwards = [job.passes for job in jobs] + [[p for job in jobs for p in job.passes]]  # each alone, then all
    times: list[list[float]] = [[] for _ in forwards]
    for repeat in range(-1, repeats):  # alternated, so a busy machine slows both alike; the first is a warm-up
        for passes, timed in zip(forwards, times, strict=True):
            _synced(device)
            start = time.perf_counter()
            denoiser(passes)
            _synced(device)
            if repeat >= 0:
                timed.append(time.perf_counter() - start)
    return sum(statistics.median(t) for t in times[:-1]) / statistics.median(times[-1])


def roofline_ms(cfg, sampler: SamplerSection, path: str, device: torch.device, sessions: int = 1) -> float | None:
    """The least time per chunk the serving roofline allows on this GPU (wam.platform.serving_roofline, as
    `wam plan --serve`), for what the row runs; None off a known GPU. Measured over it: how far from the bound."""
    acc = detect(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if acc is None or path not in WEIGHT_BYTES:
        return None
    preset = resolve_preset(cfg)
    load = ServingLoad(transformer_passes(sampler), rows_per_device(sampler, devices=1))
    return chunk_time(preset.arch, preset.sample, acc, load, sessions, path).seconds * 1000


def _peak_gib(device: torch.device) -> float | None:
    """The device memory the row's tensors peaked at (model, caches, CUDA graph pools), on CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _started(rollout: ChunkRollout, w, device: torch.device) -> ChunkRollout:
    """`rollout` at the start of a context window: the held-out window `w`'s first frame and prompt."""
    rollout.reset(w.latents[:, :, :1].to(device), w.text.to(device), _to(w.image, device), _to(w.i2v, device))
    return rollout


def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if x is None else x.to(device)


def frozen_encoders(cfg, device: torch.device):
    """The run's frozen encoders; for a random-weight model of a preset whose encoders exist only as published
    checkpoints (Wan's VAE, umT5-XXL, CLIP-H), random ones (speed only): the preset's VAE and CLIP networks, and
    one random umT5 layer of the preset's width in place of the text encoder, whose features the rollouts read."""
    from transformers import UMT5EncoderModel

    from wam.trainer.model.clip import ClipImageEncoder, clip_config
    from wam.trainer.model.encoders import FrozenEncoders
    from wam.trainer.model.text_encoder import ByteTokenizer, TextEncoder, umt5_config
    from wam.trainer.model.vae import WanVAE, vae_config

    arch = resolve_preset(cfg).arch
    if cfg.encoders.text is not None or arch.text_encoder == "tiny":
        return FrozenEncoders.of_config(cfg, device)
    torch.manual_seed(cfg.seed)
    layer = umt5_config("tiny")
    layer.d_model, layer.num_layers = arch.text_dim, 1
    encoders = FrozenEncoders(WanVAE(vae_config(arch.vae)),
                              TextEncoder(UMT5EncoderModel(layer), ByteTokenizer(), arch.text_len),
                              ClipImageEncoder(clip_config(arch.image_encoder)) if arch.has_image_branch else None,
                              arch.i2v_concat)
    for module in (encoders.vae, encoders.text, encoders.image):
        if module is not None:
            module.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    return encoders


def random_model(folder: Path, overrides: list[str]) -> str:
    """A quantized folder of a randomly initialised model (procedural data) of `overrides`."""
    cfg = load_config(None, ["name=ablation", "data.source=synthetic", f"output_dir={folder}/runs", *overrides])
    preset = resolve_preset(cfg)
    checkpoint = write_checkpoint(folder / "checkpoints", cfg, randomized_model(preset.arch, preset.sample))
    return quantize_checkpoint(checkpoint).out


# a few blocks of width 512 (head 128, as the 14B's) at the 14B's token layout scaled down: 96 tokens per frame
WIDE = ["model.dim=512", "model.num_heads=4", "model.ffn_dim=1536", "model.num_layers=3", "sample.latent_height=16",
        "sample.latent_width=24", "sample.actions_per_chunk=24"]


# the shapes solver_batching is measured at: the tiny preset's and the 14B's (one block: only its shapes are read)
SOLVER_SHAPES = (("tiny", []), ("14b", ["model.preset=dreamzero-14b", "model.num_layers=1"]))


def both_engines(name: str, model_uri: str, device: str, rounds: int, data: str | None) -> dict:
    """`concurrency` through the eager and the compiled engine: {name: eager rows, name_compiled: compiled rows}."""
    return {f"{name}{'_compiled' * compiled}": concurrency(model_uri, device, (1, 4, 8), rounds, data, compiled)
            for compiled in (False, True)}


# torch.cuda.max_memory_allocated on one H200 (2026-12-04, run3: docs/gpu-runs) while 1, 4 and 8 guided robots of
# these blocks ran through the eager engine, their frames handed in as latents (no VAE work); the frozen encoders
# (random, as there) were on the GPU too. Measured before the blocks gathered their adaLN terms as used
H200_PEAK_GIB = {1: 6.46, 4: 13.68, 8: 22.71}


def memory_breakdown(sessions: tuple[int, ...] = (1, 4, 8)) -> dict:
    """Serving memory at the 14B block width (2 blocks, bf16, guided sessions), traced on fake tensors as the
    admission traces it (wam.trainer.serve.memory): the weights, the frozen encoders the GPU check holds, each
    session's KV cache and VAE stream, the activations of one predict_many and one observe_many of n sessions at
    their last chunk, and one request's own work. Next to H200_PEAK_GIB: what that run held (weights, encoders,
    caches, a forward's activations), and what the admission counts for n sessions."""
    from wam.trainer.serve.memory import forward_activations, serving_memory

    cfg = load_config(None, ["model.preset=dreamzero-14b", "model.num_layers=2"])
    preset = resolve_preset(cfg)
    a, s = preset.arch, preset.sample
    with torch.device("meta"):
        encoders = frozen_encoders(cfg, torch.device("meta"))
    encoder_bytes = sum(p.numel() * 2 for m in (encoders.vae, encoders.text, encoders.image) if m is not None
                        for p in m.parameters())  # bf16 on a GPU
    weights = weight_bytes(a, "bf16-dequantized")
    memory = serving_memory(a, s, 2, torch.bfloat16, torch.bfloat16)
    cache = kv_cache_bytes(a, s, rows=2, element_bytes=2)
    results = {"encoders_gib": encoder_bytes / 2**30, "weights_gib": weights / 2**30, "cache_gib": cache / 2**30,
               **{f"{k}_gib": v / 2**30 for k, v in memory._asdict().items()}}
    for n in sessions:
        traced = forward_activations(a, s, 2, torch.bfloat16, sessions=n)
        held = weights + encoder_bytes + n * cache
        counted = held + n * (memory.stream + memory.activations) + memory.request  # max_batch >= n
        results[f"{n}_sessions"] = {"predict_activations_gib": traced.predict / 2**30,
                                    "observe_activations_gib": traced.observe / 2**30,
                                    "traced_engine_peak_gib": (held + traced.peak) / 2**30,
                                    "admission_counts_gib": counted / 2**30,
                                    "h200_measured_gib": H200_PEAK_GIB.get(n)}
        print(f"{n} sessions: traced {(held + traced.peak) / 2**30:.2f} GiB (activations {traced.peak / 2**30:.2f}), "
              f"counted by the admission {counted / 2**30:.2f}, H200 measured {H200_PEAK_GIB.get(n)}", file=sys.stderr,
              flush=True)
    return results


def threads_choice(rounds: int) -> dict:
    """One robot through the eager CPU engine at 1 thread, at every core, and at the engine's choice, on the tiny
    preset and the 512-wide blocks (random weights): {model: {setting: the 1-session batched row}}."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in (("tiny", []), ("wide", WIDE)):
            uri = random_model(Path(tmp) / name, overrides)
            results[f"cpu_{name}"] = {
                setting: concurrency(uri, "cpu", (1,), rounds, None, cpu_threads=threads)["1_sessions_batched"]
                for setting, threads in (("one_thread", 1), ("every_core", torch.get_num_threads()),
                                         ("chosen", None))}
            for setting, row in results[f"cpu_{name}"].items():
                print(f"{name}: {setting} ({row['cpu_threads']} threads) {row['chunks_per_s']:.2f} chunks/s, "
                      f"p50 {row['p50_ms']:.1f} ms", file=sys.stderr, flush=True)
    return results


def session_recording(chunks: int, warmup: int = 4) -> dict:
    """One robot through a server recording its session and through one that does not (one runtime, chunks
    interleaved): {"not_recorded"/"recorded": {p50_ms, p99_ms}, "p50_ratio", "p99_ratio", "recorded_mb_per_chunk"}."""
    import numpy as np
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from wam.trainer.quantize.load import load_quantized
    from wam.trainer.serve.policy import PolicyRuntime
    from wam.trainer.serve.server import PolicyServer, serve_in_background

    with tempfile.TemporaryDirectory() as tmp:
        runtime = PolicyRuntime(load_quantized(random_model(Path(tmp) / "tiny", [])))
        meta, rng = runtime.metadata(), np.random.default_rng(0)

        def request(frames: int) -> dict:
            views = {c: rng.integers(0, 256, (frames, 180, 320, 3), dtype=np.uint8) for c in meta["cameras"]}
            return {**{c: v[0] if frames == 1 else v for c, v in views.items()}, "prompt": "push the block",
                    "observation.state": rng.uniform(-1, 1, meta["state_dims"]).astype(np.float32)}

        later = [request(meta["frames_per_chunk"]) for _ in range(4)]
        servers = {"not_recorded": PolicyServer(runtime), "recorded": PolicyServer(runtime, record=f"{tmp}/record")}
        times: dict[str, list[float]] = {name: [] for name in servers}
        with serve_in_background(servers["not_recorded"]) as plain, serve_in_background(servers["recorded"]) as kept:
            robots = {name: WebsocketClientPolicy(f"ws://127.0.0.1:{port}")
                      for name, port in (("not_recorded", plain), ("recorded", kept))}
            for robot in robots.values():
                robot.infer(request(1))
            for i in range(warmup + chunks):
                for name in (list(robots) if i % 2 else list(robots)[::-1]):
                    started = time.perf_counter()
                    robots[name].infer(later[i % len(later)])
                    if i >= warmup:
                        times[name].append((time.perf_counter() - started) * 1000)
            servers["recorded"].recorder.flush()
        written = sum(f.stat().st_size for f in Path(tmp, "record").rglob("*.msgpack"))
    rows = {name: {"p50_ms": percentile(t, 0.5), "p99_ms": percentile(t, 0.99)} for name, t in times.items()}
    return {**rows, **{f"{q}_ratio": rows["recorded"][f"{q}_ms"] / rows["not_recorded"][f"{q}_ms"] for q in ("p50", "p99")},
            "recorded_mb_per_chunk": written / (1 + warmup + chunks) / 1e6, "chunks": chunks,
            "frames": f"{len(meta['cameras'])} camera(s) x {meta['frames_per_chunk']} x 180x320"}


def run_concurrency(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.model or random_model(Path(tmp) / "tiny", [])
        return {**{f"cpu_{name}_solver_batching": solver_batching(overrides, "cpu", repeats=50 if name == "tiny" else 10)
                   for name, overrides in SOLVER_SHAPES},
                **both_engines("cpu_tiny_concurrency", uri, "cpu", args.rounds, args.data)}


def run_ablation(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"cpu_tiny": (args.model or random_model(Path(tmp) / "tiny", []), args.data),
                  "cpu_wide": (random_model(Path(tmp) / "wide", WIDE), None)}
        for name, (uri, data) in models.items():
            repeats = args.repeats if name == "cpu_tiny" else 1
            results[name] = ablation(uri, "cpu", args.windows, repeats, data)
            results |= both_engines(f"{name}_concurrency", uri, "cpu", args.rounds, data)
        if args.flash_model:
            results["cpu_tiny_flash"] = ablation(args.flash_model, "cpu", args.windows, args.repeats, args.data)
        if torch.cuda.is_available():
            uri = random_model(Path(tmp) / "gpu", ["model.preset=dreamzero-14b", f"model.num_layers={args.layers}"])
            results["cuda_14b_width"] = ablation(uri, "cuda", args.windows, args.repeats, None)
            results |= both_engines("cuda_14b_width_concurrency", uri, "cuda", args.rounds, None)
            results["device"] = torch.cuda.get_device_name()
    return results


if __name__ == "__main__":
    main()
