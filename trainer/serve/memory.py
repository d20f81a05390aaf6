"""What serving takes on a device beyond the weights and the sessions' KV caches, traced on fake tensors (no
memory is allocated, so the 14B layout traces in seconds on any host): the activations of a batched forward, the
history a session's VAE stream keeps between requests, and the peak of one request's own work. The admission
(PolicyRuntime, `wam plan --serve`) counts them next to the caches, so that a full batch does not run the device
out of memory among robots already served."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from wam.platform.presets import SampleShape, WamArch
from wam.trainer.model.kv_cache import KVCache
from wam.trainer.model.model import Observation, Prediction
from wam.trainer.model.registry import model_config
from wam.trainer.model.vae import StreamState, WanVAE, vae_config
from wam.trainer.tracing import LayoutConstants


class ForwardActivations(NamedTuple):
    """Bytes of activations at the peak of one eager batched forward."""

    predict: int  # predict_many: a denoising step of every session's chunk
    observe: int  # observe_many: every session's observed frames written into its cache

    @property
    def peak(self) -> int:
        return max(self.predict, self.observe)


class ServingMemory(NamedTuple):
    """What the admission counts besides the weights and the KV caches, in bytes."""

    activations: int  # one session's share of a batched forward's activations (a batch of n: n times it, at most)
    stream: int  # a session's VAE stream history, held from one request to the next
    request: int  # one request's own work at its peak, outside the engine (PolicyRuntime.encoding: one at a time):
    # a chunk's frames encoded, its predicted video decoded, or a context window's first frame prefilled
    encode: int  # one session's chunk of frames encoded, at its peak: n sessions' batched take n times it and a
    # copy of their streams' histories, and the server batches as many as `request` holds (wam.trainer.serve.encoding;
    # a new window's first frame and image-to-video channels, encoded 4 frames a call, peak below a chunk's 8)


@lru_cache(maxsize=8)  # a process traces each layout once (a server starts once; plans and tests ask again)
def serving_memory(arch: WamArch, sample: SampleShape, rows: int, dtype: torch.dtype,
                   encoder_dtype: torch.dtype) -> ServingMemory:
    """ServingMemory of sessions of `rows` rows (2 guided on one device), the model in `dtype`, the VAE in
    `encoder_dtype`. The text encoder and CLIP (one prompt, one image per context window) are not traced."""
    # a batch's activations grow by the same bytes with every session from the second on (the first one's are
    # a little less): half of two sessions' bounds every batch, and a first frame's prefill (fewer tokens)
    activations = forward_activations(arch, sample, rows, dtype, sessions=2).peak // 2
    stream, encode, decode = vae_memory(arch, sample, encoder_dtype)
    return ServingMemory(activations, stream, max(encode, decode, activations), encode)


def forward_activations(arch: WamArch, sample: SampleShape, rows: int, dtype: torch.dtype, sessions: int = 1,
                        blocks: int = 2) -> ForwardActivations:
    """The activations of one eager predict_many and one observe_many of `sessions` sessions of `rows` rows, each at
    the last chunk of its context window (the longest context), in `dtype`. A forward holds one block's activations
    and the previous block's output at a time: 2 blocks give a whole model's. A compiled forward fuses most of
    these temporaries: for it this is an upper bound."""
    a, s = dataclasses.replace(arch, num_layers=blocks), sample
    h, w, last = s.latent_height, s.latent_width, s.num_chunks - 1
    with FakeTensorMode(allow_non_fake_inputs=True), LayoutConstants(), torch.no_grad():
        model = _built(lambda: model_config(a, s).build(), dtype)

        def noise(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, dtype=dtype)

        caches = [model.new_cache(rows, s.num_chunks, s.frames_per_chunk, s.actions_per_chunk, (h, w))
                  for _ in range(sessions)]
        for cache in caches:
            model.set_conditioning(
                cache, noise(rows, a.text_len, a.text_dim),
                noise(rows, a.image_tokens, a.image_dim) if a.has_image_branch else None,
                noise(rows, 4 + a.latent_channels, s.window_frames, h, w) if a.i2v_concat else None)
        # every context written up to its last chunk: the first frame, then each chunk's frames
        for chunk, frames in [(None, 1), *((c, s.frames_per_chunk) for c in range(last))]:
            model.observe_many([Observation(c, noise(rows, a.latent_channels, frames, h, w), chunk) for c in caches])
        predict = _traced_activations(lambda: model.predict_many([Prediction(
            c, noise(rows, a.out_dim, s.frames_per_chunk, h, w), noise(rows, s.actions_per_chunk, a.action_dim),
            noise(rows, a.state_dim), torch.rand(rows), torch.rand(rows)) for c in caches]), model, held(caches))
        observe = _traced_activations(lambda: model.observe_many([Observation(
            c, noise(rows, a.latent_channels, s.frames_per_chunk, h, w), last) for c in caches]), model, held(caches))
    return ForwardActivations(predict, observe)


def vae_memory(arch: WamArch, sample: SampleShape, dtype: torch.dtype) -> tuple[int, int, int]:
    """(a VAE stream's history after a context window's first frame and a chunk, the activations at the peak of
    encoding a chunk's frames, of decoding its predicted video), one robot's frames at the served canvas."""
    cfg, s = vae_config(arch.vae), sample
    height, width = s.canvas(arch)
    with FakeTensorMode(allow_non_fake_inputs=True), LayoutConstants(), torch.no_grad():
        vae, stream = _built(lambda: WanVAE(cfg), dtype), StreamState()
        vae.encode_stream(torch.randn(1, 3, 1, height, width, dtype=dtype), stream)
        frames = torch.randn(1, 3, cfg.temporal_stride * s.frames_per_chunk, height, width, dtype=dtype)
        history = list(stream.frames.values())
        encode = _traced_activations(lambda: vae.encode_stream(frames, stream), vae, history)
        # the session's decode: from the newest known latent frame on (Session._decoded)
        latents = torch.randn(1, arch.latent_channels, 1 + s.frames_per_chunk, s.latent_height, s.latent_width)
        decode = _traced_activations(lambda: vae.decode(latents), vae, [latents])
        kept = sum(t.nbytes for t in stream.frames.values())
    return kept, encode, decode


def held(caches: list[KVCache]) -> list[torch.Tensor]:
    """Every tensor the KV caches `caches` hold: their blocks' keys and values, their prompts' cross-attention keys
    and values, their I2V channels."""
    return [t for cache in caches for t in (
        *(t for layer in cache.layers for t in (layer.k, layer.v)),
        *(t for context in cache.cross_context for kv in (context.text, context.image) if kv is not None for t in kv),
        *([cache.i2v_cond] if cache.i2v_cond is not None else []))]


def _built(build: Callable[[], torch.nn.Module], dtype: torch.dtype) -> torch.nn.Module:
    """A module built with its parameters (fake, under FakeTensorMode) made in `dtype`: no conversion allocated."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build()
    finally:
        torch.set_default_dtype(default)


class _LiveBytes(TorchDispatchMode):
    """The bytes of tensor storage alive while it is entered, and their peak: each storage an operator's output
    brings that is not one of `given` counts until it is freed. A dispatch mode acts on its own thread only; torch's
    MemTracker also hooks every module of every thread, so a server's engine warming up meanwhile would be traced
    (and broken) with it, and it refuses a module called twice at the top level (the VAE decodes frame by frame)."""

    def __init__(self, given: list[torch.Tensor]):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary({t.untyped_storage(): None for t in given})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (storage := t.untyped_storage()) not in self._seen:
                self._seen[storage] = None
                size = storage.nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, size)
        return out

    def _freed(self, size: int) -> None:
        self.live -= size


def _traced_activations(run: Callable[[], object], module: torch.nn.Module, given: list[torch.Tensor]) -> int:
    """The bytes `run` allocates at its peak, `module`'s weights and the `given` tensors it reads or writes in place
    not counted (a KV cache written in place is not an activation)."""
    tracker = _LiveBytes([*module.parameters(), *module.buffers(), *given])
    with tracker:
        run()
    return tracker.peak
