"""`wam demo`: closed-loop, chunk-wise inference of the tiny preset on held-out synthetic episodes.

The rollout denoises each chunk's actions and video against its KV cache, then writes the chunk's REAL
latents into the cache, as a robot loop would. With `--weights` (a trained checkpoint exported by
`wam export`) it compares the trained model's actions with the recorded ones and with an untrained
model's; `make demo` trains first, so the comparison means something.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from wam.platform.config import SamplerSection
from wam.platform.presets import get_preset
from wam.trainer.data.synthetic import REAL_ACTION_DIMS, SyntheticLatents
from wam.trainer.inference import ChunkRollout
from wam.trainer.model import WamInputs, WamModel, build_model, model_config
from wam.trainer.model.encoders import FrozenEncoders

HELD_OUT = 1_000_000  # episode indices from here on are never trained on


def _rollout_errors(model: WamModel, world: SyntheticLatents, episodes: range, text_encoder, steps: int,
                    seed: int) -> tuple[list[float], list[float], list[float]]:
    """Per-chunk action MAE (real dims), denoising latency (ms) and video MSE, averaged over episodes."""
    s = world.shape
    rollout = ChunkRollout(model, SamplerSection(steps=steps), max_chunks=s.num_chunks,
                           frames_per_chunk=s.frames_per_chunk, actions_per_chunk=s.actions_per_chunk,
                           latent_hw=(s.latent_height, s.latent_width))
    generator = torch.Generator().manual_seed(seed)
    f = s.frames_per_chunk
    mae, latency, video_err = ([0.0] * s.num_chunks for _ in range(3))
    for episode in episodes:
        sample = world[episode]
        video = sample.video[None]
        rollout.reset(video[:, :, :1], text_encoder([sample.prompt]), _batch(sample.image), _batch(sample.i2v_cond))
        for c in range(s.num_chunks):
            start = time.perf_counter()
            chunk = rollout.act(sample.state[c][None], generator)
            latency[c] += (time.perf_counter() - start) * 1000 / len(episodes)
            real = video[:, :, 1 + c * f:1 + (c + 1) * f]
            rollout.observe(real)
            error = (chunk.actions[0, :, :REAL_ACTION_DIMS] - sample.actions[c, :, :REAL_ACTION_DIMS]).abs().mean()
            mae[c] += error.item() / len(episodes)
            video_err[c] += (chunk.video - real).square().mean().item() / len(episodes)
    return mae, latency, video_err


def _batch(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t[None]


@torch.no_grad()
def run_demo(console: Console, steps: int = 4, seed: int = 0, weights: Path | None = None, episodes: int = 8) -> None:
    preset = get_preset("tiny")
    arch, sample = preset.arch, preset.sample
    config = model_config(arch, sample)
    untrained = build_model(config, seed=seed).eval()
    text_encoder = FrozenEncoders.build(arch, seed=seed, vision=False).text  # the one training used
    world = SyntheticLatents(arch, sample, episodes=1, seed=seed)
    held_out = range(HELD_OUT, HELD_OUT + episodes)
    console.print(f"[bold]tiny preset[/]: {sum(p.numel() for p in untrained.parameters()):,} trained parameters; "
                  f"{sample.num_chunks} chunks x ({sample.frames_per_chunk} latent frames + {sample.actions_per_chunk} "
                  f"actions); {steps} denoising steps; {episodes} held-out episodes, e.g. {world[HELD_OUT].prompt!r}")

    models = {"untrained": untrained}
    if weights is not None:
        trained = build_model(config, seed=seed).eval()
        trained.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
        models = {"trained": trained, **models}
    results = {name: _rollout_errors(model, world, held_out, text_encoder, steps, seed) for name, model in models.items()}

    table = Table("chunk", *(f"{name} action MAE" for name in results), *(f"{name} video MSE" for name in results),
                  "denoise ms (KV cache)")
    for c in range(sample.num_chunks):
        table.add_row(str(c), *(f"{r[0][c]:.3f}" for r in results.values()), *(f"{r[2][c]:.3f}" for r in results.values()),
                      f"{next(iter(results.values()))[1][c]:.1f}")
    console.print(table)
    if weights is not None:
        trained_mae, untrained_mae = (sum(results[k][0]) / sample.num_chunks for k in ("trained", "untrained"))
        console.print(f"action error over held-out episodes: trained {trained_mae:.3f} vs untrained {untrained_mae:.3f}")

    # The cached path must agree with one full teacher-forcing forward over the same inputs.
    model = next(iter(models.values()))
    episode = world[HELD_OUT]
    k, f = sample.num_chunks, sample.frames_per_chunk
    inputs = WamInputs.random(arch, sample, batch=1, seed=seed)
    inputs.video, inputs.state = episode.video[None], episode.state[None]
    inputs.text, inputs.image, inputs.i2v_cond = text_encoder([episode.prompt]), _batch(episode.image), _batch(episode.i2v_cond)
    full = model(inputs)
    rollout = ChunkRollout(model, SamplerSection(steps=steps), max_chunks=k, frames_per_chunk=f,
                           actions_per_chunk=sample.actions_per_chunk, latent_hw=(sample.latent_height, sample.latent_width))
    rollout.reset(inputs.video[:, :, :1], inputs.text, inputs.image, inputs.i2v_cond)
    worst = 0.0
    for c in range(k):
        out = model.predict(rollout.cache, inputs.noisy_video[:, :, c * f:(c + 1) * f], inputs.noisy_actions[:, c],
                            inputs.state[:, c], inputs.video_t[:, c], inputs.action_t[:, c])
        worst = max(worst, (out.actions - full.actions[:, c]).abs().max().item(),
                    (out.video - full.video[:, :, c * f:(c + 1) * f]).abs().max().item())
        rollout.observe(inputs.video[:, :, 1 + c * f:1 + (c + 1) * f])
    console.print(f"KV-cached chunk inference vs full-sequence forward: max abs difference {worst:.2e}")
