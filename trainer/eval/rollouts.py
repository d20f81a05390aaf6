"""Open-loop rollouts, as DreamZero evaluates offline: every held-out window is rolled out chunk by chunk
against the KV cache from its REAL context (the first frame, then after each chunk the chunk's real latents
replace the prediction in the cache, as a robot loop would). Each chunk's predicted actions are mapped to the
units of the recorded ones (the model's own output, before the policy server's smoothing), its predicted
video latents kept for comparison with the real ones. `wam demo` rolls out with this code too.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from wam.platform.config import (
    SamplerSection,
    WamConfig,
    guided,
    negative_prompt,
    resolve_preset,
    validate_sampler,
)
from wam.trainer.eval.heldout import HeldOut, Window
from wam.trainer.inference import ChunkRollout, Denoiser
from wam.trainer.model import WamModel


@dataclass
class Rollouts:
    """One model's open-loop predictions on the evaluated windows."""

    labels: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    episodes: list[int] = field(default_factory=list)
    predicted: list[np.ndarray] = field(default_factory=list)  # per window (K, A, D), units of `recorded`
    recorded: list[np.ndarray] = field(default_factory=list)
    normalised_l1: list[list[float]] = field(default_factory=list)  # per window, per chunk: over real dims
    video_mse: list[list[float]] = field(default_factory=list)  # per window, per chunk
    denoise_ms: list[list[float]] = field(default_factory=list)
    dit_steps: list[list[int]] = field(default_factory=list)  # per window, per chunk: steps that ran the transformer


def config_sampler(cfg: WamConfig, steps: int | None = None) -> SamplerSection:
    """The config's sampler, with `steps` denoising steps when given."""
    return cfg.sampler if steps is None else dataclasses.replace(cfg.sampler, steps=steps)


def new_rollout(model: WamModel, cfg: WamConfig, sampler: SamplerSection, heldout: HeldOut,
                denoiser: Denoiser | None = None) -> ChunkRollout:
    """A rollout sampling with `sampler` (through `denoiser`, default eager); a guided one gets its negative
    prompt's features from the held-out data's text encoder."""
    s = resolve_preset(cfg).sample
    validate_sampler(sampler, cfg.flow)
    negative = negative_prompt(sampler, cfg.flow) if guided(sampler) else None
    return ChunkRollout(model, sampler, s, denoiser=denoiser,
                        negative_text=None if negative is None else heldout.encoders.text([negative]).float())


@torch.no_grad()
def roll_out(rollout: ChunkRollout, window: Window, heldout: HeldOut, generator: torch.Generator,
             into: Rollouts) -> None:
    """Predict each chunk from the real context, then write the chunk's real latents into the cache."""
    device = window.latents.device
    f = rollout.frames_per_chunk
    rollout.reset(window.latents[:, :, :1], window.text, window.image, window.i2v)
    predicted, l1, video, ms, dit_steps = [], [], [], [], []
    for c in range(rollout.max_chunks):
        start = time.perf_counter()
        chunk = rollout.act(window.state[c][None].to(device), generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ms.append((time.perf_counter() - start) * 1000)
        dit_steps.append(chunk.dit_steps)
        real = window.latents[:, :, 1 + c * f:1 + (c + 1) * f]
        rollout.observe(real)
        normalised = chunk.actions[0].float().cpu()
        predicted.append(heldout.to_robot(normalised.numpy(), window.anchors[c]))
        l1.append((normalised[:, window.dims] - window.actions[c][:, window.dims]).abs().mean().item())
        video.append((chunk.video.float() - real).square().mean().item())
    into.labels.append(window.label)
    into.prompts.append(window.prompt)
    into.episodes.append(window.episode)
    into.predicted.append(np.stack(predicted))
    into.recorded.append(window.recorded)
    into.normalised_l1.append(l1)
    into.video_mse.append(video)
    into.denoise_ms.append(ms)
    into.dit_steps.append(dit_steps)


def roll_out_models(models: dict[str, WamModel], cfg: WamConfig, heldout: HeldOut, indices: list[int], seed: int,
                    sampler: SamplerSection) -> dict[str, Rollouts]:
    """Every model on the same windows with the same noise and sampler."""
    return roll_out_variants({name: (model, sampler) for name, model in models.items()}, cfg, heldout, indices, seed)


def roll_out_variants(variants: dict[str, tuple[WamModel, SamplerSection]], cfg: WamConfig, heldout: HeldOut,
                      indices: list[int], seed: int) -> dict[str, Rollouts]:
    """Every (model, sampler) variant on the same windows with the same noise (one generator per variant,
    seeded alike); each window is read and encoded once."""
    device = next(iter(variants.values()))[0].patch_embedding.weight.device
    rollouts = {name: new_rollout(model, cfg, sampler, heldout) for name, (model, sampler) in variants.items()}
    generators = {name: torch.Generator(device).manual_seed(seed) for name in variants}
    results = {name: Rollouts() for name in variants}
    for index in indices:
        window = heldout.window(index)
        for name in variants:
            roll_out(rollouts[name], window, heldout, generators[name], results[name])
    return results


def summarize(r: Rollouts) -> dict:
    """Metrics over all windows: per action dim, per chunk, and overall means."""
    error = np.stack(r.predicted) - np.stack(r.recorded)  # (W, K, A, D)
    per_dim_mse, per_dim_l1 = np.square(error).mean(axis=(0, 1, 2)), np.abs(error).mean(axis=(0, 1, 2))
    video = np.asarray(r.video_mse)
    return {
        "action_mse": float(per_dim_mse.mean()),
        "action_l1": float(per_dim_l1.mean()),
        "action_l1_normalised": float(np.mean(r.normalised_l1)),
        "video_mse": float(video.mean()),
        "denoise_ms": float(np.mean(r.denoise_ms)),
        "dit_steps": float(np.mean(r.dit_steps)),
        "per_dim": [{"mse": float(m), "l1": float(a)} for m, a in zip(per_dim_mse, per_dim_l1, strict=True)],
        "per_chunk": [{"action_l1": float(a), "video_mse": float(v), "denoise_ms": float(t)} for a, v, t in
                      zip(np.abs(error).mean(axis=(0, 2, 3)), video.mean(axis=0), np.mean(r.denoise_ms, axis=0),
                          strict=True)],
    }
