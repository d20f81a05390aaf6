"""`wam data synth`: a real LeRobot dataset (v3.0 or v2.1: parquet, mp4, meta) from a procedural scene.

A gripper pushes coloured blocks on a table, scripted by two instructions per episode ("push the red
block left", ...). The actions (commanded gripper position and closure, at 15 Hz) cause what three
cameras see: a top view, a side view and a wrist view that follows the gripper. The layout of state and
action follows DROID's LeRobot port (8 dims: "joints" 0-6, gripper 7; here joints 0-1 are the gripper's
x, y and 2-6 a fixed posture), so the built-in `droid` profile reads it as is. Every view carries the
episode frame index in a strip of 8 bit cells along its top edge, so tests can check which frames came
back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wam.trainer.data.videos import CODECS, encode_video

CAMERAS = ("observation.images.wrist_left", "observation.images.exterior_1_left", "observation.images.exterior_2_left")
STATE_DIM = 8
FPS = 15
BLOCKS = {"red": (200, 40, 40), "blue": (40, 60, 200), "green": (40, 170, 60)}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
BIT_CELLS = 8  # frame index, 8 bits, one cell per bit across the top 4 pixel rows of every view


@dataclass
class SynthOptions:
    episodes: int = 12
    version: str = "v3.0"  # v3.0 | v2.1
    codec: str = "h264"  # h264 | vp9 | av1
    height: int = 36  # per camera (DROID records 180x320; same aspect)
    width: int = 64
    seed: int = 0
    episodes_per_file: int = 5  # v3.0: episodes sharing one parquet / mp4 (several files per dataset)
    video_only: bool = False  # write no action column (e.g. human or other-robot video)
    sensor_noise: float = 0.0  # std of per-pixel camera noise (real footage is noisy and costlier to decode)


@dataclass(frozen=True)
class DatasetSpec:
    """What a written dataset holds besides its episodes: cameras (feature keys), rate, vector names, robot."""

    cameras: tuple[str, ...] = CAMERAS
    fps: int = FPS
    state_names: tuple[str, ...] = tuple(f"joint_{i}" for i in range(7)) + ("gripper",)
    action_names: tuple[str, ...] = tuple(f"joint_{i}" for i in range(7)) + ("gripper",)
    robot_type: str = "synthetic_gripper"


SYNTH_SPEC = DatasetSpec()


@dataclass
class Episode:
    frames: dict[str, np.ndarray]  # camera -> (T, H, W, 3) uint8
    state: np.ndarray  # (T, S) float32
    action: np.ndarray  # (T, A) float32
    task_index: np.ndarray  # (T,) int64
    tasks: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # extra per-episode metadata columns (e.g. success)


def _scripted_episode(rng: np.random.Generator, options: SynthOptions, task_ids: dict[str, int]) -> Episode:
    h, w = options.height, options.width
    names = list(BLOCKS)
    blocks = {n: np.array([0.25 + 0.5 * rng.random(), 0.25 + 0.5 * rng.random()]) for n in names}
    grip, gripper_closed = np.array([0.5, 0.5]), 0.0
    posture = rng.uniform(-0.5, 0.5, size=5)  # joints 2-6: a fixed arm posture per episode
    states, actions, task_index, views = [], [], [], {c: [] for c in CAMERAS}
    tasks = []
    for _ in range(2):
        block = names[rng.integers(len(names))]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        task = f"push the {block} block {direction}"
        tasks.append(task)
        task_ids.setdefault(task, len(task_ids))
        approach = blocks[block] - np.array(DIRECTIONS[direction]) * 0.12
        offset = np.array(DIRECTIONS[direction]) * 0.12  # the gripper pushes from behind the block
        push_to = np.clip(blocks[block] + np.array(DIRECTIONS[direction]) * (0.15 + 0.15 * rng.random()), 0.1, 0.9)
        # approach with the gripper open, close, push, open: 36 + 8 + 64 + 12 steps (8 s at 15 Hz)
        plan = [(approach, 0.0, 36), (approach, 1.0, 8), (push_to - offset, 1.0, 64), (None, 0.0, 12)]
        for target, closed, steps in plan:
            start = grip.copy()
            for k in range(steps):
                goal = start if target is None else start + (target - start) * (k + 1) / steps
                t = len(states)
                states.append(np.concatenate([grip, posture, [gripper_closed]]).astype(np.float32))
                actions.append(np.concatenate([goal, posture, [closed]]).astype(np.float32))
                task_index.append(task_ids[task])
                for camera in CAMERAS:
                    view = _render(camera, grip, gripper_closed, blocks, t, h, w)
                    if options.sensor_noise:
                        noisy = view + rng.normal(0, options.sensor_noise, view.shape)
                        view = np.clip(noisy, 0, 255).astype(np.uint8)
                        view[:4] = _render(camera, grip, gripper_closed, blocks, t, h, w)[:4]  # keep the index strip
                    views[camera].append(view)
                if closed and np.linalg.norm(blocks[block] - grip - offset) < 0.08:  # in contact: push it along
                    blocks[block] = np.clip(blocks[block] + goal - grip, 0.05, 0.95)
                grip, gripper_closed = goal, closed
    return Episode({c: np.stack(v) for c, v in views.items()}, np.stack(states), np.stack(actions),
                   np.array(task_index, dtype=np.int64), tasks)


def _render(camera: str, grip: np.ndarray, closed: float, blocks: dict, t: int, h: int, w: int) -> np.ndarray:
    image = np.full((h, w, 3), (150, 140, 120), dtype=np.uint8)  # the table
    yy, xx = np.mgrid[0:h, 0:w]
    if camera.endswith("exterior_1_left"):  # top view: the table fills the frame
        def place(p):
            return p[0] * w, p[1] * h
        scale = 1.0
    elif camera.endswith("exterior_2_left"):  # side view: the table foreshortened to the lower half
        def place(p):
            return p[0] * w, h * (0.5 + 0.45 * p[1])
        scale = 0.7
    else:  # wrist view: 2x zoom around the gripper
        def place(p):
            return (p[0] - grip[0]) * 2 * w + w / 2, (p[1] - grip[1]) * 2 * h + h / 2
        scale = 2.0
    for name, position in blocks.items():
        cx, cy = place(position)
        half = 0.06 * scale * w
        image[(abs(xx - cx) < half) & (abs(yy - cy) < half * h / w * 1.6)] = BLOCKS[name]
    gx, gy = place(grip)
    radius = 0.05 * scale * w
    ring = ((xx - gx) ** 2 + (yy - gy) ** 2) < radius**2
    image[ring] = (30, 30, 30) if closed else (235, 235, 235)
    cell = w // BIT_CELLS
    for bit in range(BIT_CELLS):  # the episode frame index, for tests
        image[:4, bit * cell:(bit + 1) * cell] = 230 if (t >> bit) & 1 else 20
    return image


def read_frame_index(view: np.ndarray) -> int:
    """The frame index written into a view's top strip by `_render` (a test helper)."""
    cell = view.shape[1] // BIT_CELLS
    bits = [view[1:3, b * cell + 1:(b + 1) * cell - 1].mean() > 125 for b in range(BIT_CELLS)]
    return sum(1 << b for b, on in enumerate(bits) if on)


