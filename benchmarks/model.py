"""Model benchmarks: training step time, KV-cache vs full-recompute inference, analytical FLOPs per preset.

    python benchmarks/model.py            # CPU here; uses CUDA (bf16) when present
    python benchmarks/model.py --quick    # a smoke run

Timings are medians of repeated runs; ratios compare alternatives measured in the same run, which is
what to trust on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from wam.platform.accounting import count_flops, count_params
from wam.platform.presets import PRESETS, get_preset
from wam.trainer.model import WamInputs, build_model, model_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_time(preset, device, dtype, repeats) -> float:
    model = build_model(model_config(preset.arch, preset.sample), device=device, dtype=dtype).train()
    batch = WamInputs.random(preset.arch, preset.sample, batch=1, device=device)

    def step():
        out = model(batch)
        (out.video.square().mean() + out.actions.square().mean()).backward()

    return median_time(step, device, repeats)


def chunk_inference_times(preset, device, dtype, steps, repeats) -> list[tuple[int, float, float]]:
    """Per chunk: seconds to denoise it against the KV cache, and with the context recomputed every step."""
    arch, s = preset.arch, preset.sample
    model = build_model(model_config(arch, s), device=device, dtype=dtype).eval()
    batch = WamInputs.random(arch, s, batch=1, device=device)
    f, a, hw = s.frames_per_chunk, s.actions_per_chunk, (s.latent_height, s.latent_width)

    def fresh_cache(upto: int):
        cache = model.new_cache(1, s.num_chunks, f, a, hw, device)
        model.set_conditioning(cache, batch.text, batch.image, batch.i2v_cond)
        model.observe(cache, batch.video[:, :, :1])
        for c in range(upto):
            model.observe(cache, batch.video[:, :, 1 + c * f:1 + (c + 1) * f], chunk=c)
        return cache

    def predict(cache, c):
        return model.predict(cache, batch.noisy_video[:, :, c * f:(c + 1) * f], batch.noisy_actions[:, c],
                             batch.state[:, c], batch.video_t[:, c], batch.action_t[:, c])

    results = []
    with torch.no_grad():
        for c in range(s.num_chunks):
            cache = fresh_cache(c)
            cached = median_time(lambda c=c, cache=cache: [predict(cache, c) for _ in range(steps)], device, repeats)
            recompute = median_time(lambda c=c: [predict(fresh_cache(c), c) for _ in range(steps)], device, repeats)
            results.append((c, cached, recompute))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per chunk")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = 3 if args.quick else 20
    torch.manual_seed(0)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "threads": torch.get_num_threads(), "dtype": str(dtype)}
    print(f"device: {results['device']} ({results['threads']} threads), dtype {dtype}")

    # A context 4x larger than tiny's (16x16 latent frames) shows how the cache's advantage grows.
    tiny = get_preset("tiny")
    configs = {"tiny": tiny,
               "tiny@16x16": dataclasses.replace(tiny, sample=dataclasses.replace(tiny.sample, latent_height=16,
                                                                                latent_width=16))}
    step = train_step_time(configs["tiny"], device, dtype, repeats)
    results["tiny_train_step_s"] = step
    print(f"\ntiny preset forward+backward (batch 1): {step * 1000:.1f} ms")

    print(f"\nchunk inference, {args.steps} denoising steps: KV cache vs recomputing the context every step")
    print(f"{'config':<12} {'chunk':>5} {'cached ms':>10} {'recompute ms':>13} {'speedup':>8}")
    results["chunk_inference"] = {}
    for name, preset in configs.items():
        rows = chunk_inference_times(preset, device, dtype, args.steps, repeats)
        results["chunk_inference"][name] = [dict(chunk=c, cached_s=a, recompute_s=b, speedup=b / a) for c, a, b in rows]
        for c, cached, recompute in rows:
            print(f"{name:<12} {c:>5} {cached * 1000:>10.2f} {recompute * 1000:>13.2f} {recompute / cached:>7.2f}x")

    print("\nanalytical cost of one training sample (forward + backward)")
    print(f"{'preset':<14} {'params':>9} {'tokens':>7} {'TFLOP':>10} {'attention density':>18}")
    results["flops"] = {}
    for name in PRESETS:
        p = PRESETS[name]
        flops = count_flops(p.arch, p.sample)
        density = flops.self_attention / flops.self_attention_dense
        results["flops"][name] = dict(params=count_params(p.arch).total, tokens=flops.tokens,
                                      training_flops=flops.training, attention_density=density)
        print(f"{name:<14} {count_params(p.arch).total / 1e9:>8.3f}B {flops.tokens:>7} "
              f"{flops.training / 1e12:>10.3f} {density:>17.1%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
