"""Video frame decoders behind one interface: frames at given indices of one video, (T, H, W, 3) uint8 RGB.

- `dali`: NVIDIA DALI, on GPUs with NVDEC (device='mixed': H.264, HEVC, AV1, VP9); its CPU decoder
  reads only VP8/VP9/MJPEG.
- `torchcodec` (CPU, exact seeking): links the system FFmpeg libraries `make setup` installs.
- `pyav`: bundles its own FFmpeg, the dependency-free fallback.
`auto` picks DALI on a GPU, else torchcodec, else PyAV. Each decodes from the keyframe before the first
wanted frame up to the last one, never the whole file.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from wam.platform.storage import filesystem, is_remote, local_path, localize

DECODERS = ("dali", "torchcodec", "pyav")


def open_source(uri: str):
    """A local path, or a file object that reads remote bytes on demand (range requests)."""
    if not is_remote(uri):
        return str(local_path(uri))
    fs, path = filesystem(uri)
    return fs.open(path, "rb")


class FrameDecoder(ABC):
    name: str

    @abstractmethod
    def decode(self, uri: str, indices: Sequence[int]) -> np.ndarray:
        """Frames `indices` (sorted or not) of the video at `uri` as (T, H, W, 3) uint8 RGB."""


class TorchCodecDecoder(FrameDecoder):
    """Exact seeking: one demux scan per file, after which index i is the i-th frame in presentation order.
    Open decoders are kept per file (LeRobot v3 packs many episodes into one mp4, so consecutive samples
    often share a file and the scan is paid once)."""

    name = "torchcodec"

    def __init__(self, open_files: int = 8):
        from torchcodec.decoders import VideoDecoder  # fails without the system FFmpeg libraries

        self._make = VideoDecoder
        self._open: OrderedDict[str, tuple] = OrderedDict()
        self._capacity = open_files

    def _decoder(self, uri: str):
        if uri in self._open:
            self._open.move_to_end(uri)
            return self._open[uri][0]
        source = open_source(uri)
        decoder = self._make(source, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
        self._open[uri] = (decoder, source)
        while len(self._open) > self._capacity:
            _, (_, old) = self._open.popitem(last=False)
            if isinstance(old, io.IOBase):
                old.close()
        return decoder

    def decode(self, uri: str, indices: Sequence[int]) -> np.ndarray:
        try:
            return self._decoder(uri).get_frames_at(list(indices)).data.numpy()
        except Exception:
            self._open.pop(uri, None)  # a broken or changed file is opened afresh next time
            raise


class PyAVDecoder(FrameDecoder):
    name = "pyav"

    def __init__(self):
        import av
        from av.video.reformatter import VideoReformatter

        self._av = av
        self._reformatter = VideoReformatter()  # reused: a new one per frame costs ~2.5x

    def decode(self, uri: str, indices: Sequence[int]) -> np.ndarray:
        wanted = set(int(i) for i in indices)
        frames: dict[int, np.ndarray] = {}
        source = open_source(uri)
        try:
            with self._av.open(source) as container:
                stream = container.streams.video[0]
                stream.thread_type = "NONE"
                fps, base = Fraction(stream.average_rate or stream.guessed_rate), stream.time_base
                start = stream.start_time or 0
                # seek lands on the keyframe at or before the first wanted frame; decode forward from there
                container.seek(start + int(round(Fraction(min(wanted)) / fps / base)), stream=stream, backward=True)
                for frame in container.decode(stream):
                    if frame.pts is None:
                        continue
                    index = int(round((frame.pts - start) * base * fps))  # round: webm rounds pts to ms
                    if index > max(wanted):
                        break
                    if index in wanted and index not in frames:
                        frames[index] = self._reformatter.reformat(frame, format="rgb24").to_ndarray()
        finally:
            if isinstance(source, io.IOBase):
                source.close()
        missing = [i for i in wanted if i not in frames]
        if missing:
            raise IndexError(f"frames {missing[:5]} are not in the video (it ends earlier or is truncated)")
        return np.stack([frames[int(i)] for i in indices])


class DaliDecoder(FrameDecoder):
    """DALI's video decoder fed one video and its frame indices at a time; on a GPU the frames come out
    of NVDEC on the device and are copied back for the CPU-side tiling."""

    name = "dali"

    def __init__(self, device: str | None = None):
        import torch

        self.device = device or ("mixed" if torch.cuda.is_available() else "cpu")
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=1, device_id=0 if self.device == "mixed" else None,
                      prefetch_queue_depth=1)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            frames = fn.external_source(name="frames", dtype=types.INT32)
            # pad_mode none: an index past the end is an error, not a silent black frame
            return fn.decoders.video(encoded, frames=frames, device=self.device, pad_mode="none")

        pipe = pipeline()
        pipe.build()
        return pipe

    def decode(self, uri: str, indices: Sequence[int]) -> np.ndarray:
        encoded = np.fromfile(localize(uri), dtype=np.uint8)  # DALI decodes from memory; remote files cached once
        if self._pipe is None:
            self._pipe = self._build()
        try:
            (out,) = self._pipe.run(encoded=[encoded], frames=[np.asarray(indices, dtype=np.int32)])
        except RuntimeError:
            self._pipe = None  # a failed DALI pipeline cannot run again
            raise
        if self.device == "mixed":
            out = out.as_cpu()
        return np.asarray(out.as_array()[0])


def make_decoder(name: str = "auto") -> FrameDecoder:
    if name == "dali":
        return DaliDecoder()
    if name == "torchcodec":
        return TorchCodecDecoder()
    if name == "pyav":
        return PyAVDecoder()
    if name != "auto":
        raise ValueError(f"unknown decoder {name!r}; choose auto or one of {', '.join(DECODERS)}")
    import torch

    if torch.cuda.is_available():
        try:
            return DaliDecoder("mixed")
        except ImportError:
            pass
    try:
        return TorchCodecDecoder()
    except (ImportError, OSError, RuntimeError):  # no system FFmpeg libraries
        return PyAVDecoder()