def _vectors(values: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1).astype(np.float32)), values.shape[1])


def _frame_table(episode: Episode, index: int, first_row: int, video_only: bool, fps: int) -> pa.Table:
    n = len(episode.state)
    columns = {"observation.state": _vectors(episode.state)}
    if not video_only:
        columns["action"] = _vectors(episode.action)
    columns.update({
        "timestamp": pa.array(np.arange(n, dtype=np.float32) / fps), "frame_index": pa.array(np.arange(n)),
        "episode_index": pa.array(np.full(n, index)), "index": pa.array(np.arange(first_row, first_row + n)),
        "task_index": pa.array(episode.task_index),
    })
    return pa.table(columns)


def _stats(values: np.ndarray) -> dict:
    return {"min": values.min(0).tolist(), "max": values.max(0).tolist(), "mean": values.mean(0).tolist(),
            "std": values.std(0).tolist(), "count": [len(values)],
            "q01": np.quantile(values, 0.01, axis=0).tolist(), "q99": np.quantile(values, 0.99, axis=0).tolist()}


def _features(options: SynthOptions, spec: DatasetSpec) -> dict:
    def vector(names):
        return {"dtype": "float32", "shape": [len(names)], "names": {"axes": list(names)}}

    features = {c: {"dtype": "video", "shape": [options.height, options.width, 3], "names": ["height", "width", "channels"],
                     "info": {"video.fps": spec.fps, "video.height": options.height, "video.width": options.width,
                              "video.codec": options.codec, "video.pix_fmt": "yuv420p", "video.channels": 3,
                              "has_audio": False}} for c in spec.cameras}
    features["observation.state"] = vector(spec.state_names)
    if not options.video_only:
        features["action"] = vector(spec.action_names)
    for name, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                        ("index", "int64"), ("task_index", "int64")):
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    return features


def synthesize(out: str | Path, options: SynthOptions = SynthOptions()) -> Path:
    """Write a LeRobot dataset to `out` (a local folder) and return it."""
    if options.version not in ("v3.0", "v2.1") or options.codec not in CODECS:
        raise ValueError(f"version must be v3.0 or v2.1 and codec one of {', '.join(CODECS)}")
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    rng = np.random.default_rng(options.seed)
    task_ids: dict[str, int] = {}
    episodes = [_scripted_episode(rng, options, task_ids) for _ in range(options.episodes)]
    return write_dataset(root, episodes, task_ids, options)


