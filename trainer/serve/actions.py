"""From the model's normalised action chunk to robot commands, one testable step each: un-normalise
(inverse q01/q99), relative -> absolute, smooth (2x upsample, Savitzky-Golay, downsample), binarise grippers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import savgol_filter


def unnormalize(values: np.ndarray, q01: np.ndarray, q99: np.ndarray) -> np.ndarray:
    """Inverse of the training normalisation [q01, q99] -> [-1, 1]. A dim that was constant in the data
    (q01 == q99) carried no information through training (its normalised value was clipped): it gets
    its constant back."""
    span = q99 - q01
    return np.where(span > 0, (values + 1) / 2 * span + q01, q01)


def to_absolute(actions: np.ndarray, anchor_state: np.ndarray, relative_dims: tuple[int, ...]) -> np.ndarray:
    """actions (A, D): add the chunk's starting state to the dims trained relative to it."""
    out = actions.copy()
    if relative_dims:
        out[:, list(relative_dims)] += anchor_state[list(relative_dims)]
    return out


def smooth(actions: np.ndarray, window: int, order: int) -> np.ndarray:
    """Savitzky-Golay over a 2x linearly upsampled chunk, sampled back at the original steps: removes the
    step-to-step jitter of sampled actions without shifting them in time. window 0 = no smoothing."""
    steps = actions.shape[0]
    if window == 0 or steps < 2:
        return actions
    fine = np.linspace(0, steps - 1, 2 * steps - 1)
    upsampled = np.stack([np.interp(fine, np.arange(steps), actions[:, d]) for d in range(actions.shape[1])], axis=1)
    window = min(window, len(fine) if len(fine) % 2 else len(fine) - 1)  # a short chunk gets the widest odd window
    if window <= order:
        return actions
    return savgol_filter(upsampled, window, order, axis=0, mode="interp")[::2]


def binarize(actions: np.ndarray, dims: tuple[int, ...], threshold: float) -> np.ndarray:
    out = actions.copy()
    if dims:
        out[:, list(dims)] = (out[:, list(dims)] > threshold).astype(out.dtype)
    return out


@dataclass(frozen=True)
class ActionPostprocess:
    q01: np.ndarray  # (real action dims,)
    q99: np.ndarray
    relative_dims: tuple[int, ...]
    smoothing_window: int
    smoothing_order: int
    gripper_dims: tuple[int, ...]
    gripper_threshold: float

    def __call__(self, normalised: np.ndarray, anchor_state: np.ndarray) -> np.ndarray:
        """normalised (A, action_dim incl. padding) -> (A, real dims) robot commands; anchor_state in robot units."""
        actions = unnormalize(normalised[:, :len(self.q01)].astype(np.float64), self.q01, self.q99)
        actions = to_absolute(actions, anchor_state, self.relative_dims)
        actions = smooth(actions, self.smoothing_window, self.smoothing_order)
        return binarize(actions, self.gripper_dims, self.gripper_threshold).astype(np.float32)
