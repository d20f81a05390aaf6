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

import threading
from dataclasses import dataclass

import torch

from wam.platform.config import SamplerSection, guided
from wam.platform.presets import SampleShape
from wam.trainer.flow import SCHEDULES, SOLVERS, DitStepCache, guide
from wam.trainer.guidance_peer import GuidancePeer, RemoteCache
from wam.trainer.model.kv_cache import KVCache, KVPool
from wam.trainer.model.model import Observation, Prediction, WamModel, WamOutputs


@dataclass
class Chunk:
    video: torch.Tensor  # (B, z, F, h, w) predicted latents of the chunk's frames
    actions: torch.Tensor  # (B, A, action_dim) normalised actions (padded dims included)
    dit_steps: int = 0  # denoising steps that ran the transformer (the others reused its last velocities)
    forwards: int = 0  # transformer forwards: one per such step, two with sequential guidance
    queue_s: float = 0.0  # served by a DenoiseEngine: how long it waited for a place in the batch
    batch: int = 1  # ... and the most chunks (of all sessions) denoised in one forward with it
    index: int = 0  # the chunk of the context window it is


class Denoiser:
    """Runs one denoising step's transformer passes (of one chunk or of many) as one forward (predict_many):
    eagerly, or with `compiled` the blocks under torch.compile (every row's keys padded to the longest context
    in the batch, the key length dynamic), which on CUDA also captures them in CUDA graphs (mode reduce-overhead:
    one per shape). Compiled, the rows are padded to a power of two, so a few graphs serve every batch, and the
    sessions' caches are rows of one KVPool of `cache_rows` rows (new_cache), which the graphs read in place."""

    def __init__(self, model: WamModel, compiled: bool = False, cache_rows: int | None = None):
        if compiled and not cache_rows:
            raise ValueError("a compiled Denoiser keeps its sessions' caches in a pool: give its cache_rows (the "
                             "sessions it serves at once x each one's rows)")
        self.model, self.compiled, self.cache_rows = model, compiled, cache_rows
        self.blocks = None
        self.pool: KVPool | None = None
        self._pool_made = threading.Lock()
        if compiled:
            cuda = model.patch_embedding.weight.device.type == "cuda"
            self.blocks = torch.compile(model.run_blocks, mode="reduce-overhead" if cuda else None)

    def new_cache(self, rows: int, device: torch.device, **shape) -> KVCache:
        """A session's KV cache (`shape`: new_cache's): tensors of its own eagerly; compiled, rows of the pool
        (made for cache_rows rows at the first cache)."""
        if not self.compiled:
            return self.model.new_cache(rows, device=device, **shape)
        with self._pool_made:
            if self.pool is None:
                self.pool = self.model.new_pool(self.cache_rows, device=device, **shape)
        return self.model.new_cache(rows, device=device, pool=self.pool, **shape)

    def __call__(self, items: list[Prediction]) -> list[WamOutputs]:
        """The outputs of `items` in order; those on a guidance peer's caches run there, at the same time."""
        remote = [i for i, item in enumerate(items) if isinstance(item.cache, RemoteCache)]
        if not remote:
            return self._local(items)
        peer = items[remote[0]].cache.peer
        answer = peer.predict([items[i] for i in remote])
        try:
            local = iter(self._local([item for item in items if not isinstance(item.cache, RemoteCache)]))
        finally:
            remote_outputs = iter(answer())  # always: the peer's answer must be taken before the next command
        return [next(remote_outputs) if isinstance(item.cache, RemoteCache) else next(local) for item in items]

    def _local(self, items: list[Prediction]) -> list[WamOutputs]:
        if not items:  # a step the DiT cache skips
            return []
        if not self.compiled:
            return self.model.predict_many(items)
        rows, per_item = sum(item.state.shape[0] for item in items), items[-1].state.shape[0]
        repeats = ((1 << (rows - 1).bit_length()) - rows) // per_item  # copies of the last item, outputs dropped
        outputs = self.model.predict_many(items + items[-1:] * repeats, static=True, blocks=self.blocks)
        return outputs[:len(items)]


