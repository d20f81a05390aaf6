"""Reading LeRobot datasets (v2.1: a file per episode; v3.0: many episodes per parquet/mp4) from a local
path or an fsspec URI, touching only what a sample needs: the episode's parquet rows (v3 files are read
with an index filter, so only the row groups holding them) and the frames of its video segment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wam.platform.errors import UserError
from wam.platform.storage import filesystem, join

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
TIMESTAMP_TOLERANCE_S = 1e-4


class DataError(UserError):
    """Bad or unreadable data; the message names the dataset, the episode and the file."""


@dataclass(frozen=True)
class VideoSegment:
    path: str  # URI of the mp4 holding this camera's frames of the episode
    first_frame: int  # index, within that file, of the episode's frame 0


@dataclass(frozen=True)
class Episode:
    index: int
    length: int
    tasks: tuple[str, ...]
    data_path: str  # URI of the parquet holding its rows
    first_row: int  # global `index` of its frame 0
    videos: dict[str, VideoSegment]


def _column_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """Scalar column -> (N,); list / fixed_size_list column of vectors -> (N, D)."""
    array = column.combine_chunks()
    if pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type) or pa.types.is_large_list(array.type):
        flat = array.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(array), -1) if len(array) else flat.reshape(0, 0)
    return array.to_numpy(zero_copy_only=False)


class LeRobotDataset:
    def __init__(self, uri: str):
        self.uri = str(uri)
        self.fs, self.root = filesystem(self.uri)
        info_path = join(self.uri, "meta", "info.json")
        try:
            self.info = json.loads(self._read_text(info_path))
        except FileNotFoundError:
            raise DataError(f"{self.uri} is not a LeRobot dataset: {info_path} is missing") from None
        self.version = self.info.get("codebase_version", "?")
        if self.version not in SUPPORTED_VERSIONS:
            raise DataError(f"{self.uri}: LeRobot format {self.version} is not supported (supported: "
                            f"{', '.join(SUPPORTED_VERSIONS)})")
        self.fps = float(self.info["fps"])
        self.features: dict = self.info["features"]
        self.video_keys = [k for k, f in self.features.items() if f.get("dtype") == "video"]

    # -- files ----------------------------------------------------------------------------------------

    def _read_text(self, uri: str) -> str:
        fs, path = filesystem(uri)
        with fs.open(path, "r") as f:
            return f.read()

    def _jsonl(self, relative: str) -> list[dict]:
        return [json.loads(line) for line in self._read_text(join(self.uri, relative)).splitlines() if line.strip()]

    def _parquet(self, uri: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        fs, path = filesystem(uri)
        if not fs.exists(path):
            raise FileNotFoundError(path)
        return pq.read_table(path, columns=columns, filters=filters, filesystem=fs)

    # -- metadata -------------------------------------------------------------------------------------

    @cached_property
    def tasks(self) -> list[str]:
        if self.version.startswith("v2"):
            rows = sorted(self._jsonl("meta/tasks.jsonl"), key=lambda r: r["task_index"])
            return [r["task"] for r in rows]
        table = self._parquet(join(self.uri, "meta", "tasks.parquet"))
        name = "task" if "task" in table.column_names else "__index_level_0__"
        order = np.argsort(table.column("task_index").to_numpy())
        return [table.column(name)[int(i)].as_py() for i in order]

    @cached_property
    def episodes(self) -> list[Episode]:
        return self._episodes_v2() if self.version.startswith("v2") else self._episodes_v3()

    def _episodes_v2(self) -> list[Episode]:
        chunks = int(self.info.get("chunks_size", 1000))
        out, first = [], 0
        for row in sorted(self._jsonl("meta/episodes.jsonl"), key=lambda r: r["episode_index"]):
            index, length = int(row["episode_index"]), int(row["length"])
            fmt = {"episode_chunk": index // chunks, "episode_index": index}
            videos = {k: VideoSegment(join(self.uri, self.info["video_path"].format(video_key=k, **fmt)), 0)
                      for k in self.video_keys}
            out.append(Episode(index, length, tuple(row.get("tasks", ())),
                               join(self.uri, self.info["data_path"].format(**fmt)), first, videos))
            first += length
        return out

    def _episodes_v3(self) -> list[Episode]:
        files = sorted(self.fs.glob(f"{self.root.rstrip('/')}/meta/episodes/*/*.parquet"))
        if not files:
            raise DataError(f"{self.uri}: no meta/episodes/*/*.parquet (LeRobot v3.0 episode metadata)")
        table = pa.concat_tables([pq.read_table(f, filesystem=self.fs) for f in files])
        rows = table.drop_columns([c for c in table.column_names if c.startswith("stats/")]).to_pylist()
        out = []
        for row in sorted(rows, key=lambda r: r["episode_index"]):
            data = self.info["data_path"].format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
            videos = {}
            for key in self.video_keys:
                path = self.info["video_path"].format(video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
                                                      file_index=row[f"videos/{key}/file_index"])
                start = int(round(row[f"videos/{key}/from_timestamp"] * self.fps))
                videos[key] = VideoSegment(join(self.uri, path), start)
            out.append(Episode(int(row["episode_index"]), int(row["length"]), tuple(row.get("tasks") or ()),
                               join(self.uri, data), int(row["dataset_from_index"]), videos))
        return out

    # -- frames ---------------------------------------------------------------------------------------

    def frames(self, episode: Episode, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The episode's rows of `columns` (+ timestamp, frame_index, task_index), in frame order."""
        wanted = tuple(sorted(set(columns) | {"timestamp", "frame_index", "task_index"}))
        return _read_episode(self.uri, episode.data_path, episode.index, episode.first_row, episode.length, wanted)

    def describe(self, episode: Episode) -> str:
        return f"dataset {self.uri}, episode {episode.index}"


@lru_cache(maxsize=256)  # episodes are revisited by overlapping windows; their tables are small
def _read_episode(uri: str, data_path: str, index: int, first: int, length: int,
                  columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    fs, path = filesystem(data_path)
    last = first + length
    try:
        if not fs.exists(path):
            raise FileNotFoundError(path)
        # `index` orders the rows; it is read once, also when the caller asked for it
        read = list(columns) if "index" in columns else [*columns, "index"]
        table = pq.read_table(path, columns=read, filesystem=fs,
                              filters=[("index", ">=", first), ("index", "<", last)])
    except (FileNotFoundError, OSError, pa.ArrowException) as err:
        raise DataError(f"dataset {uri}, episode {index}: cannot read {data_path}: {type(err).__name__}: {err}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"dataset {uri}, episode {index}: {data_path} has no column(s) {missing}")
    table = table.sort_by("index")
    if table.num_rows != length:
        raise DataError(f"dataset {uri}, episode {index}: {data_path} holds {table.num_rows} rows for it, "
                        f"the metadata says {length}")
    return {c: _column_to_numpy(table.column(c)) for c in columns}
