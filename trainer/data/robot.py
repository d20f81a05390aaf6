"""Training samples from LeRobot datasets: windows planned once, each decoded and transformed on demand.

Several datasets mix by weight into one list of windows (deterministic from the seed). A sample reads its
episode's rows (cached per process), checks them (no NaN, timestamps on the frame grid), decodes the
window's frames of every camera, and becomes model inputs: a tiled pixel canvas, actions relative to
each chunk's first state and normalised by the dataset's q01/q99, the state, masks and the prompt.
Problems name the dataset, episode and file; with `bad_samples: skip` they are dropped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from wam.platform.config import DatasetEntry, ProfileSection
from wam.platform.data_contract import feature_width
from wam.platform.embodiment import resolve_profile
from wam.platform.presets import SampleShape, WamArch
from wam.trainer.data.decode import FrameDecoder, make_decoder
from wam.trainer.data.lerobot import TIMESTAMP_TOLERANCE_S, DataError, LeRobotDataset
from wam.trainer.data.stats import (
    NormStats,
    concat_columns,
    episode_idle,
    idle_columns,
    load_or_compute_stats,
)
from wam.trainer.data.transforms import crop, normalize, pad, relative_actions, tile
from wam.trainer.data.windows import Window, action_steps, chunk_starts, plan_windows, video_frames

log = logging.getLogger("wam.data")


@dataclass
class WindowData:
    """A window's raw data, before any transform."""

    views: dict[str, np.ndarray]  # camera -> (T, H, W, 3) uint8
    state: np.ndarray  # (K, state dims): the state at each chunk's start
    actions: np.ndarray | None  # (K*A, action dims); None for video-only data
    task: str


@dataclass
class RobotSample:
    pixels: torch.Tensor  # (3, T, H, W) uint8 canvas of all views, T = 1 + 4*F*K (K: the window's chunks)
    actions: torch.Tensor  # (K, A, action_dim) normalised, padded
    action_dims: torch.Tensor  # (action_dim,) bool: real dims
    has_actions: bool
    state: torch.Tensor  # (K, state_dim) normalised, padded
    prompt: str


