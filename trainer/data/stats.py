"""q01/q99 normalisation statistics of a dataset as a profile sees it, and what sampling keeps of it: idle
stretches and the windows' numbers of chunks (`wam data stats`).

Relative actions depend on the chunk they belong to, so their statistics cannot come from the dataset's
own meta/stats.json: they are computed over chunks laid from every instruction segment's start, for the
profile's relative dims and horizon. Stats are stored next to a local dataset
(meta/wam_stats.<profile>-<fingerprint>.json) or, for read-only and remote datasets, in the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wam.platform.embodiment import EmbodimentProfile
from wam.platform.storage import default_cache_dir, is_remote, local_path
from wam.trainer.data.lerobot import DataError, LeRobotDataset
from wam.trainer.data.transforms import relative_actions
from wam.trainer.data.windows import idle_frames, instruction_segments, plan_windows

log = logging.getLogger("wam.data")
MAX_ROWS = 2_000_000  # quantiles from an even subsample beyond this


@dataclass
class NormStats:
    state_q01: list[float]
    state_q99: list[float]
    action_q01: list[float]
    action_q99: list[float]
    # 99th percentile of |a[t+1] - a[t]| per action dim (absolute actions, within an episode): the policy server's
    # per-step limit. None in statistics written before it existed.
    action_step_q99: list[float] | None = None

    def arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(v, dtype=np.float64) for v in
                     (self.state_q01, self.state_q99, self.action_q01, self.action_q99))


def concat_columns(frames: dict[str, np.ndarray], keys: tuple[str, ...]) -> np.ndarray:
    parts = [frames[k].reshape(len(frames[k]), -1).astype(np.float64) for k in keys]
    return np.concatenate(parts, axis=1) if parts else np.zeros((0, 0))


def _quantiles(rows: list[np.ndarray]) -> tuple[list[float], list[float]]:
    if not rows:
        return [], []
    values = np.concatenate(rows)
    if len(values) > MAX_ROWS:
        values = values[:: len(values) // MAX_ROWS + 1]
    return np.quantile(values, 0.01, axis=0).tolist(), np.quantile(values, 0.99, axis=0).tolist()


def compute_stats(dataset: LeRobotDataset, profile: EmbodimentProfile, bad_samples: str = "error") -> NormStats:
    """Statistics over every episode; an episode with a non-finite state or action stops it (`bad_samples: error`)
    or is left out with a warning (`skip`)."""
    states, actions, steps = [], [], []
    columns = profile.state_keys + profile.action_keys
    for episode in dataset.episodes:
        frames = dataset.frames(episode, columns)
        state = concat_columns(frames, profile.state_keys)
        action = concat_columns(frames, profile.action_keys) if profile.has_actions else None
        problem = _non_finite(state, profile.state_keys) or (action is not None and _non_finite(action, profile.action_keys))
        if problem:
            error = DataError(f"{dataset.describe(episode)}: {problem} ({episode.data_path})")
            if bad_samples == "error":
                raise error
            log.warning("statistics leave out %s (data.bad_samples: skip)", error)
            continue
        states.append(state)
        if action is None:
            continue
        steps.append(np.abs(np.diff(action, axis=0)))
        for begin, end in instruction_segments(frames["task_index"]):
            for start in range(begin, end, profile.action_horizon):
                stop = min(start + profile.action_horizon, end)
                actions.append(relative_actions(action[start:stop], state[start:start + 1], profile.relative_dims,
                                                stop - start))
    if not states:
        raise DataError(f"dataset {dataset.uri}: no episode has finite {profile.state_keys}"
                        + (f" and {profile.action_keys}" if profile.has_actions else "") + ": nothing to normalise by")
    state_q01, state_q99 = _quantiles(states)
    action_q01, action_q99 = _quantiles(actions)
    step_q99 = _quantiles(steps)[1] if steps else None
    return NormStats(state_q01, state_q99, action_q01, action_q99, step_q99)


def idle_columns(profile: EmbodimentProfile) -> tuple[str, ...]:
    """The columns whose stillness marks idle frames: the actions, or the state of video-only data."""
    if profile.idle_threshold is None:
        return ()
    return profile.action_keys or profile.state_keys


def episode_idle(frames: dict[str, np.ndarray], profile: EmbodimentProfile) -> np.ndarray | None:
    """(frames,) bool: the episode's idle stretches (at least half a chunk still); None without a threshold."""
    if profile.idle_threshold is None:
        return None
    return idle_frames(concat_columns(frames, idle_columns(profile)), profile.idle_threshold,
                       profile.action_horizon // 2)


@dataclass
class SamplingSummary:
    """What window sampling keeps of a dataset: frames in idle stretches, and windows by number of chunks
    (1..K, as packing samples them; K alone without packing) with and without the idle filter."""

    frames: int
    idle_frames: int
    windows: dict[int, int]
    windows_unfiltered: dict[int, int]


def sampling_summary(dataset: LeRobotDataset, profile: EmbodimentProfile, chunks: int) -> SamplingSummary:
    frames = idle = 0
    kept: dict[int, int] = dict.fromkeys(range(1, chunks + 1), 0)
    unfiltered = dict(kept)
    for episode in dataset.episodes:
        rows = dataset.frames(episode, idle_columns(profile))
        still = episode_idle(rows, profile)
        frames += episode.length
        idle += int(still.sum()) if still is not None else 0
        for counts, mask in ((kept, still), (unfiltered, None)):
            for _, k in plan_windows(rows["task_index"], chunks, profile.action_horizon, profile.action_horizon // 2,
                                     1, mask):
                counts[k] += 1
    return SamplingSummary(frames, idle, kept, unfiltered)


def _non_finite(values: np.ndarray, keys: tuple[str, ...]) -> str:
    """'' when every value is finite, else what is wrong and in which rows."""
    rows = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if not len(rows):
        return ""
    kind = "NaN" if np.isnan(values[rows]).any() else "inf"
    return f"{kind} in {list(keys)} at frame(s) {rows[:5].tolist()}" + (" ..." if len(rows) > 5 else "")


_STATS_VERSION = 2  # 2: per-step action changes (the policy server's step limit)


def _fingerprint(profile: EmbodimentProfile) -> str:
    key = json.dumps([_STATS_VERSION, profile.state_keys, profile.action_keys, profile.relative_dims,
                      profile.action_horizon])
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def stats_paths(uri: str, profile: EmbodimentProfile) -> list[Path]:
    """Where stats may live, in lookup order: next to a local dataset, then in the cache."""
    name = f"wam_stats.{profile.name}-{_fingerprint(profile)}.json"
    cached = default_cache_dir() / "stats" / hashlib.sha256(uri.encode()).hexdigest()[:16] / name
    return ([] if is_remote(uri) else [local_path(uri) / "meta" / name]) + [cached]


def save_stats(uri: str, profile: EmbodimentProfile, stats: NormStats) -> Path:
    for path in stats_paths(uri, profile):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(stats)))
            return path
        except OSError:
            continue
    raise OSError(f"cannot write statistics of {uri} anywhere")


def load_or_compute_stats(dataset: LeRobotDataset, profile: EmbodimentProfile,
                          bad_samples: str = "error") -> tuple[NormStats, Path | None]:
    """Stats from a previous `wam data stats`, else computed now and saved. Returns where they came from."""
    for path in stats_paths(dataset.uri, profile):
        if path.exists():
            return NormStats(**json.loads(path.read_text())), path
    stats = compute_stats(dataset, profile, bad_samples)
    return stats, save_stats(dataset.uri, profile, stats)
