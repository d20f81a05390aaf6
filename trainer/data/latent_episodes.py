"""Procedural episodes in latent space (`data.source: synthetic`): fast tests and smoke runs with no video to
decode. (`wam data synth`, in synth_dataset.py, writes a real LeRobot dataset instead.)

Each episode is a latent "table" (a smooth background) with one object (a blob with its own channel
signature). The actions are the object's velocity and a gripper command: the video shows the object move
by exactly the commanded amounts and brighten while the gripper is closed, so video and actions predict
each other and the loss means something. The prompt names the direction of motion. Everything is a
function of (seed, episode), so any sample can be regenerated anywhere.

Image tokens and the I2V channels are synthetic stand-ins computed from the first latent frame (pooled
patches through a fixed projection; mask + first latent), shaped like the CLIP / VAE conditioning they
replace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wam.platform.presets import SampleShape, WamArch

DIRECTIONS = {(1, 0): "right", (-1, 0): "left", (0, 1): "down", (0, -1): "up"}
SPEED = 0.04  # latent-frame widths per action step at full command
REAL_ACTION_DIMS = 3  # vx, vy, gripper; the rest is padding


@dataclass
class Sample:
    video: torch.Tensor  # (z, 1 + K*F, h, w) clean latents
    actions: torch.Tensor  # (K, A, action_dim) in [-1, 1], padded dims zero
    action_dims: torch.Tensor  # (action_dim,) bool: which dims are real
    has_actions: bool
    state: torch.Tensor  # (K, state_dim) object position and gripper at each chunk start
    prompt: str
    image: torch.Tensor | None  # (image_tokens, image_dim)
    i2v_cond: torch.Tensor | None  # (4 + z, 1 + K*F, h, w)


class SyntheticLatents:
    """Episode i -> one training sample of the given geometry."""

    def __init__(self, arch: WamArch, sample: SampleShape, episodes: int, seed: int, video_only_fraction: float = 0.0,
                 min_chunks: int | None = None):
        """`min_chunks`: episode i is a window of min_chunks..K chunks (packing), drawn from (seed, i); None: K."""
        self.arch, self.shape, self.min_chunks = arch, sample, min_chunks
        self.episodes, self.seed, self.video_only_fraction = episodes, seed, video_only_fraction
        rng = np.random.default_rng([seed, 2**31 - 1])
        self.image_projection = rng.standard_normal((arch.latent_channels, arch.image_dim)) / np.sqrt(arch.latent_channels)

    def __len__(self) -> int:
        return self.episodes

    def chunks(self, episode: int) -> int:
        if self.min_chunks is None:
            return self.shape.num_chunks
        return int(np.random.default_rng([self.seed, episode, 1]).integers(self.min_chunks, self.shape.num_chunks + 1))

    def __getitem__(self, episode: int) -> Sample:
        a, s = self.arch, self.shape
        rng = np.random.default_rng([self.seed, episode])
        k, f, n_act = s.num_chunks, s.frames_per_chunk, s.actions_per_chunk
        z, h, w = a.latent_channels, s.latent_height, s.latent_width

        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        steps = k * n_act
        speed = np.repeat(0.5 + 0.5 * rng.random(k), n_act)[:, None]  # each chunk at its own speed
        velocity = np.clip(speed * np.array(direction) + 0.2 * rng.standard_normal((steps, 2)), -1, 1)
        gripper = np.repeat(rng.random(k) < 0.5, n_act).astype(np.float64)
        start = 0.3 + 0.4 * rng.random(2)
        position = start + SPEED * np.concatenate([np.zeros((1, 2)), np.cumsum(velocity, axis=0)])  # (steps+1, 2)

        # latent frame 0 at step 0; chunk c's F frames evenly over its A steps
        frame_steps = [0] + [c * n_act + (j + 1) * n_act // f for c in range(k) for j in range(f)]
        background = self._smooth_field(rng, z, h, w)
        signature = rng.standard_normal(z)
        yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        frames = []
        for t in frame_steps:
            px, py = position[t]
            blob = np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * 0.08**2))
            grip = gripper[min(t, steps - 1)]
            frames.append(background + (1.5 + grip) * signature[:, None, None] * blob)
        video = np.stack(frames, axis=1)  # (z, 1 + K*F, h, w)

        actions = np.zeros((k, n_act, a.action_dim))
        actions[:, :, :2] = velocity.reshape(k, n_act, 2)
        actions[:, :, 2] = gripper.reshape(k, n_act) * 2 - 1
        has_actions = rng.random() >= self.video_only_fraction
        action_dims = np.zeros(a.action_dim, dtype=bool)
        action_dims[:REAL_ACTION_DIMS] = has_actions
        state = np.zeros((k, a.state_dim))
        chunk_starts = np.arange(k) * n_act
        state[:, :2] = position[chunk_starts] * 2 - 1
        state[:, 2] = gripper[chunk_starts] * 2 - 1
        first = video[:, 0]
        k = self.chunks(episode)  # the episode's first k chunks: a shorter window of the same motion
        video, actions, state = video[:, :1 + k * f], actions[:k], state[:k]
        return Sample(
            video=torch.as_tensor(video, dtype=torch.float32),
            actions=torch.as_tensor(actions if has_actions else np.zeros_like(actions), dtype=torch.float32),
            action_dims=torch.as_tensor(action_dims),
            has_actions=bool(has_actions),
            state=torch.as_tensor(state, dtype=torch.float32),
            prompt=f"move the object {DIRECTIONS[direction]}",
            image=self._image_tokens(first) if a.has_image_branch else None,
            i2v_cond=self._i2v_cond(first, video.shape[1]) if a.i2v_concat else None,
        )

    @staticmethod
    def _smooth_field(rng: np.random.Generator, z: int, h: int, w: int) -> np.ndarray:
        """A low-frequency background: a 3x3 random grid, bilinearly upsampled."""
        coarse = torch.as_tensor(rng.standard_normal((1, z, 3, 3)))
        return 0.5 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0].numpy()

    def _image_tokens(self, first: np.ndarray) -> torch.Tensor:
        """1 pooled + (n-1) patch tokens of the first frame through a fixed projection (CLIP's shape)."""
        grid = int(round((self.arch.image_tokens - 1) ** 0.5))
        z, h, w = first.shape
        rows = np.array_split(np.arange(h), grid)
        cols = np.array_split(np.arange(w), grid)
        patches = [first[:, r][:, :, c].mean(axis=(1, 2)) for r in rows for c in cols]
        tokens = np.stack([first.mean(axis=(1, 2))] + patches)  # (1 + grid^2, z)
        tokens = np.resize(tokens, (self.arch.image_tokens, z))  # exact count even if not 1 + square
        return torch.as_tensor(tokens @ self.image_projection, dtype=torch.float32)

    def _i2v_cond(self, first: np.ndarray, frames: int) -> torch.Tensor:
        """4 mask channels (1 on frame 0) + the first latent on frame 0 (zeros after), Wan2.1-I2V's layout."""
        cond = np.zeros((4 + first.shape[0], frames, *first.shape[1:]))
        cond[:4, 0] = 1
        cond[4:, 0] = first
        return torch.as_tensor(cond, dtype=torch.float32)
