"""The safety envelope between the policy and a robot: what is never sent, what is clipped, what is refused.

Rules, applied to every chunk after post-processing (robot units):
  1. Non-finite actions are never sent: a chunk holding NaN or inf (a broken checkpoint, an overflow) is refused
     as a whole with an error reply, and the session starts over.
  2. Each action dim stays within limits: the embodiment profile's explicit `action_low`/`action_high`, else the
     training data's range widened by `serving.action_margin` (× its q01..q99 span): for dims trained relative
     to the state, the state's range (the actions are absolute positions of the same joints); for the others,
     the actions' own range.
  3. Each step moves at most a per-dim limit from the one before (the first from the robot's current state on
     relative dims): the profile's `max_action_step`, else the training data's 99th percentile of
     consecutive-step changes × (1 + `serving.step_margin`). Binarised gripper dims may jump.
  4. An observation whose state lies far outside the training range (beyond `serving.state_margin` × the span on
     either side) is refused as a bad request naming the dims and the ranges.
Clipping is reported in the reply (`safety`) and counted in /metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wam.platform.embodiment import EmbodimentProfile


class UnsafeOutput(RuntimeError):
    """The policy produced actions that must not reach a robot."""


def require_finite(actions: np.ndarray) -> None:
    """UnsafeOutput naming the dims when `actions` (A, D) hold NaN or inf."""
    if not np.isfinite(actions).all():
        bad = sorted({int(d) for d in np.argwhere(~np.isfinite(actions))[:, 1]})
        raise UnsafeOutput(f"the policy produced non-finite actions in dims {bad}; nothing was sent")


def _widened(q01: np.ndarray, q99: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """[q01, q99] widened by `margin` spans on each side; a dim constant in the data (span 0) gets `margin` of its
    magnitude (at least 1 unit) instead."""
    span = q99 - q01
    width = np.where(span > 0, span, np.maximum(np.abs(q99), 1.0))
    return q01 - margin * width, q99 + margin * width


def _listed(dims: np.ndarray, values: np.ndarray, low: np.ndarray, high: np.ndarray, limit: int = 4) -> str:
    shown = [f"dim {d} = {values[d]:.6g} (accepted {low[d]:.4g}..{high[d]:.4g})" for d in dims[:limit]]
    return "; ".join(shown) + (f"; and {len(dims) - limit} more" if len(dims) > limit else "")


@dataclass(frozen=True)
class StateCheck:
    low: np.ndarray  # (state dims,) robot units
    high: np.ndarray

    def problems(self, state: np.ndarray) -> str:
        """'' when `state` is within the accepted range, else which dims are not and the ranges."""
        outside = np.flatnonzero((state < self.low) | (state > self.high))
        return _listed(outside, state, self.low, self.high) if len(outside) else ""


@dataclass(frozen=True)
class SafetyReport:
    clipped_values: int
    clipped_dims: list[int]

    def to_reply(self) -> dict:
        return {"clipped": self.clipped_values > 0, "clipped_values": self.clipped_values,
                "clipped_dims": self.clipped_dims}


@dataclass(frozen=True)
class ActionEnvelope:
    low: np.ndarray  # (action dims,) robot units
    high: np.ndarray
    max_step: np.ndarray | None  # (action dims,) largest change between consecutive steps; None: no step limit
    anchored_dims: tuple[int, ...]  # dims whose first step is measured from the robot's current state
    source: str  # where the limits come from: "profile" | "training data"

    def apply(self, actions: np.ndarray, anchor: np.ndarray) -> tuple[np.ndarray, SafetyReport]:
        """actions (A, D) robot units -> within the envelope; `anchor` (state dims,) the robot's current state."""
        require_finite(actions)  # never clip a NaN or inf into a plausible number: the model is broken
        safe = actions.astype(np.float64).copy()
        if self.max_step is not None:
            previous = safe[0].copy()
            for d in self.anchored_dims:
                previous[d] = anchor[d]
            for t in range(len(safe)):
                step = self.max_step
                if t == 0:  # only the anchored dims have a "before" at the first step
                    step = np.where(np.isin(np.arange(len(step)), self.anchored_dims), step, np.inf)
                safe[t] = np.clip(safe[t], previous - step, previous + step)
                previous = safe[t]
        safe = np.clip(safe, self.low, self.high)
        changed = ~np.isclose(safe, actions, rtol=0, atol=1e-9 * (1 + np.abs(actions)))
        report = SafetyReport(int(changed.sum()), sorted({int(d) for d in np.flatnonzero(changed.any(axis=0))}))
        return safe.astype(np.float32), report


def envelope_from_stats(profile: EmbodimentProfile, state_q01: np.ndarray, state_q99: np.ndarray,
                        action_q01: np.ndarray, action_q99: np.ndarray, action_step_q99: np.ndarray | None,
                        action_margin: float, step_margin: float) -> ActionEnvelope:
    """The envelope of an embodiment: the profile's explicit limits where it declares them, else the data's."""
    dims = len(action_q01)
    relative = [d for d in profile.relative_dims if d < dims and d < len(state_q01)]
    low, high = _widened(action_q01, action_q99, action_margin)
    state_low, state_high = _widened(state_q01, state_q99, action_margin)
    low[relative], high[relative] = state_low[relative], state_high[relative]
    source = "training data"
    if profile.action_low:
        low, high, source = np.asarray(profile.action_low, float), np.asarray(profile.action_high, float), "profile"
    if profile.max_action_step:
        max_step = np.asarray(profile.max_action_step, float)
    elif action_step_q99 is not None:
        max_step = np.asarray(action_step_q99, float) * (1 + step_margin)
    else:
        max_step = None
    if max_step is not None and profile.gripper_dims:
        max_step = max_step.copy()
        max_step[list(profile.gripper_dims)] = np.inf  # a binarised gripper opens and closes in one step
    return ActionEnvelope(low, high, max_step, tuple(relative), source)


def state_check(state_q01: np.ndarray, state_q99: np.ndarray, margin: float) -> StateCheck:
    return StateCheck(*_widened(state_q01, state_q99, margin))
