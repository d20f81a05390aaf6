"""Sessions' observed frames through the VAE, several sessions' in one call.

A request's own work (its frames encoded, a new context window prefilled, a predicted video decoded) runs one
request at a time under the runtime's encoding lock: the admission counts one request's work. Frames that arrive
while the lock is held wait together, and whoever takes the lock next encodes them all in one batched call (the
oldest first, up to `max_batch` streams at the same point), each session's causal stream continuing as if its
frames had been encoded alone. On a CPU, where the encoder bounds a fleet more than the denoising, this nearly
halves a fleet's encoding (benchmarks/serve.py --encoding).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from wam.trainer.model.vae import StreamState, WanVAE, stack_streams, unstack_streams


@dataclass(eq=False)  # waiting frames are told apart by identity
class _Frames:
    pixels: torch.Tensor  # (1, 3, T, H, W) in [-1, 1]
    stream: StreamState  # the session's, continued by the call that encodes these frames
    latents: torch.Tensor | None = None
    error: Exception | None = None
    done: bool = False

    def batches_with(self, other: _Frames) -> bool:
        return (self.pixels.shape == other.pixels.shape and self.stream.frames.keys() == other.stream.frames.keys()
                and self.stream.started == other.stream.started)


class BatchedEncoder:
    """The VAE's encoder of a server's sessions' observed frames, batched across the sessions waiting for it."""

    def __init__(self, vae: WanVAE, lock: threading.Lock, max_batch: int):
        self.vae, self.lock, self.max_batch = vae, lock, max_batch
        self._waiting: list[_Frames] = []
        self._guard = threading.Lock()  # the waiting list's (the encoding lock is held for whole calls)

    @property
    def waiting(self) -> int:
        """How many sessions' frames wait for the encoder."""
        with self._guard:
            return len(self._waiting)

    def encode(self, pixels: torch.Tensor, stream: StreamState) -> torch.Tensor:
        """The latents (1, z, T/4, h, w) of `pixels` (1, 3, T, H, W) in [-1, 1], the next frames of `stream`."""
        frames = _Frames(pixels, stream)
        with self._guard:
            self._waiting.append(frames)
        with self.lock:
            while not frames.done:  # done already if a call that held the lock before took them along
                self._encode(self._next_batch())
        if frames.error is not None:
            raise frames.error
        return frames.latents

    def _next_batch(self) -> list[_Frames]:
        with self._guard:
            oldest = self._waiting[0]
            batch = [f for f in self._waiting if f.batches_with(oldest)][:self.max_batch]
            self._waiting = [f for f in self._waiting if f not in batch]
        return batch

    @torch.no_grad()  # (grad mode is per thread: the session's whose call encodes)
    def _encode(self, batch: list[_Frames]) -> None:
        streams = [f.stream for f in batch]
        try:  # (one session's stream as it is: stacking copies every history)
            together = stack_streams(streams) if len(batch) > 1 else streams[0]
            latents = self.vae.encode_stream(torch.cat([f.pixels for f in batch]), together)
            if len(batch) > 1:
                unstack_streams(together, streams)
        except Exception as err:  # noqa: BLE001 - each waiting session's request fails with it, none hangs
            for f in batch:
                f.error, f.done = err, True
            return
        for row, f in enumerate(batch):
            f.latents, f.done = latents[row:row + 1], True
