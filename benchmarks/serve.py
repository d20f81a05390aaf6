"""Policy serving and NVFP4 quantization, with the obvious alternatives measured in the same run.

1. Per-chunk denoising latency (p50/p99) of the last chunk of a context window: against the session's KV
   cache vs recomputing the whole sequence every denoising step, with 1 and 4 steps; and DreamZero's sampler
   built up (UniPC 16 steps, + guidance 5 batched or as two passes, + the DiT cache on 8 of the 16 steps).
   CPU: the tiny preset (fp32); with CUDA also a model of the 14B block width (dim 5120, 40 heads; --layers
   of them, bf16).
2. Quantization: throughput (MB of float32 weights per second) and peak memory growth of the streaming
   quantizer vs loading the whole model first, on one checkpoint, each in a fresh process.
3. A burst of oversized requests (several clients at once, each sending a message larger than
   serving.max_request_mb): the server's peak memory growth when it refuses each from its frame header (ours)
   vs when websockets buffers up to 4x the limit and the size is checked after reading (the obvious
   alternative, and what this server did before), each server in a fresh process.

    python benchmarks/serve.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from wam.platform.config import SamplerSection, load_config, resolve_preset  # noqa: E402
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
        rollout = ChunkRollout(self.model, sampler, max_chunks=k, frames_per_chunk=f,
                               actions_per_chunk=s.actions_per_chunk, latent_hw=(s.latent_height, s.latent_width),
                               negative_text=torch.zeros_like(x.text[:1]))  # a negative prompt's features
        rollout.reset(x.video[:, :, :1], x.text, x.image, x.i2v_cond)
        for c in range(k - 1):
            rollout.observe(x.video[:, :, 1 + c * f:1 + (c + 1) * f])
        return rollout


@torch.no_grad()
def chunk_latency(overrides: list[str], device: str, dtype: torch.dtype, repeats: int) -> dict:
    setup = LastChunk(overrides, device, dtype)
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
    return rows


# DreamZero's sampler built up: UniPC at 16 steps, guidance 5 as one batched forward or two passes, the DiT cache.
SAMPLERS = {
    "unipc_16": SamplerSection(solver="unipc", steps=16),
    "guided_batched": SamplerSection(solver="unipc", steps=16, guidance=5.0),
    "guided_sequential": SamplerSection(solver="unipc", steps=16, guidance=5.0, guidance_batch=False),
    "dreamzero": SamplerSection(solver="unipc", steps=16, guidance=5.0, dit_cache="static", dit_passes=8),
}


@torch.no_grad()
def sampler_latency(overrides: list[str], device: str, dtype: torch.dtype, repeats: int) -> dict:
    """Per-chunk latency of each of SAMPLERS, and the transformer passes it ran."""
    setup = LastChunk(overrides, device, dtype)
    rows = {}
    for name, sampler in SAMPLERS.items():
        rollout = setup.rollout(sampler)
        rows[name] = {**timed(lambda rollout=rollout: rollout.act(setup.state), device, repeats),
                      "transformer_passes": rollout.act(setup.state).forwards}
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
        for mode in ("refused_from_header", "buffered"):
            server = subprocess.Popen([sys.executable, "-c", _BURST_SERVER, model, str(limit_mb), mode.split("_")[0]],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            port = int(server.stdout.readline())
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
    args = parser.parse_args()
    repeats = 5 if args.quick else 30
    results = {"cpu_tiny": chunk_latency(["sample.actions_per_chunk=24"], "cpu", torch.float32, repeats),
               "cpu_tiny_samplers": sampler_latency(["sample.actions_per_chunk=24"], "cpu", torch.float32, repeats),
               "quantization": quantization(2 if args.quick else 16),
               "oversized_burst": oversized_burst(2, 7, 4) if args.quick else oversized_burst(64, 250, 4)}
    if torch.cuda.is_available():
        results["cuda_14b_width"] = chunk_latency(
            ["model.preset=dreamzero-14b", f"model.num_layers={args.layers}"], "cuda", torch.bfloat16, repeats)
        results["cuda_14b_width_samplers"] = sampler_latency(
            ["model.preset=dreamzero-14b", f"model.num_layers={args.layers}"], "cuda", torch.bfloat16, repeats)
        results["device"] = torch.cuda.get_device_name()
    for name, rows in results.items():
        print(name, json.dumps(rows, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