def write_dataset(out: str | Path, episodes: list[Episode], task_ids: dict[str, int], options: SynthOptions,
                  spec: DatasetSpec = SYNTH_SPEC) -> Path:
    """Write `episodes` as a LeRobot dataset (options.version, .codec, .height, .width, .episodes_per_file,
    .video_only) to `out`, a new or empty local folder; `task_ids` maps each task string to its index."""
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    (root / "meta").mkdir(parents=True, exist_ok=True)
    writer = _write_v3 if options.version == "v3.0" else _write_v21
    info = writer(root, episodes, task_ids, options, spec)
    info.update({"codebase_version": options.version, "robot_type": spec.robot_type, "fps": spec.fps,
                 "total_episodes": len(episodes), "total_frames": sum(len(e.state) for e in episodes),
                 "total_tasks": len(task_ids), "splits": {"train": f"0:{len(episodes)}"},
                 "features": _features(options, spec)})
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    return root


def _write_v21(root: Path, episodes: list[Episode], task_ids: dict[str, int], options: SynthOptions,
               spec: DatasetSpec) -> dict:
    data_path = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    video_path = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    first = 0
    with (root / "meta/episodes.jsonl").open("w") as meta, (root / "meta/episodes_stats.jsonl").open("w") as stats:
        for i, episode in enumerate(episodes):
            path = root / data_path.format(episode_chunk=0, episode_index=i)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(_frame_table(episode, i, first, options.video_only, spec.fps), path)
            for camera in spec.cameras:
                encode_video(episode.frames[camera], root / video_path.format(episode_chunk=0, video_key=camera,
                                                                         episode_index=i), options.codec, spec.fps)
            meta.write(json.dumps({"episode_index": i, "tasks": list(dict.fromkeys(episode.tasks)),
                                   "length": len(episode.state), **episode.meta}) + "\n")
            per_episode = {"observation.state": _stats(episode.state)}
            if not options.video_only:
                per_episode["action"] = _stats(episode.action)
            stats.write(json.dumps({"episode_index": i, "stats": per_episode}) + "\n")
            first += len(episode.state)
    (root / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                   for t, i in task_ids.items()))
    return {"total_videos": len(episodes) * len(spec.cameras), "total_chunks": 1, "chunks_size": 1000,
            "data_path": data_path, "video_path": video_path}


def _write_v3(root: Path, episodes: list[Episode], task_ids: dict[str, int], options: SynthOptions,
              spec: DatasetSpec) -> dict:
    data_path = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    video_path = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    rows, first = [], 0
    per_file = options.episodes_per_file
    for file_index, start in enumerate(range(0, len(episodes), per_file)):
        group = episodes[start:start + per_file]
        tables, offset = [], 0.0
        for i, episode in enumerate(group, start):
            tables.append(_frame_table(episode, i, first, options.video_only, spec.fps))
            row = {"episode_index": i, "tasks": list(dict.fromkeys(episode.tasks)), "length": len(episode.state),
                   "data/chunk_index": 0, "data/file_index": file_index, "dataset_from_index": first,
                   "dataset_to_index": first + len(episode.state), **episode.meta}
            for camera in spec.cameras:
                row.update({f"videos/{camera}/chunk_index": 0, f"videos/{camera}/file_index": file_index,
                            f"videos/{camera}/from_timestamp": offset,
                            f"videos/{camera}/to_timestamp": offset + len(episode.state) / spec.fps})
            row.update({f"stats/observation.state/{k}": v for k, v in _stats(episode.state).items()})
            offset += len(episode.state) / spec.fps
            first += len(episode.state)
            rows.append(row)
        path = root / data_path.format(chunk_index=0, file_index=file_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(tables), path)
        for camera in spec.cameras:
            frames = np.concatenate([e.frames[camera] for e in group])
            encode_video(frames, root / video_path.format(video_key=camera, chunk_index=0, file_index=file_index),
                    options.codec, spec.fps)
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    tasks = sorted(task_ids.items(), key=lambda kv: kv[1])
    pq.write_table(pa.table({"task_index": [i for _, i in tasks], "task": [t for t, _ in tasks]}),
                   root / "meta/tasks.parquet")
    all_stats = {"observation.state": _stats(np.concatenate([e.state for e in episodes]))}
    if not options.video_only:
        all_stats["action"] = _stats(np.concatenate([e.action for e in episodes]))
    (root / "meta/stats.json").write_text(json.dumps(all_stats))
    return {"chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "data_path": data_path, "video_path": video_path}
