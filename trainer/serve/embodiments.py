"""The embodiments a policy server serves: each robot kind's profile, statistics, post-processing and envelope.

A model trained across embodiments (DreamZero's DROID + AgiBot) serves every one it has action data of from one
server: a robot picks its own by the websocket path (`ws://host:port/<name>`; `/` is serving.embodiment's, by
default the first), gets that embodiment's metadata on connect, and sends its cameras and state in that profile's
keys. The model sees every embodiment's chunk in the same token layout, so sessions of different robots share the
engine's batched forwards; only what surrounds the model (tiling the cameras, normalising the state, turning
actions into robot commands, the safety envelope, the control rate) is the embodiment's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wam.platform.config import ServingSection
from wam.platform.data_contract import gripper_problems
from wam.platform.embodiment import SYNTHETIC_PROFILE, EmbodimentProfile, profile_from_fields
from wam.platform.errors import ConfigError
from wam.platform.presets import WamArch
from wam.trainer.data.stats import NormStats
from wam.trainer.serve.actions import ActionPostprocess
from wam.trainer.serve.safety import ActionEnvelope, StateCheck, envelope_from_stats, state_check


@dataclass(frozen=True)
class ServedEmbodiment:
    profile: EmbodimentProfile
    stats: NormStats | None  # None: a model of procedural latents, whose state and actions are normalised already
    # the rate its data was recorded at (Hz), and how long a robot takes to execute a chunk at it: a chunk answered
    # later leaves an asynchronous robot idle; None where unknown (no robot data, a model quantized before)
    control_hz: float | None
    chunk_seconds: float | None
    state_range: tuple[np.ndarray, np.ndarray] | None  # q01, q99 of the state (robot units); None: synthetic
    postprocess: ActionPostprocess | None  # normalised model output -> robot commands; None: synthetic
    state_check: StateCheck  # a state far outside the training range is a bad request
    envelope: ActionEnvelope  # what a robot may be sent

    @property
    def name(self) -> str:
        return self.profile.name

    def metadata(self, arch: WamArch) -> dict:
        """What a robot of this embodiment is told on connect, besides the server's own."""
        p, e = self.profile, self.envelope
        return {
            "embodiment": p.name, "cameras": list(p.cameras), "state_keys": list(p.state_keys),
            "state_dims": len(self.stats.state_q01) if self.stats else arch.state_dim,
            "action_dims": len(self.stats.action_q01) if self.stats else arch.action_dim,
            "action_units": "robot" if self.stats else "normalised", "action_space": p.action_space or None,
            "gripper_dims": list(p.gripper_dims), "request_keys": {k: list(v) for k, v in p.request_keys.items()},
            "frame_stride": p.video_stride, "control_hz": self.control_hz, "chunk_seconds": self.chunk_seconds,
            "safety": {"limits_from": e.source, "action_low": e.low.tolist(), "action_high": e.high.tolist(),
                       "max_action_step": None if e.max_step is None else e.max_step.tolist(),
                       "state_low": self.state_check.low.tolist(), "state_high": self.state_check.high.tolist()},
        }


def served_embodiments(recorded: dict[str, dict], arch: WamArch, actions_per_chunk: int,
                       serving: ServingSection) -> dict[str, ServedEmbodiment]:
    """Every embodiment a quantized model's policy.json records (its training datasets with actions), by name, in
    the order of the training config; a model without robot data serves the synthetic one."""
    if not recorded:
        return {SYNTHETIC_PROFILE.name: _served(SYNTHETIC_PROFILE, None, None, arch, actions_per_chunk, serving)}
    return {name: _served(profile_from_fields(name, entry["profile"]), NormStats(**entry["stats"]),
                          entry.get("control_hz"), arch, actions_per_chunk, serving)
            for name, entry in recorded.items()}


def _served(profile: EmbodimentProfile, stats: NormStats | None, control_hz: float | None, arch: WamArch,
            actions_per_chunk: int, s: ServingSection) -> ServedEmbodiment:
    if stats is None:  # a model of procedural latents: its state and actions are already in [-1, 1]
        state_q01, state_q99 = -np.ones(arch.state_dim), np.ones(arch.state_dim)
        action_q01, action_q99 = -np.ones(arch.action_dim), np.ones(arch.action_dim)
        step_q99, postprocess = None, None
    else:
        state_q01, state_q99, action_q01, action_q99 = stats.arrays()
        problems = gripper_problems(profile, len(action_q01))
        if beyond := [d for d in profile.relative_dims if d >= min(len(action_q01), len(state_q01))]:
            problems.append(f"relative_dims {beyond} do not exist")
        if problems:
            raise ConfigError(f"embodiment {profile.name}: {'; '.join(problems)} in the statistics it was trained with "
                              f"({len(action_q01)} action, {len(state_q01)} state dims): the quantized model's "
                              "policy.json does not fit its profile; quantize the checkpoint again")
        step_q99 = None if stats.action_step_q99 is None else np.asarray(stats.action_step_q99)
        postprocess = ActionPostprocess(action_q01, action_q99, profile.relative_dims, s.smoothing_window,
                                        s.smoothing_order, profile.gripper_dims, profile.gripper_threshold)
    return ServedEmbodiment(
        profile, stats, control_hz, None if control_hz is None else actions_per_chunk / control_hz,
        None if stats is None else (state_q01, state_q99), postprocess,
        state_check(state_q01, state_q99, s.state_margin),
        envelope_from_stats(profile, state_q01, state_q99, action_q01, action_q99, step_q99, s.action_margin,
                            s.step_margin))
