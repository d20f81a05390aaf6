"""DreamZero's sampling of training windows from robot episodes.

A window is K whole chunks inside one instruction segment (a run of frames with one task); with packing
(data.packing) 1..K chunks: as many as fit from its start, so episode ends and short episodes are sampled
too. Idle stretches (the robot not moving, as openpi filters them out of DROID) can be cut out of the
segments, so no window holds one. Chunk c
starts at recording step s + c*A (A = action horizon) and holds the A actions from there and the state
at its start. The video is sampled at `stride` (5 fps): frame s (the clean first frame) and then
4*F frames per chunk, s + stride*(1..4*F*K) — the frames recorded while chunk c's actions run, ending
one stride after its last action. With the 4x temporal VAE, chunk c's video becomes F latent frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    dataset: int  # position in the run's dataset list
    episode: int  # position in that dataset's episode list
    start: int  # recording step of the first frame
    chunks: int  # whole chunks from there


def instruction_segments(task_index: np.ndarray, idle: np.ndarray | None = None) -> list[tuple[int, int]]:
    """[start, end) runs of frames sharing one task, without the `idle` frames (if given)."""
    if len(task_index) == 0:
        return []
    cuts = np.flatnonzero(np.diff(task_index)) + 1
    bounds = np.concatenate([[0], cuts, [len(task_index)]])
    segments = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if idle is None:
        return segments
    return [run for begin, end in segments for run in _runs(~idle[begin:end], begin)]


def _runs(flags: np.ndarray, offset: int = 0) -> list[tuple[int, int]]:
    """[start, end) runs of True in `flags`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return [(offset + int(a), offset + int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def idle_frames(values: np.ndarray, threshold: float, min_frames: int) -> np.ndarray:
    """(N,) bool: frames inside a stretch of at least `min_frames` frames in which no dim of `values` (N, D)
    changes by more than `threshold` from one frame to the next."""
    idle = np.zeros(len(values), dtype=bool)
    if len(values) > 1:
        still = np.abs(np.diff(values, axis=0)).max(axis=1) <= threshold  # step i: frame i -> i + 1
        for begin, end in _runs(still):  # still steps begin..end-1 join frames begin..end
            if end - begin + 1 >= min_frames:
                idle[begin:end + 1] = True
    return idle


def plan_windows(task_index: np.ndarray, chunks: int, horizon: int, step: int, min_chunks: int | None = None,
                 idle: np.ndarray | None = None) -> list[tuple[int, int]]:
    """(start, chunks) of every `step`-th start from which at least `min_chunks` (default all K) chunks and the
    final video frame fit in one segment (instruction_segments); each window takes up to K of those chunks."""
    least = chunks if min_chunks is None else min_chunks
    planned: list[tuple[int, int]] = []
    for begin, end in instruction_segments(task_index, idle):
        # k chunks from s end with the video frame at s + k*horizon, which must be < end
        planned += [(s, min(chunks, (end - 1 - s) // horizon)) for s in range(begin, end - least * horizon, step)]
    return planned


def video_frames(start: int, chunks: int, frames_per_chunk: int, stride: int) -> np.ndarray:
    """Recording-frame indices of the window's video: the first frame + 4*F frames per chunk."""
    return start + stride * np.arange(1 + 4 * frames_per_chunk * chunks)


def action_steps(start: int, chunks: int, horizon: int) -> np.ndarray:
    return start + np.arange(chunks * horizon)


def chunk_starts(start: int, chunks: int, horizon: int) -> np.ndarray:
    return start + horizon * np.arange(chunks)