class ChunkJob:
    """One chunk being denoised a step at a time: `passes` are the transformer forwards the current step needs
    (none when the DiT step cache reuses the last velocities); `advance` takes their outputs and takes the step."""

    def __init__(self, rollout: ChunkRollout, state: torch.Tensor, generator: torch.Generator | None):
        self.rollout, self.state, self.index = rollout, state, rollout.next_chunk
        arch, s = rollout.model.arch, rollout.sampler
        batch, device = state.shape[0], state.device
        h, w = rollout.latent_hw
        self.video = torch.randn(batch, arch.out_dim, rollout.frames_per_chunk, h, w, generator=generator,
                                 device=device)
        self.actions = torch.randn(batch, rollout.actions_per_chunk, arch.action_dim, generator=generator,
                                   device=device)
        self.video_solver = SOLVERS[s.solver](rollout.video_sigmas)
        self.action_solver = SOLVERS[s.solver](rollout.action_sigmas)
        self.step_cache = DitStepCache(s.dit_cache, s.steps, s.dit_passes, s.dit_steps)
        self.step, self.dit_steps = 0, 0
        self.queue_s, self.batch = 0.0, 1  # set by a DenoiseEngine
        self.velocities: tuple[torch.Tensor, torch.Tensor] | None = None
        self.passes = self._passes()

    @property
    def done(self) -> bool:
        return self.step >= self.rollout.sampler.steps

    def _passes(self) -> list[Prediction]:
        r, i = self.rollout, self.step
        if self.done or not self.step_cache.run(i):
            return []
        batch, device = self.state.shape[0], self.state.device
        video_t = r.video_schedule.timesteps[i].expand(batch).to(device)
        action_t = r.action_schedule.timesteps[i].expand(batch).to(device)
        inputs = (self.video, self.actions, self.state, video_t, action_t)
        if r._batched():
            return [Prediction(r.caches[0], *(r._rows(x) for x in inputs))]
        return [Prediction(cache, *inputs) for cache in r.caches]

    def advance(self, outputs: list[WamOutputs]) -> None:
        """Take the step with the outputs of `passes` (in order)."""
        advance_jobs([self], [outputs])

    def _take(self, outputs: list[WamOutputs]) -> None:
        """This step's velocities: the outputs of `passes` (guided), or the last ones where the DiT cache skips."""
        if self.passes:
            if len(outputs) == 1 and self.rollout._batched():
                outputs = [WamOutputs(v, a) for v, a in zip(outputs[0].video.chunk(2), outputs[0].actions.chunk(2),
                                                             strict=True)]
            if len(outputs) == 1:
                self.velocities = outputs[0].video, outputs[0].actions
            else:  # (conditional, unconditional)
                s = self.rollout.sampler
                self.velocities = (guide(outputs[0].video, outputs[1].video, s.guidance),
                                   guide(outputs[0].actions, outputs[1].actions, s.action_guidance))
            self.step_cache.computed(self.velocities[0])
            self.dit_steps += 1

    def chunk(self) -> Chunk:
        return Chunk(self.video, self.actions, self.dit_steps, self.dit_steps * len(self.rollout.caches), self.queue_s,
                     self.batch, self.index)


def advance_jobs(jobs: list[ChunkJob], outputs: list[list[WamOutputs]]) -> None:
    """One step of every job, each with the outputs of its passes; their solvers' steps through step_many (on
    CUDA one set of elementwise ops for all of them, not one per session; each job's arithmetic as alone)."""
    for job, job_outputs in zip(jobs, outputs, strict=True):
        job._take(job_outputs)
    steps, step_many = [job.step for job in jobs], type(jobs[0].video_solver).step_many
    videos = step_many([job.video_solver for job in jobs], steps, [job.velocities[0] for job in jobs],
                       [job.video for job in jobs])
    actions = step_many([job.action_solver for job in jobs], steps, [job.velocities[1] for job in jobs],
                        [job.actions for job in jobs])
    for job, video, action in zip(jobs, videos, actions, strict=True):
        job.video, job.actions = video, action
        job.step += 1
        job.passes = job._passes()


