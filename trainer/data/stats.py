"""q01/q99 normalisation statistics of a dataset as a profile sees it (`wam data stats`).

Relative actions depend on the chunk they belong to, so their statistics cannot come from the dataset's
own meta/stats.json: they are computed over chunks laid from every instruction segment's start, for the
profile's relative dims and horizon. Stats are stored next to a local dataset
(meta/wam_stats.<profile>-<fingerprint>.json) or, for read-only and remote datasets, in the cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wam.platform.embodiment import EmbodimentProfile
from wam.platform.storage import default_cache_dir, is_remote, local_path
from wam.trainer.data.lerobot import DataError, LeRobotDataset
from wam.trainer.data.transforms import relative_actions
from wam.trainer.data.windows import instruction_segments

MAX_ROWS = 2_000_000  # quantiles from an even subsample beyond this


@dataclass
class NormStats:
    state_q01: list[float]
    state_q99: list[float]
    action_q01: list[float]
    action_q99: list[float]

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


def compute_stats(dataset: LeRobotDataset, profile: EmbodimentProfile) -> NormStats:
    states, actions = [], []
    columns = profile.state_keys + profile.action_keys
    for episode in dataset.episodes:
        frames = dataset.frames(episode, columns)
        state = concat_columns(frames, profile.state_keys)
        if np.isnan(state).any():
            raise DataError(f"{dataset.describe(episode)}: NaN in {profile.state_keys} ({episode.data_path})")
        states.append(state)
        if not profile.has_actions:
            continue
        action = concat_columns(frames, profile.action_keys)
        if np.isnan(action).any():
            raise DataError(f"{dataset.describe(episode)}: NaN in {profile.action_keys} ({episode.data_path})")
        for begin, end in instruction_segments(frames["task_index"]):
            for start in range(begin, end, profile.action_horizon):
                stop = min(start + profile.action_horizon, end)
                actions.append(relative_actions(action[start:stop], state[start:start + 1], profile.relative_dims,
                                                stop - start))
    state_q01, state_q99 = _quantiles(states)
    action_q01, action_q99 = _quantiles(actions)
    return NormStats(state_q01, state_q99, action_q01, action_q99)


def _fingerprint(profile: EmbodimentProfile) -> str:
    key = json.dumps([profile.state_keys, profile.action_keys, profile.relative_dims, profile.action_horizon])
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


def load_or_compute_stats(dataset: LeRobotDataset, profile: EmbodimentProfile) -> tuple[NormStats, Path | None]:
    """Stats from a previous `wam data stats`, else computed now and saved. Returns where they came from."""
    for path in stats_paths(dataset.uri, profile):
        if path.exists():
            return NormStats(**json.loads(path.read_text())), path
    stats = compute_stats(dataset, profile)
    return stats, save_stats(dataset.uri, profile, stats)
