"""Held-out windows for evaluation, as the model sees them and as the robot recorded them.

A LeRobot dataset is read with the training profile and the dataset's own q01/q99 stats; a model trained on
procedural latents (data.source: synthetic) is evaluated on episodes of the same generator that training
never drew (their actions are in the generator's units). Each window's frames are encoded by the frozen
encoders exactly as in training (FrozenEncoders.encode_clip).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from wam.platform.config import DatasetEntry, WamConfig, resolve_preset
from wam.platform.errors import ConfigError
from wam.trainer.data.latent_episodes import REAL_ACTION_DIMS, SyntheticLatents
from wam.trainer.data.robot import RobotSource
from wam.trainer.model.encoders import FrozenEncoders
from wam.trainer.serve.actions import unnormalize


@dataclass
class Window:
    """One held-out window as the model sees it, and what the robot recorded."""

    label: str  # e.g. "episode 2 @ frame 36"
    episode: int
    prompt: str
    latents: torch.Tensor  # (1, z, 1 + K*F, h, w) real video latents, the first frame included
    text: torch.Tensor  # (1, text_len, text_dim) prompt features
    image: torch.Tensor | None  # (1, tokens, image_dim) CLIP tokens of the first frame
    i2v: torch.Tensor | None  # (1, 4 + z, 1 + K*F, h, w) I2V channels
    state: torch.Tensor  # (K, state_dim) normalised and padded, as in training
    actions: torch.Tensor  # (K, A, action_dim) normalised targets, as in training
    dims: torch.Tensor  # (action_dim,) bool: real action dims
    recorded: np.ndarray  # (K, A, D) recorded actions in robot units
    anchors: np.ndarray  # (K, state dims) robot-unit state at each chunk's start


class HeldOut(ABC):
    """Held-out windows of one dataset, and the map from the model's normalised actions to robot units."""

    units: str  # what the action errors are measured in
    description: str
    dim_names: list[str]
    encoders: FrozenEncoders  # as in training (the prompts' features, the negative prompt's too)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def window(self, index: int) -> Window: ...

    @abstractmethod
    def to_robot(self, normalised: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        """(A, action_dim) normalised chunk -> (A, D) in the units of `recorded`."""

    def select(self, count: int) -> list[int]:
        """`count` windows spread evenly over the data (all of them when there are fewer)."""
        if count >= len(self):
            return list(range(len(self)))
        return sorted({int(i) for i in np.linspace(0, len(self) - 1, count).round()})


class RobotHeldOut(HeldOut):
    def __init__(self, cfg: WamConfig, uri: str, profile: str, encoders: FrozenEncoders):
        preset = resolve_preset(cfg)
        self.shape, self.encoders = preset.sample, encoders
        self.source = RobotSource([DatasetEntry(uri=uri, profile=profile)], cfg.data.profiles, preset.arch,
                                  preset.sample, cfg.seed, decoder=cfg.data.decoder)
        chosen = self.source.profiles[0]
        if not chosen.has_actions:
            raise ConfigError(f"profile {chosen.name} reads no actions from {uri}: evaluate on data with actions")
        windows = self.source.windows
        self.order = sorted(range(len(windows)), key=lambda i: (windows[i].episode, windows[i].start))
        _, _, self.action_q01, self.action_q99 = self.source.stats[0].arrays()
        self.relative_dims = chosen.relative_dims
        self.units = "robot"
        self.description = f"{uri} (profile {chosen.name})"
        self.dim_names = _dim_names(self.source.datasets[0].info, chosen.action_keys)

    def __len__(self) -> int:
        return len(self.order)

    @torch.no_grad()
    def window(self, index: int) -> Window:
        position = self.order[index]
        where = self.source.windows[position]
        data = self.source.load(where)
        sample = self.source.transform(position, where, data)
        clip = self.encoders.encode_clip(sample.pixels[None])
        k = self.shape.num_chunks
        return Window(f"episode {where.episode} @ frame {where.start}", where.episode, sample.prompt,
                      clip.latents.float(), self.encoders.text([sample.prompt]).float(), _float(clip.image),
                      _float(clip.i2v), sample.state,
                      sample.actions, sample.action_dims, data.actions.reshape(k, -1, data.actions.shape[1]),
                      data.state)

    def to_robot(self, normalised: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        actions = unnormalize(normalised[:, :len(self.action_q01)].astype(np.float64), self.action_q01, self.action_q99)
        if self.relative_dims:
            actions[:, list(self.relative_dims)] += anchor[list(self.relative_dims)]
        return actions


class SyntheticHeldOut(HeldOut):
    """Episodes of the procedural latent generator that training never drew (indices past data.episodes)."""

    def __init__(self, cfg: WamConfig, count: int, encoders: FrozenEncoders):
        preset = resolve_preset(cfg)
        self.first = cfg.data.episodes
        self.source = SyntheticLatents(preset.arch, preset.sample, self.first + count, cfg.seed)
        self.count, self.encoders = count, encoders
        self.units = "procedural"  # the generator's own velocity and gripper commands
        self.description = f"{count} procedural episodes never trained on (seed {cfg.seed})"
        self.dim_names = ["velocity x", "velocity y", "gripper"][:REAL_ACTION_DIMS]

    def __len__(self) -> int:
        return self.count

    @torch.no_grad()
    def window(self, index: int) -> Window:
        episode = self.first + index
        s = self.source[episode]
        device = next(self.encoders.text.parameters()).device
        actions = s.actions[:, :, :REAL_ACTION_DIMS].numpy().astype(np.float64)
        return Window(f"episode {episode}", episode, s.prompt, s.video[None].to(device),
                      self.encoders.text([s.prompt]).float(), _batched(s.image, device), _batched(s.i2v_cond, device),
                      s.state, s.actions, s.action_dims, actions, s.state.numpy())

    def to_robot(self, normalised: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        return normalised[:, :REAL_ACTION_DIMS].astype(np.float64)


def _float(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float()


def _batched(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if x is None else x[None].to(device)


def _dim_names(info: dict, keys: tuple[str, ...]) -> list[str]:
    """Per action dim, the dataset's own axis names when it declares them (LeRobot `names`), else key[i]."""
    names: list[str] = []
    for key in keys:
        feature = info.get("features", {}).get(key, {})
        size = math.prod(feature.get("shape", [1]))
        axes = feature.get("names")
        axes = axes.get("axes", axes.get("motors")) if isinstance(axes, dict) else axes
        names += list(axes) if isinstance(axes, list) and len(axes) == size else [f"{key}[{i}]" for i in range(size)]
    return names


def held_out(cfg: WamConfig, dataset: str | None, profile: str | None, windows: int,
             encoders: FrozenEncoders) -> HeldOut:
    if cfg.data.source == "synthetic":
        if dataset is not None:
            raise ConfigError("this checkpoint was trained on procedural latents (data.source: synthetic): it is "
                              "evaluated on held-out procedural episodes, not on a LeRobot dataset; drop --data")
        return SyntheticHeldOut(cfg, windows, encoders)
    if dataset is None:
        trained_on = ", ".join(e.uri for e in cfg.data.datasets)
        raise ConfigError(f"name the held-out LeRobot dataset with --data (this checkpoint was trained on {trained_on}; "
                          "evaluate on episodes it never saw, e.g. from `wam data synth OUT --seed 1`)")
    return RobotHeldOut(cfg, dataset, profile or cfg.data.datasets[0].profile, encoders)