class RobotSource:
    def __init__(self, entries: list[DatasetEntry], profiles: dict[str, ProfileSection], arch: WamArch,
                 sample: SampleShape, seed: int, decoder: str = "auto", bad_samples: str = "error",
                 crop_scale: float = 1.0, epoch_samples: int | None = None, min_chunks: int | None = None):
        """`min_chunks`: windows of min_chunks..K chunks (packing); None: exactly K."""
        self.arch, self.shape, self.seed, self.min_chunks = arch, sample, seed, min_chunks
        self.decoder_name, self.bad_samples, self.crop_scale = decoder, bad_samples, crop_scale
        self.datasets = [LeRobotDataset(e.uri) for e in entries]
        self.profiles = [resolve_profile(e.profile, profiles) for e in entries]
        self.stats: list[NormStats] = []
        for dataset, profile in zip(self.datasets, self.profiles, strict=True):
            missing = [k for k in profile.cameras if k not in dataset.video_keys]
            if missing:
                raise DataError(f"dataset {dataset.uri} has no video stream(s) {missing} named by profile "
                                f"{profile.name}; its streams: {dataset.video_keys}")
            stats, where = load_or_compute_stats(dataset, profile, bad_samples)
            log.info("normalisation stats of %s (%s): %s", dataset.uri, profile.name, where)
            widths = [sum(feature_width(dataset.features, k) for k in keys)
                      for keys in (profile.state_keys, profile.action_keys)]
            if [len(stats.state_q01), len(stats.action_q01)] != widths:
                raise DataError(f"the statistics {where} hold {len(stats.state_q01)} state and {len(stats.action_q01)} "
                                f"action dims, dataset {dataset.uri} has {widths[0]} and {widths[1]} for profile "
                                f"{profile.name}: delete that file, or write it again with `wam data stats`")
            self.stats.append(stats)
        self.skipped_episodes = 0
        per_dataset = [self._plan(d) for d in range(len(self.datasets))]
        self.windows = self._mix(per_dataset, [e.weight for e in entries], epoch_samples)
        self.canvas = sample.canvas(arch)
        self._decoder: FrameDecoder | None = None

    # -- planning -------------------------------------------------------------------------------------

    def _plan(self, d: int) -> list[Window]:
        dataset, profile, k = self.datasets[d], self.profiles[d], self.shape.num_chunks
        least = k if self.min_chunks is None else self.min_chunks
        windows, idle_count = [], 0
        for e, episode in enumerate(dataset.episodes):
            if episode.length < profile.action_horizon + 1:
                problem = DataError(f"{dataset.describe(episode)} has {episode.length} frames, fewer than one chunk "
                                    f"({profile.action_horizon} actions + 1 frame) ({episode.data_path})")
                self._bad(problem)
                self.skipped_episodes += 1
                continue
            frames = dataset.frames(episode, idle_columns(profile))
            idle = episode_idle(frames, profile)
            idle_count += int(idle.sum()) if idle is not None else 0
            step = profile.action_horizon // 2  # windows every half chunk
            windows += [Window(d, e, s, c) for s, c in plan_windows(frames["task_index"], k, profile.action_horizon,
                                                                    step, least, idle)]
        if not windows:
            raise DataError(f"dataset {dataset.uri} has no window of {least} chunks ({least * profile.action_horizon + 1}"
                            " frames) inside one instruction segment" + (" outside idle stretches" if
                                                                         profile.idle_threshold is not None else "")
                            + "; use fewer sample.num_chunks" + (", or data.packing" if self.min_chunks is None else ""))
        if profile.idle_threshold is not None:
            log.info("%s: %d frames in idle stretches left out of sampling (%s idle_threshold %g)", dataset.uri,
                     idle_count, profile.name, profile.idle_threshold)
        return windows

    def _mix(self, per_dataset: list[list[Window]], weights: list[float], total: int | None) -> list[Window]:
        """`total` windows (default: as many as there are), drawn from each dataset in proportion to its weight."""
        rng = np.random.default_rng([self.seed, 7919])
        total = total or sum(len(w) for w in per_dataset)
        shares = np.asarray(weights) / sum(weights)
        mixed: list[Window] = []
        for windows, share in zip(per_dataset, shares, strict=True):
            n = max(1, int(round(total * share)))
            picks = np.concatenate([rng.permutation(len(windows)) for _ in range(-(-n // len(windows)))])[:n]
            mixed += [windows[i] for i in picks]
        return mixed

    def _bad(self, problem: DataError) -> None:
        if self.bad_samples == "error":
            raise problem
        log.warning("skipped: %s", problem)

    # -- one sample -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.windows)

    def chunks(self, index: int) -> int:
        return self.windows[index].chunks

    @property
    def decoder(self) -> FrameDecoder:
        if self._decoder is None:  # made in the process that decodes (data-loader workers)
            self._decoder = make_decoder(self.decoder_name)
        return self._decoder

    def load(self, window: Window) -> WindowData:
        dataset, profile = self.datasets[window.dataset], self.profiles[window.dataset]
        episode = dataset.episodes[window.episode]
        k, horizon = window.chunks, profile.action_horizon
        frames = dataset.frames(episode, profile.state_keys + profile.action_keys)
        where = f"{dataset.describe(episode)} ({episode.data_path})"
        used = np.concatenate([video_frames(window.start, k, self.shape.frames_per_chunk, profile.video_stride),
                               action_steps(window.start, k, horizon)])
        expected = frames["frame_index"][used] / dataset.fps
        off = np.abs(frames["timestamp"][used] - expected) > max(TIMESTAMP_TOLERANCE_S, 0.01 / dataset.fps)
        if off.any():
            f = int(used[np.argmax(off)])
            raise DataError(f"{where}: timestamp {frames['timestamp'][f]:.4f} s of frame {f} is not frame_index/fps "
                            f"= {expected[np.argmax(off)]:.4f} s")
        state = concat_columns(frames, profile.state_keys)[chunk_starts(window.start, k, horizon)]
        actions = concat_columns(frames, profile.action_keys)[action_steps(window.start, k, horizon)] \
            if profile.has_actions else None
        for name, values in (("state", state), ("actions", actions)):
            if values is not None and not np.isfinite(values).all():
                kind = "NaN" if np.isnan(values).any() else "inf"
                raise DataError(f"{where}: {kind} in the {name} of frames {window.start}..{window.start + k * horizon}")
        views = {}
        indices = video_frames(window.start, k, self.shape.frames_per_chunk, profile.video_stride)
        for camera in profile.cameras:
            segment = episode.videos[camera]
            try:
                views[camera] = self.decoder.decode(segment.path, (segment.first_frame + indices).tolist())
            except Exception as err:  # noqa: BLE001 - every decoder failure means the same to the user
                raise DataError(f"{dataset.describe(episode)}: cannot decode frames {indices[0]}..{indices[-1]} of "
                                f"{segment.path} ({self.decoder.name}): {type(err).__name__}: {err}") from None
        task = dataset.tasks[int(frames["task_index"][window.start])]
        return WindowData(views, state, actions, task)

    def transform(self, index: int, window: Window, data: WindowData) -> RobotSample:
        profile = self.profiles[window.dataset]
        state_q01, state_q99, action_q01, action_q99 = self.stats[window.dataset].arrays()
        rng = np.random.default_rng([self.seed, index])
        views = [crop(torch.from_numpy(data.views[c]).permute(0, 3, 1, 2), self.crop_scale, rng) for c in profile.cameras]
        pixels = tile(views, profile.layout, self.canvas).permute(1, 0, 2, 3)
        state, _ = pad(normalize(data.state, state_q01, state_q99), self.arch.state_dim)
        k, horizon = window.chunks, profile.action_horizon
        if data.actions is None:
            actions, dims = np.zeros((k * horizon, self.arch.action_dim), np.float32), np.zeros(self.arch.action_dim, bool)
        else:
            relative = relative_actions(data.actions, data.state, profile.relative_dims, horizon)
            actions, dims = pad(normalize(relative, action_q01, action_q99), self.arch.action_dim)
        return RobotSample(pixels=pixels, actions=torch.from_numpy(actions).reshape(k, horizon, -1),
                           action_dims=torch.from_numpy(dims), has_actions=data.actions is not None,
                           state=torch.from_numpy(state), prompt=profile.prompt.format(task=data.task))

    def __getitem__(self, index: int) -> RobotSample | DataError:
        """The sample, or (with bad_samples: skip) the problem that stopped it."""
        window = self.windows[index]
        try:
            return self.transform(index, window, self.load(window))
        except DataError as problem:
            self._bad(problem)
            return problem
