"""`wam demo`: the tiny preset's closed-loop, chunk-wise inference on a synthetic scene.

A square moves on a table; each chunk it follows a new velocity. The frozen encoders turn the prompt, the
first frame and the clip into features and latents; the rollout denoises each chunk's actions and video
against its KV cache, then writes the real frames of that chunk into the cache, as a robot loop would.
The model is untrained here (training lands with `wam train`), so the actions are not meaningful yet;
what the demo shows is the pipeline, its latency, and that cached inference equals the full forward.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

from wam.platform.config import SamplerSection
from wam.platform.presets import get_preset
from wam.trainer.inference import ChunkRollout
from wam.trainer.model import WamInputs, build_model, model_config
from wam.trainer.model.encoders import FrozenEncoders

PROMPT = "push the red square across the table"


def synthetic_scene(chunks: int, frames_per_chunk: int, size: int, generator: torch.Generator):
    """A red square on a grey table. Returns pixels (1, 3, 1 + 4*F*K, S, S) in [-1, 1] and the square's
    position (the robot state) at the start of each chunk, (K, 2) in [0, 1]."""
    pixel_frames = 1 + 4 * frames_per_chunk * chunks
    velocity = (torch.rand(chunks, 2, generator=generator) - 0.5) * 0.05
    per_frame = torch.cat([torch.zeros(1, 2), velocity.repeat_interleave(4 * frames_per_chunk, dim=0)])
    position = (0.5 + per_frame.cumsum(0)).clamp(0.1, 0.9)
    video = torch.full((1, 3, pixel_frames, size, size), -0.2)
    half = size // 10
    for t, (x, y) in enumerate((position * size).long().tolist()):
        video[0, :, t, max(y - half, 0):y + half, max(x - half, 0):x + half] = torch.tensor([0.9, -0.8, -0.8])[:, None, None]
    chunk_starts = position[0::4 * frames_per_chunk][:chunks]
    return video, chunk_starts


@torch.no_grad()
def run_demo(console: Console, steps: int = 4, seed: int = 0) -> None:
    preset = get_preset("tiny")
    arch, sample = preset.arch, preset.sample
    k, f, a = sample.num_chunks, sample.frames_per_chunk, sample.actions_per_chunk
    size = 8 * sample.latent_height
    generator = torch.Generator().manual_seed(seed)

    model = build_model(model_config(arch, sample), seed=seed).eval()
    encoders = FrozenEncoders.build(arch, seed=seed)
    console.print(f"[bold]tiny preset[/]: {sum(p.numel() for p in model.parameters()):,} trained parameters, "
                  f"{arch.num_layers} blocks; {k} chunks x ({f} latent frames + {a} actions), {steps} denoising steps")

    video, positions = synthetic_scene(k, f, size, generator)
    latents = encoders.vae.encode(video)
    text = encoders.text([PROMPT])
    image = encoders.image(video[:, :, 0])
    i2v = encoders.i2v_condition(video[:, :, 0], latents.shape[2])
    state = torch.zeros(k, 1, arch.state_dim)
    state[:, 0, :2] = positions
    console.print(f"encoded {video.shape[2]} frames of {size}x{size} px -> latents {tuple(latents.shape[1:])}; "
                  f"prompt {PROMPT!r} -> {tuple(text.shape[1:])} text features; first frame -> "
                  f"{tuple(image.shape[1:])} CLIP tokens")

    rollout = ChunkRollout(model, SamplerSection(steps=steps), max_chunks=k, frames_per_chunk=f,
                           actions_per_chunk=a, latent_hw=latents.shape[-2:])
    rollout.reset(latents[:, :, :1], text, image, i2v)
    table = Table("chunk", "denoise (ms)", "first action (dims 0-2)", "video error vs real frames")
    for c in range(k):
        start = time.perf_counter()
        chunk = rollout.act(state[c], generator)
        elapsed = (time.perf_counter() - start) * 1000
        real = latents[:, :, 1 + c * f:1 + (c + 1) * f]
        rollout.observe(real)  # the robot saw these frames: they replace the prediction in the cache
        first = ", ".join(f"{v:+.3f}" for v in chunk.actions[0, 0, :3].tolist())
        table.add_row(str(c), f"{elapsed:.1f}", first, f"{(chunk.video - real).square().mean():.3f}")
    console.print(table)

    # The cached path must agree with one full teacher-forcing forward over the same inputs.
    noisy_video = torch.randn(1, arch.latent_channels, k * f, *latents.shape[-2:], generator=generator)
    noisy_actions = torch.randn(1, k, a, arch.action_dim, generator=generator)
    t = torch.full((1, k), 500.0)
    full = model(WamInputs(video=latents, noisy_video=noisy_video, noisy_actions=noisy_actions,
                           state=state.transpose(0, 1), video_t=t, action_t=t, text=text, image=image, i2v_cond=i2v))
    rollout.reset(latents[:, :, :1], text, image, i2v)
    worst = 0.0
    for c in range(k):
        out = model.predict(rollout.cache, noisy_video[:, :, c * f:(c + 1) * f], noisy_actions[:, c], state[c],
                            t[:, c], t[:, c])
        worst = max(worst, (out.actions - full.actions[:, c]).abs().max().item(),
                    (out.video - full.video[:, :, c * f:(c + 1) * f]).abs().max().item())
        rollout.observe(latents[:, :, 1 + c * f:1 + (c + 1) * f])
    console.print(f"KV-cached chunk inference vs full-sequence forward: max abs difference {worst:.2e}")
