"""DreamZero's sampling of training windows from robot episodes.

A window is K whole chunks inside one instruction segment (a run of frames with one task). Chunk c
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


def instruction_segments(task_index: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of frames sharing one task."""
    if len(task_index) == 0:
        return []
    cuts = np.flatnonzero(np.diff(task_index)) + 1
    bounds = np.concatenate([[0], cuts, [len(task_index)]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def window_starts(task_index: np.ndarray, chunks: int, horizon: int, step: int) -> list[int]:
    """Every `step`-th start whose K chunks (and the final video frame) fit in one instruction segment."""
    span = chunks * horizon  # the last video frame is at start + span
    starts: list[int] = []
    for begin, end in instruction_segments(task_index):
        starts.extend(range(begin, end - span, step))
    return starts


def video_frames(start: int, chunks: int, frames_per_chunk: int, stride: int) -> np.ndarray:
    """Recording-frame indices of the window's video: the first frame + 4*F frames per chunk."""
    return start + stride * np.arange(1 + 4 * frames_per_chunk * chunks)


def action_steps(start: int, chunks: int, horizon: int) -> np.ndarray:
    return start + np.arange(chunks * horizon)


def chunk_starts(start: int, chunks: int, horizon: int) -> np.ndarray:
    return start + horizon * np.arange(chunks)
