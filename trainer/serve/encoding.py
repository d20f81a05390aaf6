"""Sessions' frames through the frozen encoders, several sessions' in one call.

A request's own work (its frames encoded, a new context window opened, a predicted video decoded) runs one
request at a time under the runtime's encoding lock: the admission counts one request's work. Work that arrives
while the lock is held waits, and whoever takes the lock next runs all of it that can share a call (the oldest
first, up to `max_batch`): the frames a robot saw while executing a chunk, its causal VAE stream continued as if
encoded alone, or a new context window's first frame (its latents, CLIP tokens and image-to-video channels: what
every call of RoboArena's client opens). On a CPU, where the encoders bound a fleet more than the denoising, this
nearly halves a fleet's encoding (benchmarks/serve.py --encoding).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from wam.trainer.model.encoders import EncodedClip, FrozenEncoders
from wam.trainer.model.vae import StreamState, stack_streams, unstack_streams


@dataclass(eq=False)  # waiting work is told apart by identity
class _Work:
    pixels: torch.Tensor  # (1, 3, T, H, W) uint8
    stream: StreamState  # the session's, continued by the call that encodes these frames
    window: int | None  # a new window's first frame: the I2V channels' latent frames; None: a chunk's frames
    result: torch.Tensor | EncodedClip | None = None
    error: Exception | None = None
    done: bool = False

    def batches_with(self, other: _Work) -> bool:
        return (self.window == other.window and self.pixels.shape == other.pixels.shape
                and self.stream.frames.keys() == other.stream.frames.keys()
                and self.stream.started == other.stream.started)


class BatchedEncoder:
    """The frozen encoders of a server's sessions, batched across the sessions waiting for them."""

    def __init__(self, encoders: FrozenEncoders, lock: threading.Lock, max_batch: int):
        self.encoders, self.lock, self.max_batch = encoders, lock, max_batch
        self._waiting: list[_Work] = []
        self._guard = threading.Lock()  # the waiting list's (the encoding lock is held for whole calls)

    @property
    def waiting(self) -> int:
        """How many sessions' frames wait for the encoders."""
        with self._guard:
            return len(self._waiting)

    def encode(self, pixels: torch.Tensor, stream: StreamState) -> torch.Tensor:
        """The latents (1, z, T/4, h, w) of a chunk's frames (1, 3, T, H, W) uint8, the next frames of `stream`."""
        return self._run(_Work(pixels, stream, None))

    def open_window(self, frame: torch.Tensor, stream: StreamState, i2v_frames: int) -> EncodedClip:
        """A new context window's first frame (1, 3, 1, H, W) uint8 encoded, starting `stream` (a new one), with
        I2V channels over `i2v_frames` latent frames."""
        return self._run(_Work(frame, stream, i2v_frames))

    def _run(self, work: _Work):
        with self._guard:
            self._waiting.append(work)
        with self.lock:
            while not work.done:  # done already if a call that held the lock before took it along
                self._encode(self._next_batch())
        if work.error is not None:
            raise work.error
        return work.result

    def _next_batch(self) -> list[_Work]:
        with self._guard:
            oldest = self._waiting[0]
            batch = [w for w in self._waiting if w.batches_with(oldest)][:self.max_batch]
            self._waiting = [w for w in self._waiting if w not in batch]
        return batch

    @torch.no_grad()  # (grad mode is per thread: the session's whose call encodes)
    def _encode(self, batch: list[_Work]) -> None:
        streams, pixels, window = [w.stream for w in batch], torch.cat([w.pixels for w in batch]), batch[0].window
        try:  # (one session's stream as it is: stacking copies every history)
            together = stack_streams(streams) if len(batch) > 1 else streams[0]
            if window is None:
                latents = self.encoders.vae.encode_stream(self.encoders.unit_range(pixels), together)
                rows = [latents[r:r + 1] for r in range(len(batch))]
            else:
                clip = self.encoders.encode_clip(pixels, stream=together, i2v_frames=window)
                rows = [EncodedClip(*(None if t is None else t[r:r + 1] for t in (clip.latents, clip.image, clip.i2v)))
                        for r in range(len(batch))]
            if len(batch) > 1:
                unstack_streams(together, streams)
        except Exception as err:  # noqa: BLE001 - each waiting session's request fails with it, none hangs
            for w in batch:
                w.error, w.done = err, True
            return
        for w, row in zip(batch, rows, strict=True):
            w.result, w.done = row, True
