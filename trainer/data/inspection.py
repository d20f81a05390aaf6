"""`wam data inspect` and `wam data validate`: what a dataset holds, and everything wrong with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from wam.trainer.data.decode import make_decoder
from wam.trainer.data.lerobot import TIMESTAMP_TOLERANCE_S, DataError, LeRobotDataset


def inspect(dataset: LeRobotDataset) -> dict:
    lengths = np.array([e.length for e in dataset.episodes])
    cameras = {}
    for key in dataset.video_keys:
        feature = dataset.features[key]
        info = feature.get("info") or feature.get("video_info") or {}
        cameras[key] = {"shape": feature.get("shape"), "codec": info.get("video.codec"), "fps": info.get("video.fps")}
    vectors = {k: f.get("shape") for k, f in dataset.features.items()
               if f.get("dtype") not in ("video", "image", "string") and k not in
               ("timestamp", "frame_index", "episode_index", "index", "task_index")}
    return {
        "uri": dataset.uri, "format": dataset.version, "robot": dataset.info.get("robot_type"), "fps": dataset.fps,
        "episodes": len(lengths), "frames": int(lengths.sum()),
        "episode_length": {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())},
        "cameras": cameras, "features": vectors, "tasks": len(dataset.tasks), "task_examples": dataset.tasks[:5],
    }


@dataclass
class Problem:
    episode: int | None
    file: str
    problem: str


def validate(dataset: LeRobotDataset, decoder: str = "auto") -> list[Problem]:
    """Every episode: rows readable and complete, no NaN, timestamps on the 1/fps grid, and every camera's
    segment decodable at its first and last frame."""
    problems: list[Problem] = []
    vectors = tuple(k for k, f in dataset.features.items()
                    if f.get("dtype", "").startswith("float") and k != "timestamp")
    frame_decoder = make_decoder(decoder)
    for episode in dataset.episodes:
        try:
            frames = dataset.frames(episode, vectors)
        except DataError as err:
            problems.append(Problem(episode.index, episode.data_path, str(err)))
            continue
        if not np.array_equal(frames["frame_index"], np.arange(episode.length)):
            problems.append(Problem(episode.index, episode.data_path, "frame_index is not 0..length-1"))
        off = np.abs(frames["timestamp"] - frames["frame_index"] / dataset.fps) > max(TIMESTAMP_TOLERANCE_S,
                                                                                    0.01 / dataset.fps)
        if off.any():
            problems.append(Problem(episode.index, episode.data_path,
                                    f"{int(off.sum())} timestamps are not frame_index/fps (first at frame "
                                    f"{int(np.argmax(off))})"))
        for key in vectors:
            bad = np.isnan(frames[key]).any(axis=tuple(range(1, frames[key].ndim)))
            if bad.any():
                problems.append(Problem(episode.index, episode.data_path,
                                        f"NaN in {key} at {int(bad.sum())} frames (first {int(np.argmax(bad))})"))
        for key, segment in episode.videos.items():
            try:
                frame_decoder.decode(segment.path, [segment.first_frame, segment.first_frame + episode.length - 1])
            except Exception as err:  # noqa: BLE001 - any decoding failure is a problem to report
                problems.append(Problem(episode.index, segment.path,
                                        f"{key}: frames {segment.first_frame}..{segment.first_frame + episode.length - 1} "
                                        f"not decodable ({type(err).__name__}: {err})"))
    return problems


def problems_as_dicts(problems: list[Problem]) -> list[dict]:
    return [asdict(p) for p in problems]
