"""The one YAML schema of the platform (omegaconf structured config).

The same file runs `wam` locally and inside a pod; a TrainJob embeds overrides of it. Unknown keys and
wrong types are errors that name the key and the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wam.platform.errors import ConfigError
from wam.platform.presets import Preset, WamArch, get_preset

ATTENTION_BACKENDS = ("sdpa", "flex")
NOISE_SCHEDULES = ("coupled", "flash")
LOSS_WEIGHTINGS = ("uniform", "bell")


@dataclass
class ModelSection:
    preset: str = "tiny"
    attention: str = "sdpa"  # sdpa (dense mask; runs everywhere) | flex (block-sparse BlockMask, GPU training)
    # Architecture overrides of the preset; None keeps the preset's value.
    dim: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    ffn_dim: int | None = None


@dataclass
class SampleSection:
    """Latent shape of one training sample; None keeps the preset's default."""

    num_chunks: int | None = None
    frames_per_chunk: int | None = None
    actions_per_chunk: int | None = None
    latent_height: int | None = None
    latent_width: int | None = None


@dataclass
class FlowSection:
    shift: float = 5.0  # sigma' = shift*sigma / (1 + (shift-1)*sigma)
    schedule: str = "coupled"  # coupled: video and action share t per chunk; flash: DreamZero-Flash
    flash_video_beta: tuple[float, float] = (7.0, 1.0)  # flash: video noise level ~ Beta(a, b), mean a/(a+b)
    loss_weighting: str = "bell"  # bell: DreamZero's exp(-2((t-500)/1000)^2) weighting; uniform: none
    video_loss_weight: float = 1.0
    action_loss_weight: float = 1.0


@dataclass
class SamplerSection:
    steps: int = 4  # denoising steps per chunk (1 works for Flash-trained checkpoints)
    shift: float = 5.0
    video_final_sigma: float = 0.0  # stop video denoising early (actions always go to 0)


@dataclass
class WamConfig:
    model: ModelSection = field(default_factory=ModelSection)
    sample: SampleSection = field(default_factory=SampleSection)
    flow: FlowSection = field(default_factory=FlowSection)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    seed: int = 0


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(options)}")


def validate(cfg: WamConfig) -> None:
    """Checks that need more than a type: choices, ranges, and the resolved architecture."""
    _choice(cfg.model.attention, ATTENTION_BACKENDS, "model.attention")
    _choice(cfg.flow.schedule, NOISE_SCHEDULES, "flow.schedule")
    _choice(cfg.flow.loss_weighting, LOSS_WEIGHTINGS, "flow.loss_weighting")
    if cfg.flow.shift <= 0 or cfg.sampler.shift <= 0:
        raise ConfigError("flow.shift and sampler.shift must be > 0")
    if min(cfg.flow.flash_video_beta) <= 0:
        raise ConfigError(f"flow.flash_video_beta must be two positive numbers, got {cfg.flow.flash_video_beta}")
    if cfg.sampler.steps < 1:
        raise ConfigError(f"sampler.steps must be >= 1, got {cfg.sampler.steps}")
    if not 0.0 <= cfg.sampler.video_final_sigma < 1.0:
        raise ConfigError(f"sampler.video_final_sigma must be in [0, 1), got {cfg.sampler.video_final_sigma}")
    resolve_preset(cfg)


def resolve_preset(cfg: WamConfig) -> Preset:
    """The preset with the config's architecture and sample overrides applied and validated."""
    arch_overrides = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelSection)
                      if f.name in {g.name for g in dataclasses.fields(WamArch)}
                      and getattr(cfg.model, f.name) is not None}
    preset = get_preset(cfg.model.preset, **arch_overrides)
    sample_overrides = {k: v for k, v in dataclasses.asdict(cfg.sample).items() if v is not None}
    sample = dataclasses.replace(preset.sample, **sample_overrides)
    sample.validate(preset.arch)
    return dataclasses.replace(preset, sample=sample)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> WamConfig:
    """Schema defaults <- YAML file <- `key=value` overrides, validated. Raises ConfigError on bad input."""
    schema = OmegaConf.structured(WamConfig)
    layers: list[Any] = [schema]
    source = "overrides"
    try:
        if path is not None:
            source = str(path)
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist")
            layers.append(OmegaConf.load(path))
        source = "overrides" if path is None else f"{path} or its overrides"
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged: DictConfig = OmegaConf.merge(*layers)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"invalid config in {source}: key {key!r}: {_first_line(err)}") from None
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, WamConfig)
    validate(cfg)
    return cfg


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def to_yaml(cfg: WamConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

