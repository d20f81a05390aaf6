"""Chunk-wise autoregressive rollout of a World Action Model against its KV cache.

One session (a batch of robots sharing a prompt layout): `reset` prefills the first frame, then for each
chunk `act` denoises the next chunk's video and actions from noise (the cache is only read), the robot
executes the actions, and `observe` writes the REAL frames it saw into the cache in place of the
prediction. When the context window is full the caller resets with a new first frame.

Sampling follows the sampler section: Euler or FlowUniPC; classifier-free guidance, whose unconditional
branch keeps its own KV cache (clean frames cross-attend to the prompt, so their keys differ per prompt) and
cross-attention K/V of the negative prompt, written on every `observe` like the conditional one; and the DiT
step cache, which skips the transformer on some steps and reuses the last velocities (a skipped step writes
nothing anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wam.platform.config import SamplerSection, guided
from wam.trainer.flow import SCHEDULES, SOLVERS, DitStepCache, guide
from wam.trainer.model.kv_cache import KVCache
from wam.trainer.model.model import WamModel


@dataclass
class Chunk:
    video: torch.Tensor  # (B, z, F, h, w) predicted latents of the chunk's frames
    actions: torch.Tensor  # (B, A, action_dim) normalised actions (padded dims included)
    dit_steps: int = 0  # denoising steps that ran the transformer (the others reused its last velocities)
    forwards: int = 0  # transformer forwards: one per such step, two with sequential guidance


class ChunkRollout:
    def __init__(self, model: WamModel, sampler: SamplerSection, *, max_chunks: int, frames_per_chunk: int,
                 actions_per_chunk: int, latent_hw: tuple[int, int], negative_text: torch.Tensor | None = None):
        """negative_text: (1, text_len, text_dim) features of the unconditional prompt, needed when the
        sampler guides."""
        if guided(sampler) and negative_text is None:
            raise ValueError("classifier-free guidance needs the negative prompt's text features")
        self.model = model
        self.sampler = sampler
        self.frames_per_chunk = frames_per_chunk
        self.actions_per_chunk = actions_per_chunk
        self.latent_hw = latent_hw
        self.max_chunks = max_chunks
        schedule = SCHEDULES[sampler.solver]
        self.video_schedule = schedule(sampler.steps, sampler.shift, sampler.video_final_sigma)
        self.action_schedule = schedule(sampler.steps, sampler.shift)
        self.negative_text = negative_text if guided(sampler) else None
        # batched guidance: one cache of 2B rows (conditional rows first); sequential: [conditional, unconditional]
        self.caches: list[KVCache] = []

    @property
    def video_sigmas(self) -> torch.Tensor:
        return self.video_schedule.sigmas

    @property
    def action_sigmas(self) -> torch.Tensor:
        return self.action_schedule.sigmas

    @property
    def cache(self) -> KVCache | None:
        """The conditional branch's cache (in batched guidance, its rows are the first half)."""
        return self.caches[0] if self.caches else None

    @property
    def next_chunk(self) -> int:
        return 0 if self.cache is None else self.cache.next_chunk

    @property
    def context_full(self) -> bool:
        return self.next_chunk >= self.max_chunks

    def _batched(self) -> bool:
        return self.negative_text is not None and self.sampler.guidance_batch

    def _rows(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """x for every row of a cache: twice over in batched guidance."""
        return torch.cat([x, x]) if x is not None and self._batched() else x

    @torch.no_grad()
    def reset(self, first_latent: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None = None,
              i2v_cond: torch.Tensor | None = None) -> None:
        """Start a context window from the first frame's latent (B, z, 1, h, w) and the prompt features."""
        batch = first_latent.shape[0]
        texts = [text]
        if self.negative_text is not None:
            negative = self.negative_text.to(text.device, text.dtype).expand(batch, -1, -1)
            texts = [torch.cat([text, negative])] if self._batched() else [text, negative]
        rows = texts[0].shape[0]
        if len(self.caches) != len(texts) or self.caches[0].layers[0].k.shape[0] != rows:
            self.caches = [self.model.new_cache(rows, self.max_chunks, self.frames_per_chunk, self.actions_per_chunk,
                                                self.latent_hw, first_latent.device) for _ in texts]
        for cache, branch_text in zip(self.caches, texts, strict=True):
            self.model.set_conditioning(cache, branch_text, self._rows(image), self._rows(i2v_cond))
            self.model.observe(cache, self._rows(first_latent))

    def _velocities(self, video: torch.Tensor, actions: torch.Tensor, state: torch.Tensor, video_t: torch.Tensor,
                    action_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (guided) video and action velocities at one step: every branch's forward, combined."""
        if self._batched():
            out = self.model.predict(self.caches[0], *(self._rows(x) for x in (video, actions, state, video_t, action_t)))
            branches = list(zip(out.video.chunk(2), out.actions.chunk(2), strict=True))
        else:
            branches = [(out.video, out.actions) for out in
                        (self.model.predict(cache, video, actions, state, video_t, action_t) for cache in self.caches)]
        if len(branches) == 1:
            return branches[0]
        (video_c, actions_c), (video_u, actions_u) = branches
        return guide(video_c, video_u, self.sampler.guidance), guide(actions_c, actions_u, self.sampler.action_guidance)

    @torch.no_grad()
    def act(self, state: torch.Tensor, generator: torch.Generator | None = None) -> Chunk:
        """Denoise the next chunk from noise given the robot state (B, state_dim)."""
        if self.cache is None:
            raise RuntimeError("reset the rollout with a first frame before acting")
        if self.context_full:
            raise RuntimeError(f"context window of {self.max_chunks} chunks is full; reset with a new first frame")
        arch, s = self.model.arch, self.sampler
        batch, device = state.shape[0], state.device
        h, w = self.latent_hw
        video = torch.randn(batch, arch.out_dim, self.frames_per_chunk, h, w, generator=generator, device=device)
        actions = torch.randn(batch, self.actions_per_chunk, arch.action_dim, generator=generator, device=device)
        video_solver, action_solver = SOLVERS[s.solver](self.video_sigmas), SOLVERS[s.solver](self.action_sigmas)
        step_cache = DitStepCache(s.dit_cache, s.steps, s.dit_passes, s.dit_steps)
        dit_steps = 0
        for i in range(s.steps):
            if step_cache.run(i):
                video_v, action_v = self._velocities(
                    video, actions, state, self.video_schedule.timesteps[i].expand(batch).to(device),
                    self.action_schedule.timesteps[i].expand(batch).to(device))
                step_cache.computed(video_v)
                dit_steps += 1
            video = video_solver.step(i, video_v, video)
            actions = action_solver.step(i, action_v, actions)
        return Chunk(video, actions, dit_steps, dit_steps * len(self.caches))

    @torch.no_grad()
    def observe(self, latents: torch.Tensor, chunk: int | None = None) -> None:
        """Write the latents (B, z, F, h, w) of a chunk acted on into the cache(s): by default the next one;
        an earlier `chunk` replaces what was written for it (and drops the chunks after it)."""
        chunk = self.next_chunk if chunk is None else chunk
        if self.cache is None or chunk >= self.max_chunks:
            raise RuntimeError("nothing to observe: act on a chunk first")
        for cache in self.caches:
            self.model.observe(cache, self._rows(latents), chunk=chunk)
