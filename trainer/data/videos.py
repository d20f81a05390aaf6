"""Videos people look at and datasets hold: frames encoded as LeRobot encodes them, and cameras side by side."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

CODECS = {"h264": ("libx264", {"crf": "16", "g": "2"}), "vp9": ("libvpx-vp9", {"crf": "20", "b": "0", "g": "2"}),
          "av1": ("libsvtav1", {"crf": "30", "g": "2", "preset": "10"})}  # GOP 2, as LeRobot encodes


def encode_video(frames: np.ndarray, path: Path, codec: str, fps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only
    name, options = CODECS[codec]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(name, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def resized(frames: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """(n, h, w, 3) -> (n, height, width, 3), nearest neighbour; width None: keeps the aspect ratio."""
    width = width or frames.shape[2] * height // frames.shape[1]
    if frames.shape[1:3] == (height, width):
        return frames
    rows = np.arange(height) * frames.shape[1] // height
    cols = np.arange(width) * frames.shape[2] // width
    return frames[:, rows][:, :, cols]


def side_by_side(views: dict[str, np.ndarray], predicted: np.ndarray | None = None) -> np.ndarray:
    """(n, H_i, W_i, 3) views of each camera (each at the first's height) and (>= n, h, w, 3) predicted frames ->
    (n, H, W', 3), both even (what H.264's 4:2:0 needs)."""
    first = next(iter(views.values()))
    n, height = first.shape[:2]
    parts = [resized(view, height) for view in views.values()]
    if predicted is not None:
        parts += [np.full((n, height, 2, 3), 255, np.uint8), resized(predicted[:n], height)]
    frame = np.concatenate(parts, axis=2)
    return np.pad(frame, ((0, 0), (0, frame.shape[1] % 2), (0, frame.shape[2] % 2), (0, 0)))
