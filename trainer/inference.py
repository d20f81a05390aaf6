"""Chunk-wise autoregressive rollout of a World Action Model against its KV cache.

One session (a batch of robots sharing a prompt layout): `reset` prefills the first frame, then for each
chunk `act` denoises the next chunk's video and actions from noise (the cache is only read), the robot
executes the actions, and `observe` writes the REAL frames it saw into the cache in place of the
prediction. When the context window is full the caller resets with a new first frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wam.platform.config import SamplerSection
from wam.trainer.flow import euler_step, sampling_sigmas
from wam.trainer.model.kv_cache import KVCache
from wam.trainer.model.model import WamModel


@dataclass
class Chunk:
    video: torch.Tensor  # (B, z, F, h, w) predicted latents of the chunk's frames
    actions: torch.Tensor  # (B, A, action_dim) normalised actions (padded dims included)


class ChunkRollout:
    def __init__(self, model: WamModel, sampler: SamplerSection, *, max_chunks: int, frames_per_chunk: int,
                 actions_per_chunk: int, latent_hw: tuple[int, int]):
        self.model = model
        self.frames_per_chunk = frames_per_chunk
        self.actions_per_chunk = actions_per_chunk
        self.latent_hw = latent_hw
        self.max_chunks = max_chunks
        self.video_sigmas = sampling_sigmas(sampler.steps, sampler.shift, sampler.video_final_sigma)
        self.action_sigmas = sampling_sigmas(sampler.steps, sampler.shift)
        self.cache: KVCache | None = None

    @property
    def next_chunk(self) -> int:
        return 0 if self.cache is None else self.cache.next_chunk

    @property
    def context_full(self) -> bool:
        return self.next_chunk >= self.max_chunks

    @torch.no_grad()
    def reset(self, first_latent: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None = None,
              i2v_cond: torch.Tensor | None = None) -> None:
        """Start a context window from the first frame's latent (B, z, 1, h, w) and the prompt features."""
        batch = first_latent.shape[0]
        if self.cache is None or self.cache.layers[0].k.shape[0] != batch:
            self.cache = self.model.new_cache(batch, self.max_chunks, self.frames_per_chunk,
                                              self.actions_per_chunk, self.latent_hw, first_latent.device)
        self.model.set_conditioning(self.cache, text, image, i2v_cond)
        self.model.observe(self.cache, first_latent)

    @torch.no_grad()
    def act(self, state: torch.Tensor, generator: torch.Generator | None = None) -> Chunk:
        """Denoise the next chunk from noise given the robot state (B, state_dim)."""
        if self.cache is None:
            raise RuntimeError("reset the rollout with a first frame before acting")
        if self.context_full:
            raise RuntimeError(f"context window of {self.max_chunks} chunks is full; reset with a new first frame")
        arch = self.model.arch
        batch, device = state.shape[0], state.device
        h, w = self.latent_hw
        video = torch.randn(batch, arch.out_dim, self.frames_per_chunk, h, w, generator=generator, device=device)
        actions = torch.randn(batch, self.actions_per_chunk, arch.action_dim, generator=generator, device=device)
        for i in range(len(self.video_sigmas) - 1):
            sv, sa = self.video_sigmas[i].item(), self.action_sigmas[i].item()
            out = self.model.predict(self.cache, video, actions, state,
                                     torch.full((batch,), sv * 1000, device=device),
                                     torch.full((batch,), sa * 1000, device=device))
            video = euler_step(video, out.video, sv, self.video_sigmas[i + 1].item())
            actions = euler_step(actions, out.actions, sa, self.action_sigmas[i + 1].item())
        return Chunk(video=video, actions=actions)

    @torch.no_grad()
    def observe(self, latents: torch.Tensor, chunk: int | None = None) -> None:
        """Write the latents (B, z, F, h, w) of a chunk acted on into the cache: by default the next one;
        an earlier `chunk` replaces what was written for it (and drops the chunks after it)."""
        chunk = self.next_chunk if chunk is None else chunk
        if self.cache is None or chunk >= self.max_chunks:
            raise RuntimeError("nothing to observe: act on a chunk first")
        self.model.observe(self.cache, latents, chunk=chunk)
