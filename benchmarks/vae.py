"""The frozen VAEs of the two DreamZero backbones on the same pixels: Wan2.2 (dreamzero-5b: z=48, 16x) against
Wan2.1 (dreamzero-14b: z=16, 8x).

    python benchmarks/vae.py                         # 1 + 4 frames of 96x160 (minutes on a 2-core CPU)
    python benchmarks/vae.py --frames 33 --height 352 --width 640   # a whole training sample (on a GPU)
    python benchmarks/vae.py --smoke                 # the tiny VAEs, seconds

Training from pixels encodes every sample's frames with the frozen VAE inside the training step, as the
platform does (`FrozenEncoders.encode_clip`: the first frame alone, then 4 frames per call); serving encodes the
robot's frames the same way and decodes latents only when a client asks for video. Both VAEs run with their
architecture's default initialisation (the time does not depend on the weights), float32 on CPUs and bfloat16
on GPUs, medians after a warm-up, the two VAEs taking turns. Also printed: what each gives the DiT per latent
frame (tokens after its 2x2 patches) and what a pre-encoded latent frame stores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from wam.trainer.model.vae import VAE_CONFIGS, WanVAE


def _timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


@torch.no_grad()
def measure(names: dict[str, str], video: torch.Tensor, repeats: int) -> dict[str, dict]:
    """Encode and decode `video` with each VAE; the VAEs take turns in every repeat, so a busy machine slows
    them alike and their ratios hold."""
    device, dtype = video.device, video.dtype
    vaes = {label: WanVAE(VAE_CONFIGS[name]).eval().to(device=device, dtype=dtype) for label, name in names.items()}
    latents = {}
    for label, vae in vaes.items():  # warm-up
        latents[label] = vae.encode(video)
        vae.decode(latents[label])
    times: dict[str, dict[str, list[float]]] = {label: {"encode_s": [], "decode_s": []} for label in vaes}
    for _ in range(repeats):
        for label, vae in vaes.items():
            seconds, latents[label] = _timed(lambda: vae.encode(video), device)  # noqa: B023
            times[label]["encode_s"].append(seconds)
            seconds, pixels = _timed(lambda: vae.decode(latents[label]), device)  # noqa: B023
            times[label]["decode_s"].append(seconds)
            assert pixels.shape == video.shape
    results = {}
    for label, vae in vaes.items():
        _, z, _, h, w = latents[label].shape
        encode_s, decode_s = (statistics.median(times[label][k]) for k in ("encode_s", "decode_s"))
        results[label] = {"params": sum(p.numel() for p in vae.parameters()), "latents": list(latents[label].shape),
                          "dit_tokens_per_latent_frame": (h // 2) * (w // 2), "stored_values_per_latent_frame": z * h * w,
                          "encode_s": encode_s, "decode_s": decode_s, "encode_frames_per_s": video.shape[2] / encode_s}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5, help="1 + 4k frames")
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="the tiny VAEs at 32x32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"wan2.1": "tiny", "wan2.2": "tiny-wan2.2"} if args.smoke else {"wan2.1": "wan2.1", "wan2.2": "wan2.2"}
    size = (32, 32) if args.smoke else (args.height, args.width)
    video = torch.rand(1, 3, args.frames, *size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    video = video.to(device=device, dtype=dtype)
    print(f"device {device} ({torch.get_num_threads()} threads), {dtype}; clip of {args.frames} frames at "
          f"{size[0]}x{size[1]}, medians of {args.repeats}")
    results = {"device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(),
               "frames": args.frames, "size": list(size), "vaes": {}}
    print(f"{'VAE':<12} {'params':>12} {'latents (z,t,h,w)':>20} {'DiT tokens':>10} {'stored':>8} "
          f"{'encode s':>9} {'frames/s':>9} {'decode s':>9}")
    results["vaes"] = measure(names, video, args.repeats)
    for label, r in results["vaes"].items():
        print(f"{label:<12} {r['params']:>12,} {str(tuple(r['latents'][1:])):>20} "
              f"{r['dit_tokens_per_latent_frame']:>10} {r['stored_values_per_latent_frame']:>8} "
              f"{r['encode_s']:>9.3f} {r['encode_frames_per_s']:>9.2f} {r['decode_s']:>9.3f}")
    new, old = results["vaes"]["wan2.2"], results["vaes"]["wan2.1"]
    results["ratios_wan22_over_wan21"] = {key: new[key] / old[key] for key in
                                          ("encode_s", "decode_s", "dit_tokens_per_latent_frame",
                                           "stored_values_per_latent_frame")}
    print("Wan2.2 / Wan2.1: " + ", ".join(f"{k} {v:.2f}x" for k, v in results["ratios_wan22_over_wan21"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