class ChunkRollout:
    def __init__(self, model: WamModel, sampler: SamplerSection, sample: SampleShape, *,
                 negative_text: torch.Tensor | None = None, denoiser: Denoiser | None = None,
                 peer: GuidancePeer | None = None):
        """sample: the trained sample shape (a context window of its chunks, their frames and actions, the latent
        canvas). negative_text: (1, text_len, text_dim) features of the unconditional prompt, needed when the
        sampler guides. denoiser: how `act` runs the transformer and where the caches live (default: eagerly,
        caches of their own; a DenoiseEngine's: its denoiser). peer: guidance in parallel,
        the unconditional branch's cache and pass on the peer (wam.trainer.guidance_peer)."""
        if guided(sampler) and negative_text is None:
            raise ValueError("classifier-free guidance needs the negative prompt's text features")
        self.model = model
        self.sampler = sampler
        self.denoiser = denoiser or Denoiser(model)
        self.frames_per_chunk = sample.frames_per_chunk
        self.actions_per_chunk = sample.actions_per_chunk
        self.latent_hw = (sample.latent_height, sample.latent_width)
        self.max_chunks = sample.num_chunks
        schedule = SCHEDULES[sampler.solver]
        self.video_schedule = schedule(sampler.steps, sampler.shift, sampler.video_final_sigma)
        self.action_schedule = schedule(sampler.steps, sampler.shift)
        self.negative_text = negative_text if guided(sampler) else None
        self.peer = peer if self.negative_text is not None else None
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
        return self.negative_text is not None and self.sampler.guidance_batch and self.peer is None

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
        shape = {"max_chunks": self.max_chunks, "frames_per_chunk": self.frames_per_chunk,
                 "actions_per_chunk": self.actions_per_chunk, "latent_hw": self.latent_hw}
        if len(self.caches) != len(texts) or self.caches[0].layers[0].k.shape[0] != rows:
            self.caches = []  # the old ones' pool rows given back first
            self.caches = [self.denoiser.new_cache(rows, first_latent.device, **shape)]
            if len(texts) > 1:  # sequential guidance's second cache, or the peer's
                self.caches.append(self.peer.cache(rows) if self.peer is not None
                                   else self.denoiser.new_cache(rows, first_latent.device, **shape))
        for cache, branch_text in zip(self.caches, texts, strict=True):
            if isinstance(cache, RemoteCache):
                cache.reset(shape, branch_text, image, i2v_cond, first_latent)
                continue
            self.model.set_conditioning(cache, branch_text, self._rows(image), self._rows(i2v_cond))
            self.model.observe(cache, self._rows(first_latent))

    def start(self, state: torch.Tensor, generator: torch.Generator | None = None) -> ChunkJob:
        """Begin denoising the next chunk from noise given the robot state (B, state_dim); `act` runs it to the
        end, a DenoiseEngine steps it together with other sessions' chunks."""
        if self.cache is None:
            raise RuntimeError("reset the rollout with a first frame before acting")
        if self.context_full:
            raise RuntimeError(f"context window of {self.max_chunks} chunks is full; reset with a new first frame")
        return ChunkJob(self, state, generator)

    @torch.no_grad()
    def act(self, state: torch.Tensor, generator: torch.Generator | None = None) -> Chunk:
        """Denoise the next chunk from noise given the robot state (B, state_dim)."""
        job = self.start(state, generator)
        while not job.done:  # sequential guidance: a forward per branch; batched: both branches' rows in one;
            sequential = len(job.passes) > 1 and self.peer is None  # parallel: each branch on its own device
            job.advance([self.denoiser([item])[0] for item in job.passes] if sequential else self.denoiser(job.passes))
        return job.chunk()

    @torch.no_grad()
    def observe(self, latents: torch.Tensor, chunk: int | None = None) -> None:
        """Write the latents (B, z, F, h, w) of a chunk acted on into the cache(s): by default the next one;
        an earlier `chunk` replaces what was written for it (and drops the chunks after it)."""
        self.model.observe_many(self.observations(latents, chunk))

    def observations(self, latents: torch.Tensor, chunk: int | None = None) -> list[Observation]:
        """`observe`'s writes into this rollout's own caches, for a DenoiseEngine to batch with other sessions'
        (observe_many); a guidance peer's cache is written here and now, on the peer."""
        chunk = self.next_chunk if chunk is None else chunk
        if self.cache is None or chunk >= self.max_chunks:
            raise RuntimeError("nothing to observe: act on a chunk first")
        local = []
        for cache in self.caches:
            if isinstance(cache, RemoteCache):
                cache.observe(latents, chunk)
            else:
                local.append(Observation(cache, self._rows(latents), chunk))
        return local
