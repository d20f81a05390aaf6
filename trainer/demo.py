"""`wam demo`: closed-loop, chunk-wise inference on held-out episodes of a LeRobot dataset.

For each held-out window, the frozen encoders turn the prompt, the first frame and the recorded frames
into features and latents; the rollout denoises each chunk's actions and video against its KV cache,
then writes the chunk's REAL latents into the cache, as a robot loop would. With `--weights` (a checkpoint
exported by `wam export`, which carries its training config) the trained policy's actions are compared
with the recorded ones and with an untrained model's.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import load_file

from wam.platform.config import SamplerSection, WamConfig, config_from_dict, load_config, resolve_preset
from wam.platform.errors import ConfigError
from wam.trainer.data.robot import RobotSource
from wam.trainer.data.synth import SynthOptions, synthesize
from wam.trainer.inference import ChunkRollout
from wam.trainer.model import WamInputs, WamModel, build_model, model_config
from wam.trainer.model.encoders import EncoderPaths, FrozenEncoders


def _run_config(weights: Path | None, dataset: str) -> WamConfig:
    """The training config the weights carry (so shapes, seed and profile match), else configs/demo.yaml's."""
    if weights is not None:
        with safe_open(str(weights), framework="pt") as f:
            cfg = config_from_dict(json.loads(f.metadata()["config"]))
        if cfg.data.source != "lerobot":
            raise ConfigError(f"{weights} was trained on data.source={cfg.data.source}; `wam demo` rolls a policy out "
                              "on robot video, so use weights trained on a LeRobot dataset (as `make demo` does)")
    else:
        cfg = load_config(None, ["sample.actions_per_chunk=24", "sample.num_chunks=2", "data.source=lerobot",
                                 f"data.datasets=[{{uri: {dataset}, profile: droid}}]"])
    cfg.data.datasets[0].uri = dataset
    return cfg


def _rollout(model: WamModel, source: RobotSource, encoders: FrozenEncoders, windows: list[int], cfg: WamConfig,
             steps: int) -> tuple[list[float], list[float], list[float]]:
    """Per chunk: action MAE on the real dims (normalised units), denoising latency (ms), video MSE."""
    s = source.shape
    sampler = cfg.sampler if steps is None else dataclasses.replace(cfg.sampler, steps=steps)
    rollout = ChunkRollout(model, sampler,
                           max_chunks=s.num_chunks, frames_per_chunk=s.frames_per_chunk,
                           actions_per_chunk=s.actions_per_chunk, latent_hw=(s.latent_height, s.latent_width))
    generator = torch.Generator().manual_seed(cfg.seed)
    f = s.frames_per_chunk
    mae, latency, video_err = ([0.0] * s.num_chunks for _ in range(3))
    for index in windows:
        sample = source[index]
        frames = sample.pixels[None].float() / 127.5 - 1
        latents = encoders.vae.encode(frames)
        first = frames[:, :, 0]
        image = encoders.image(first) if encoders.image is not None else None
        i2v = encoders.i2v_condition(first, latents.shape[2]) if model.arch.i2v_concat else None
        rollout.reset(latents[:, :, :1], encoders.text([sample.prompt]), image, i2v)
        dims = sample.action_dims
        for c in range(s.num_chunks):
            start = time.perf_counter()
            chunk = rollout.act(sample.state[c][None], generator)
            latency[c] += (time.perf_counter() - start) * 1000 / len(windows)
            real = latents[:, :, 1 + c * f:1 + (c + 1) * f]
            rollout.observe(real)
            mae[c] += (chunk.actions[0][:, dims] - sample.actions[c][:, dims]).abs().mean().item() / len(windows)
            video_err[c] += (chunk.video - real).square().mean().item() / len(windows)
    return mae, latency, video_err


@torch.no_grad()
def run_demo(console: Console, weights: Path | None = None, dataset: str | None = None, episodes: int = 8,
             steps: int | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if dataset is None:  # a fresh held-out dataset, never trained on
            dataset = str(synthesize(Path(tmp) / "heldout", SynthOptions(episodes=2, seed=1_000_003)))
        cfg = _run_config(weights, dataset)
        preset = resolve_preset(cfg)
        arch = preset.arch
        source = RobotSource(cfg.data.datasets, cfg.data.profiles, arch, preset.sample, cfg.seed)
        encoders = FrozenEncoders.build(arch, EncoderPaths(**vars(cfg.encoders)), seed=cfg.seed)  # as training did
        config = model_config(arch, preset.sample)
        models = {"untrained": build_model(config, seed=cfg.seed).eval()}
        if weights is not None:
            trained = build_model(config, seed=cfg.seed).eval()
            trained.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
            models = {"trained": trained, **models}
        windows = list(range(0, len(source), max(1, len(source) // episodes)))[:episodes]
        s = preset.sample
        console.print(f"[bold]{preset.name}[/]: {sum(p.numel() for p in models['untrained'].parameters()):,} "
                      f"parameters; {s.num_chunks} chunks x ({s.frames_per_chunk} latent frames + {s.actions_per_chunk} "
                      f"actions); {len(windows)} held-out windows of {dataset}, e.g. {source[windows[0]].prompt!r}")
        results = {name: _rollout(m, source, encoders, windows, cfg, steps) for name, m in models.items()}

        table = Table("chunk", *(f"{n} action MAE" for n in results), *(f"{n} video MSE" for n in results),
                      "denoise ms (KV cache)")
        for c in range(s.num_chunks):
            table.add_row(str(c), *(f"{r[0][c]:.3f}" for r in results.values()),
                          *(f"{r[2][c]:.3f}" for r in results.values()), f"{next(iter(results.values()))[1][c]:.1f}")
        console.print(table)
        if weights is not None:
            for label, i in (("action error", 0), ("video error", 2)):
                trained, untrained = (sum(results[k][i]) / s.num_chunks for k in ("trained", "untrained"))
                console.print(f"{label} over held-out windows: trained {trained:.3f} vs untrained {untrained:.3f}")
        _check_cache_equals_full_forward(console, next(iter(models.values())), preset, cfg.seed)


def _check_cache_equals_full_forward(console: Console, model: WamModel, preset, seed: int) -> None:
    """The cached chunk-by-chunk path must agree with one full teacher-forcing forward."""
    s = preset.sample
    k, f = s.num_chunks, s.frames_per_chunk
    inputs = WamInputs.random(preset.arch, s, batch=1, seed=seed)
    full = model(inputs)
    rollout = ChunkRollout(model, SamplerSection(), max_chunks=k, frames_per_chunk=f,
                           actions_per_chunk=s.actions_per_chunk, latent_hw=(s.latent_height, s.latent_width))
    rollout.reset(inputs.video[:, :, :1], inputs.text, inputs.image, inputs.i2v_cond)
    worst = 0.0
    for c in range(k):
        out = model.predict(rollout.cache, inputs.noisy_video[:, :, c * f:(c + 1) * f], inputs.noisy_actions[:, c],
                            inputs.state[:, c], inputs.video_t[:, c], inputs.action_t[:, c])
        worst = max(worst, (out.actions - full.actions[:, c]).abs().max().item(),
                    (out.video - full.video[:, :, c * f:(c + 1) * f]).abs().max().item())
        rollout.observe(inputs.video[:, :, 1 + c * f:1 + (c + 1) * f])
    console.print(f"KV-cached chunk inference vs full-sequence forward: max abs difference {worst:.2e}")
