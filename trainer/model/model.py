"""The World Action Model: a Wan2.1 DiT that jointly denoises future video latents and robot actions.

Training runs the whole teacher-forcing sequence (see wam.platform.layout) in one forward. Inference runs
chunk by chunk against a KV cache: `observe` writes clean frames (the first frame, then each chunk's REAL
observed latents) into the cache, `predict` denoises the next chunk's video and actions without writing.
Both paths share every step below, so they agree numerically (tests/test_model.py). `wan_forward` runs the
same steps as plain Wan2.1: video only, full attention (tests/test_wan_forward.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.nn_modules import GELU, SiLU
from torchtitan.protocols import BaseModel
from torchtitan.protocols.module import Module, ModuleList, Sequential

from wam.platform.accounting import count_flops
from wam.platform.layout import TokenKind, TokenLayout
from wam.platform.presets import SampleShape, WamArch
from wam.trainer.model.attention import CrossContext, PooledContext, SessionContexts
from wam.trainer.model.block import Conditioning, TokenModulation, WanBlock
from wam.trainer.model.heads import ActionEncoder, ImageProjection, OutputHead, ReluMLP
from wam.trainer.model.kv_cache import KVCache, KVPool, LayerCache, PooledRows, PoolSlot, SessionRows
from wam.trainer.model.layers import Conv3d, sinusoidal_embedding
from wam.trainer.model.mask import AttentionMask, PaddedMask, RaggedMask
from wam.trainer.model.rope import rope_tables

_CLEAN_KINDS = (TokenKind.FIRST, TokenKind.CLEAN)


@dataclass
class WamInputs:
    """One teacher-forcing batch in latent space: K chunks of F latent frames and A actions.

    Packed (`windows` set): windows of 1..K chunks one after another along the token axis, batch 1, no
    padding. The chunk and frame axes then hold every window's chunks in order (K = sum(windows); `video` and
    `i2v_cond` each window's first frame and then its chunks' frames), and `text` / `image` one row per window.
    """

    video: torch.Tensor  # (B, z, 1 + K*F, h, w) clean latents: first frame + K chunks
    noisy_video: torch.Tensor  # (B, z, K*F, h, w)
    noisy_actions: torch.Tensor  # (B, K, A, action_dim)
    state: torch.Tensor  # (B, K, state_dim)
    video_t: torch.Tensor  # (B, K) timestep of each chunk's noisy video, 0..1000
    action_t: torch.Tensor  # (B, K) timestep of each chunk's noisy actions, 0..1000
    text: torch.Tensor  # (B, text_len, text_dim) umT5 features
    image: torch.Tensor | None = None  # (B, image_tokens, image_dim) CLIP features (I2V models)
    i2v_cond: torch.Tensor | None = None  # (B, 4 + z, 1 + K*F, h, w) mask + first-frame latent (Wan2.1-I2V)
    windows: tuple[int, ...] | None = None  # packed: the chunks of each window

    @classmethod
    def random(cls, arch: WamArch, sample: SampleShape, batch: int = 1, seed: int = 0,
               device: torch.device | str = "cpu") -> WamInputs:
        """Random tensors of the right shapes (smoke tests, benchmarks); timesteps uniform in [0, 1000)."""
        g = torch.Generator().manual_seed(seed)
        k, f, a = sample.num_chunks, sample.frames_per_chunk, sample.actions_per_chunk
        z, h, w = arch.latent_channels, sample.latent_height, sample.latent_width

        def r(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(device)

        return cls(
            video=r(batch, z, sample.window_frames, h, w), noisy_video=r(batch, z, k * f, h, w),
            noisy_actions=r(batch, k, a, arch.action_dim), state=r(batch, k, arch.state_dim),
            video_t=(torch.rand(batch, k, generator=g) * 1000).to(device),
            action_t=(torch.rand(batch, k, generator=g) * 1000).to(device),
            text=r(batch, arch.text_len, arch.text_dim),
            image=r(batch, arch.image_tokens, arch.image_dim) if arch.has_image_branch else None,
            i2v_cond=r(batch, 4 + z, sample.window_frames, h, w) if arch.i2v_concat else None,
        )


@dataclass
class WamOutputs:
    video: torch.Tensor  # (B, z, K*F, h, w) predicted velocity (noise - data), fp32
    actions: torch.Tensor  # (B, K, A, action_dim) predicted velocity, fp32


def _param_seed(base: int, fqn: str) -> int:
    canonical = fqn.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    return int.from_bytes(hashlib.blake2b(f"{base}:{canonical}".encode(), digest_size=8).digest(), "little") >> 1


@torch.no_grad()
def _init_full_then_shard(param: torch.Tensor, init, seed: int) -> None:
    local = param.to_local() if isinstance(param, DTensor) else param
    full = torch.empty(param.shape, dtype=param.dtype, device=local.device)
    with torch.random.fork_rng(devices=[local.device] if local.device.type == "cuda" else []):
        torch.manual_seed(seed)
        init(full)
    if isinstance(param, DTensor):  # every rank made the same full tensor; keep this rank's shard
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
    local.copy_(full)


@lru_cache(maxsize=8)  # a cached dense mask of a 14B sample is ~180 MB
def _attention_mask(queries: TokenLayout, keys: TokenLayout) -> AttentionMask:
    return AttentionMask(queries, keys)


@lru_cache(maxsize=8)
def _ragged_mask(layouts: tuple[TokenLayout, ...]) -> RaggedMask:
    return RaggedMask([_attention_mask(layout, layout) for layout in layouts])


@lru_cache(maxsize=8)  # one of 8 guided 14B chunks is ~230 MB
def _padded_mask(pairs: tuple[tuple[TokenLayout, TokenLayout], ...], rows: tuple[int, ...], context: int,
                 device: torch.device) -> PaddedMask:
    """(B, 1, Lq, context + Lq) bool: each (committed layout, prediction layout) pair's mask with its committed
    keys padded to `context`, repeated over the pair's rows (predict_many)."""
    masks = []
    for (committed, queries), r in zip(pairs, rows, strict=True):
        dense = _attention_mask(queries, committed + queries).dense(device)  # (Lq, committed + Lq)
        padded = torch.zeros(queries.length, context + queries.length, dtype=torch.bool, device=device)
        padded[:, :committed.length] = dense[:, :committed.length]
        padded[:, context:] = dense[:, committed.length:]
        masks.append(padded.expand(r, 1, -1, -1))
    return PaddedMask.of(torch.cat(masks))


class Prediction(NamedTuple):
    """`predict`'s inputs for one cache's rows (predict_many)."""

    cache: KVCache
    noisy_video: torch.Tensor  # (B, z, F, h, w)
    noisy_actions: torch.Tensor  # (B, A, action_dim)
    state: torch.Tensor  # (B, state_dim)
    video_t: torch.Tensor  # (B,)
    action_t: torch.Tensor  # (B,)


class Observation(NamedTuple):
    """`observe`'s inputs for one cache (observe_many)."""

    cache: KVCache
    latents: torch.Tensor  # (B, z, F, h, w) clean latents: a first frame (chunk None) or a chunk's frames
    chunk: int | None


@lru_cache(maxsize=32)
def _span_of_token(layout: TokenLayout) -> torch.Tensor:
    lengths = torch.tensor([s.length for s in layout.spans])
    return torch.repeat_interleave(torch.arange(len(layout.spans)), lengths)


class WamModel(BaseModel):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseModel.Config):
        arch: WamArch
        sample: SampleShape  # the training sample shape, for FLOP accounting (MFU)
        patch_embedding: Conv3d.Config
        text_in: Linear.Config
        text_out: Linear.Config
        time_in: Linear.Config
        time_out: Linear.Config
        time_projection: Linear.Config
        blocks: list[WanBlock.Config]
        head: OutputHead.Config
        img_emb: ImageProjection.Config | None
        state_encoder: ReluMLP.Config
        action_encoder: ActionEncoder.Config
        action_decoder: ReluMLP.Config

        def update_from_config(self, *, config, **kwargs) -> None:
            """The model reads nothing from the trainer config: its shape comes from the preset."""

        def get_nparams_and_flops(self, model: torch.nn.Module, seq_len: int) -> tuple[int, int]:
            """(parameters, training FLOPs per token) from the analytical accounting of the sample shape;
            `seq_len` is ignored because a WAM sample's token count follows from its shape."""
            flops = count_flops(self.arch, self.sample)
            return sum(p.numel() for p in model.parameters()), flops.training // flops.tokens

    def __init__(self, config: Config):
        super().__init__()
        self.arch = config.arch
        self.patch_embedding = config.patch_embedding.build()
        self.text_embedding = Sequential(config.text_in.build(), GELU.Config(approximate="tanh").build(),
                                         config.text_out.build())
        self.time_embedding = Sequential(config.time_in.build(), SiLU.Config().build(), config.time_out.build())
        self.time_projection = Sequential(SiLU.Config().build(), config.time_projection.build())
        self.blocks = ModuleList([cfg.build() for cfg in config.blocks])
        self._prepare_mask = self.blocks[0].self_attn.kernel.prepare  # every block has the same kernel (KERNELS)
        self.head = config.head.build()
        if config.img_emb is not None:
            self.img_emb = config.img_emb.build()
        self.state_encoder = config.state_encoder.build()
        self.action_encoder = config.action_encoder.build()
        self.action_decoder = config.action_decoder.build()

    # -- initialisation -------------------------------------------------------------------------------

    def init_states(self, *, buffer_device: torch.device | None = None) -> None:
        """Initialise every parameter from (global seed, its name) alone, one full tensor at a time, so the
        initial weights are the same however FSDP/HSDP shards them (and in a single process)."""
        base = torch.initial_seed()
        for prefix, module in self.named_modules():
            params = dict(module.named_parameters(recurse=False))
            if not params or not isinstance(module, Module):
                continue
            if module._param_init is None:
                module.reset_parameters()  # norms: constants, identical under any sharding
                continue
            for name, param in params.items():
                _init_full_then_shard(param, module._param_init[name], _param_seed(base, f"{prefix}.{name}"))

    # -- shared steps ---------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def _grid(self, latents: torch.Tensor) -> tuple[int, int]:
        _, ph, pw = self.arch.patch
        h, w = latents.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(f"latent frames of {h}x{w} are not divisible by the patch size {ph}x{pw}")
        return h // ph, w // pw

    def conditioning(self, text: torch.Tensor, image: torch.Tensor | None) -> Conditioning:
        if self.arch.has_image_branch and image is None:
            raise ValueError(f"{self.arch.image_tokens} CLIP image tokens are required by this I2V model")
        image_emb = self.img_emb(image) if self.arch.has_image_branch else None
        return Conditioning(self.text_embedding(text.to(self.dtype)), image_emb)

    def embed_video(self, latents: torch.Tensor, frame_start: int, i2v_cond: torch.Tensor | None) -> torch.Tensor:
        """(B, z, f, h, w) latents of frames [frame_start, frame_start + f) -> (B, f*h'*w', dim) tokens."""
        if self.arch.i2v_concat:
            if i2v_cond is None:
                raise ValueError("this Wan2.1-I2V model needs i2v_cond (mask + first-frame latent channels)")
            latents = torch.cat([latents, i2v_cond[:, :, frame_start:frame_start + latents.shape[2]]], dim=1)
        return self.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2)

    def _embed_sessions(self, latents: list[torch.Tensor], caches: list[KVCache],
                        layouts: list[TokenLayout]) -> torch.Tensor:
        """Every session's latents (B_i, z, f, h, w) in one patch embedding, each with the I2V channels of its own
        frames (where its layout's first span starts) -> (sum B_i, f*h'*w', dim)."""
        frames = latents[0].shape[2]
        conds = [(cache.i2v_cond, layout.spans[0].frame_start) for cache, layout in zip(caches, layouts, strict=True)]
        cond = (torch.cat([c[:, :, start:start + frames] for c, start in conds])
                if self.arch.i2v_concat and all(c is not None for c, _ in conds) else None)
        return self.embed_video(torch.cat(latents), 0, cond)

    def _span_timesteps(self, layout: TokenLayout, video_t: torch.Tensor | None,
                        action_t: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """(B, spans) timesteps: 0 for clean spans; a chunk's video t for its noisy span; its action t for its
        action span and (as DreamZero does) its state token. Columns of video_t/action_t are the layout's
        predicted chunks in order."""
        predicted = sorted({s.chunk for s in layout.spans if s.kind not in _CLEAN_KINDS})
        column = {chunk: i for i, chunk in enumerate(predicted)}
        zero = torch.zeros(batch, device=device)
        cols = []
        for span in layout.spans:
            if span.kind in _CLEAN_KINDS:
                cols.append(zero)
            elif span.kind == TokenKind.NOISY:
                cols.append(video_t[:, column[span.chunk]].float())
            else:
                cols.append(action_t[:, column[span.chunk]].float())
        return torch.stack(cols, dim=1)

    def _time_modulation(self, layout: TokenLayout, span_t: torch.Tensor) -> tuple[torch.Tensor, TokenModulation]:
        """The per-span time embedding (B, spans, dim), for the output head, and the blocks' adaLN input."""
        e = self.time_embedding(sinusoidal_embedding(span_t, self.arch.freq_dim).to(self.dtype)).float()
        e0 = self.time_projection(e.to(self.dtype)).float().unflatten(-1, (6, self.arch.dim))
        return e, TokenModulation(e0, _span_of_token(layout).to(span_t.device))

    def _run_blocks(self, x: torch.Tensor, layout: TokenLayout, span_t: torch.Tensor, grid: tuple[int, int],
                    context: Conditioning | list, mask: AttentionMask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, L, dim) tokens of `layout`, attending to each other (no cache) under `mask` (default: the
        layout's). Returns the final hidden states and the per-span time embedding (B, spans, dim) for the output
        head."""
        e, modulation = self._time_modulation(layout, span_t)
        rope = rope_tables(layout, grid, self.arch.head_dim, self.arch.rope_theta, x.device)
        mask = mask if mask is not None else _attention_mask(layout, layout)
        self._prepare_mask(mask, x.device)
        return self.run_blocks(x, modulation, rope, mask, context, [None] * len(self.blocks)), e

    def run_blocks(self, x: torch.Tensor, modulation: TokenModulation, rope: tuple[torch.Tensor, torch.Tensor],
                   mask: AttentionMask | PaddedMask | None, context: Conditioning | list,
                   layers: list[LayerCache | PooledRows | SessionRows | None]) -> torch.Tensor:
        """Every block over x (B, L, dim); the serving engine compiles this (over its KVPool: PooledRows)."""
        for i, block in enumerate(self.blocks):
            x = block(x, modulation, rope, mask, context[i] if isinstance(context, list) else context, layers[i])
        return x

    def _decode(self, x: torch.Tensor, e: torch.Tensor, layout: TokenLayout, grid: tuple[int, int],
                frames: int) -> WamOutputs:
        """Velocities from the hidden states of the noisy video tokens (Wan head, modulated by each token's
        time embedding, gathered from the per-span `e`) and of the action tokens."""
        noisy, action = layout.slice(TokenKind.NOISY), layout.slice(TokenKind.ACTION)
        e_noisy = e.index_select(1, _span_of_token(layout)[noisy].to(e.device))
        video = self._unpatchify(self.head(x[:, noisy], e_noisy), frames, grid)
        chunks = layout.count(TokenKind.STATE)
        actions = self.action_decoder(x[:, action]).float().unflatten(1, (chunks, layout.actions_per_chunk))
        return WamOutputs(video=video, actions=actions)

    def _unpatchify(self, x: torch.Tensor, frames: int, grid: tuple[int, int]) -> torch.Tensor:
        pt, ph, pw = self.arch.patch
        b, z = x.shape[0], self.arch.out_dim
        x = x.float().view(b, frames // pt, grid[0], grid[1], pt, ph, pw, z)
        return torch.einsum("bfhwpqrc->bcfphqwr", x).reshape(b, z, frames, grid[0] * ph, grid[1] * pw)

    # -- training -------------------------------------------------------------------------------------

    def forward(self, batch: WamInputs) -> WamOutputs:
        if batch.windows is not None:
            return self._forward_packed(batch)
        b, k, a = batch.noisy_actions.shape[:3]
        frames = batch.noisy_video.shape[2]
        if frames % k:
            raise ValueError(f"{frames} noisy latent frames do not split into {k} chunks")
        f = frames // k
        if batch.video.shape[2] != 1 + frames:
            raise ValueError(f"video must hold the first frame + {frames} chunk frames, got {batch.video.shape[2]}")
        grid = self._grid(batch.video)
        layout = TokenLayout.teacher_forcing(k, f, grid[0] * grid[1], a)
        x = self._teacher_forcing_tokens(batch.video, batch.noisy_video, batch.noisy_actions, batch.state,
                                         batch.action_t, batch.i2v_cond, f)
        span_t = self._span_timesteps(layout, batch.video_t, batch.action_t, b, x.device)
        context = self.conditioning(batch.text, batch.image)
        x, e = self._run_blocks(x, layout, span_t, grid, context)
        return self._decode(x, e, layout, grid, frames)

    def _teacher_forcing_tokens(self, video: torch.Tensor, noisy_video: torch.Tensor, noisy_actions: torch.Tensor,
                                state: torch.Tensor, action_t: torch.Tensor, i2v_cond: torch.Tensor | None,
                                f: int) -> torch.Tensor:
        """(B, L, dim) fp32 tokens of one teacher-forcing window of K = state.shape[1] chunks."""
        k, a = noisy_actions.shape[1:3]
        clean_frames = 1 + (k - 1) * f  # the last chunk's clean copy is never attended to
        return torch.cat([
            self.embed_video(video[:, :, :clean_frames], 0, i2v_cond),
            self.embed_video(noisy_video, 1, i2v_cond),
            self.action_encoder(noisy_actions.flatten(1, 2), action_t.repeat_interleave(a, dim=1)),
            self.state_encoder(state),
        ], dim=1).float()

    def _forward_packed(self, batch: WamInputs) -> WamOutputs:
        """Windows packed along the tokens: each with its own block-causal mask (none attends across windows),
        RoPE positions from 0 and prompt, in one sequence; per window exactly what it would get alone."""
        windows, total = batch.windows, sum(batch.windows)
        if batch.noisy_actions.shape[0] != 1 or batch.noisy_actions.shape[1] != total:
            raise ValueError(f"packed windows of {list(windows)} chunks need actions (1, {total}, A, dims), got "
                             f"{tuple(batch.noisy_actions.shape)}")
        f = batch.noisy_video.shape[2] // total
        if batch.noisy_video.shape[2] != total * f or batch.video.shape[2] != len(windows) + total * f:
            raise ValueError(f"packed windows of {list(windows)} chunks: video must hold each window's first frame "
                             f"+ its chunks' frames; got {batch.video.shape[2]} and {batch.noisy_video.shape[2]} "
                             "noisy frames")
        grid, a = self._grid(batch.video), batch.noisy_actions.shape[2]
        layouts, tokens, span_t = [], [], []
        frame = chunk = 0
        for k in windows:
            video_part = slice(frame, frame + 1 + k * f)
            chunks, noisy = slice(chunk, chunk + k), slice(chunk * f, (chunk + k) * f)
            i2v = batch.i2v_cond[:, :, video_part] if batch.i2v_cond is not None else None
            layouts.append(TokenLayout.teacher_forcing(k, f, grid[0] * grid[1], a))
            tokens.append(self._teacher_forcing_tokens(
                batch.video[:, :, video_part], batch.noisy_video[:, :, noisy], batch.noisy_actions[:, chunks],
                batch.state[:, chunks], batch.action_t[:, chunks], i2v, f))
            span_t.append(self._span_timesteps(layouts[-1], batch.video_t[:, chunks], batch.action_t[:, chunks], 1,
                                               tokens[-1].device))
            frame, chunk = video_part.stop, chunks.stop
        packed = sum(layouts[1:], layouts[0])
        lengths = tuple(layout.length for layout in layouts)
        context = self.conditioning(batch.text, batch.image)._replace(windows=lengths)
        x, e = self._run_blocks(torch.cat(tokens, dim=1), packed, torch.cat(span_t, dim=1), grid, context,
                                mask=_ragged_mask(tuple(layouts)))
        outs, span = [], 0
        for layout, x_window in zip(layouts, x.split(lengths, dim=1), strict=True):
            spans = len(layout.spans)
            outs.append(self._decode(x_window, e[:, span:span + spans], layout, grid, layout.count(TokenKind.NOISY)
                                     // (grid[0] * grid[1])))
            span += spans
        return WamOutputs(video=torch.cat([o.video for o in outs], dim=2),
                          actions=torch.cat([o.actions for o in outs], dim=1))

    # -- plain Wan2.1 ---------------------------------------------------------------------------------

    def wan_forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                    image: torch.Tensor | None = None, i2v_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The DiT exactly as Wan2.1's `WanModel.forward` computes it: video latents (B, z, T, h, w) at one
        timestep per sample (B,) (0..1000), full attention among all video tokens, 3D RoPE from frame 0, no
        action or state tokens; I2V models take CLIP tokens `image` and `i2v_cond` (B, 4 + z, T, h, w),
        concatenated to the latents. Returns the predicted velocity (B, z, T, h, w) in fp32.

        So an imported Wan2.1 checkpoint can be compared with Wan's own outputs, and video-only data can
        pretrain the backbone."""
        b, frames = latents.shape[0], latents.shape[2]
        if timestep.shape != (b,):
            raise ValueError(f"wan_forward takes one timestep per sample, shape ({b},), not "
                             f"{tuple(timestep.shape)}")
        if i2v_cond is not None and i2v_cond.shape[2] != frames:
            raise ValueError(f"i2v_cond has {i2v_cond.shape[2]} latent frames, the latents {frames}")
        grid = self._grid(latents)
        layout = TokenLayout.video_clip(frames, grid[0] * grid[1])
        x = self.embed_video(latents, 0, i2v_cond).float()  # (B, T*h'*w', dim)
        span_t = self._span_timesteps(layout, timestep.reshape(b, 1), None, b, x.device)  # (B, 1)
        x, e = self._run_blocks(x, layout, span_t, grid, self.conditioning(text, image))
        return self._unpatchify(self.head(x, e), frames, grid)  # e (B, 1, dim): every token's time embedding

    # -- chunk-wise inference with a KV cache ---------------------------------------------------------

    def _cache_capacity(self, max_chunks: int, frames_per_chunk: int, actions_per_chunk: int,
                        latent_hw: tuple[int, int]) -> tuple[tuple[int, int], int]:
        """(patches per latent frame, tokens a cache holds: a context window and room for one prediction)."""
        _, ph, pw = self.arch.patch
        grid = (latent_hw[0] // ph, latent_hw[1] // pw)
        tokens_per_frame = grid[0] * grid[1]
        prediction = frames_per_chunk * tokens_per_frame + actions_per_chunk + 1
        return grid, tokens_per_frame * (1 + max_chunks * frames_per_chunk) + prediction

    @torch.no_grad()
    def new_cache(self, batch: int, max_chunks: int, frames_per_chunk: int, actions_per_chunk: int,
                  latent_hw: tuple[int, int], device: torch.device | None = None,
                  pool: KVPool | None = None) -> KVCache:
        """A session's cache of `batch` rows: tensors of its own, or rows of `pool` (given back when it is
        collected)."""
        grid, capacity = self._cache_capacity(max_chunks, frames_per_chunk, actions_per_chunk, latent_hw)
        if pool is None:
            device = device or self.patch_embedding.weight.device
            shape = (batch, capacity, self.arch.num_heads, self.arch.head_dim)
            layers = [LayerCache(torch.zeros(shape, device=device, dtype=self.dtype),
                                 torch.zeros(shape, device=device, dtype=self.dtype)) for _ in self.blocks]
            return KVCache(layers, frames_per_chunk, actions_per_chunk, grid, max_chunks)
        if pool.capacity != capacity:
            raise ValueError(f"the KV pool holds {pool.capacity} tokens a row, this cache needs {capacity}")
        start = pool.take(batch)
        cache = KVCache(pool.layer_caches(start, batch), frames_per_chunk, actions_per_chunk, grid, max_chunks,
                        pooled=PoolSlot(pool, start, batch))
        pool.hand_out(cache)
        return cache

    def new_pool(self, rows: int, max_chunks: int, frames_per_chunk: int, actions_per_chunk: int,
                 latent_hw: tuple[int, int], device: torch.device | None = None) -> KVPool:
        """A KVPool of `rows` cache rows of this shape (a compiled engine's sessions' caches)."""
        _, capacity = self._cache_capacity(max_chunks, frames_per_chunk, actions_per_chunk, latent_hw)
        a = self.arch
        return KVPool(rows, len(self.blocks), capacity, a.num_heads, a.head_dim, a.text_len,
                      a.image_tokens if a.has_image_branch else None, device or self.patch_embedding.weight.device,
                      self.dtype)

    @torch.no_grad()
    def set_conditioning(self, cache: KVCache, text: torch.Tensor, image: torch.Tensor | None = None,
                         i2v_cond: torch.Tensor | None = None) -> None:
        """Start a session: cross-attention K/V of the prompt (and image) for every block, I2V channels, and
        an empty context."""
        conditioning = self.conditioning(text, image)
        cache.cross_context = [block.cross_context(conditioning) for block in self.blocks]
        if (at := cache.pooled) is not None:  # kept in its rows of the pool, which a compiled forward reads
            cache.cross_context = [CrossContext(*at.pool.keep(i, at, c.text, c.image))
                                   for i, c in enumerate(cache.cross_context)]
        cache.i2v_cond = i2v_cond
        cache.truncate(None)
        cache.observed_chunks = 0

    @torch.no_grad()
    def observe(self, cache: KVCache, latents: torch.Tensor, chunk: int | None = None) -> None:
        """Write clean latents into the cache: the first frame (chunk=None), or chunk `chunk`'s real observed
        frames at the positions its prediction occupied. Re-observing a chunk drops the chunks after it."""
        self.observe_many([Observation(cache, latents, chunk)])

    @torch.no_grad()
    def observe_many(self, items: list[Observation]) -> None:
        """`observe` for several caches (a serving engine's sessions), each at its own chunk: those writing as many
        frames (a first frame, or a chunk) in one forward, whose linear layers run on every row at once and whose
        attention runs per cache over its own keys (predict_many's eager path), each writing into its cache."""
        if len({id(item.cache) for item in items}) < len(items):
            raise ValueError("observe_many writes each cache once: a cache's next chunk attends to the one before")
        plans = [(item, *self._observed_layout(item)) for item in items]  # all checked before any is written
        for frames in sorted({item.latents.shape[2] for item in items}):
            group = [plan for plan in plans if plan[0].latents.shape[2] == frames]
            for item, _, keep in group:
                item.cache.truncate(keep)
            caches, layouts = [item.cache for item, _, _ in group], [layout for _, layout, _ in group]
            x = self._embed_sessions([item.latents for item, _, _ in group], caches, layouts).float()
            span_t = self._span_timesteps(layouts[0], None, None, x.shape[0], x.device)  # all clean: zeros
            _, modulation = self._time_modulation(layouts[0], span_t)
            self.run_blocks(x, modulation, *self._sessions(caches, layouts, x.device))
            for item, layout, _ in group:
                item.cache.commit(layout)
                item.cache.observed_chunks = 0 if item.chunk is None else item.chunk + 1

    @staticmethod
    def _observed_layout(item: Observation) -> tuple[TokenLayout, TokenLayout | None]:
        """The layout `item` writes and the committed layout it keeps (None: none, a first frame)."""
        cache, chunk = item.cache, item.chunk
        if cache.cross_context is None:
            raise RuntimeError("call set_conditioning before observe")
        f, tpf, a = cache.frames_per_chunk, cache.tokens_per_frame, cache.actions_per_chunk
        if chunk is None:
            layout, keep = TokenLayout.first_frame(tpf, a), None
        else:
            if cache.layout is None or not 0 <= chunk <= cache.observed_chunks:
                raise ValueError(f"can observe chunk 0..{cache.observed_chunks} after the first frame, not {chunk}")
            if chunk >= cache.max_chunks:
                raise ValueError(f"the cache holds {cache.max_chunks} chunks; reset it for a new context window")
            layout = TokenLayout.clean_chunk(chunk, f, tpf, a)
            keep = TokenLayout(cache.layout.spans[:1 + chunk], tpf, a)
        expected = 1 if chunk is None else f
        if item.latents.shape[2] != expected:
            raise ValueError(f"expected {expected} latent frame(s), got {item.latents.shape[2]}")
        return layout, keep

    @torch.no_grad()
    def predict(self, cache: KVCache, noisy_video: torch.Tensor, noisy_actions: torch.Tensor, state: torch.Tensor,
                video_t: torch.Tensor, action_t: torch.Tensor) -> WamOutputs:
        """Velocities for the next chunk (cache.next_chunk) given its noisy video (B, z, F, h, w), noisy actions
        (B, A, action_dim), state (B, state_dim) and timesteps (B,). The cache is read, never written."""
        return self.predict_many([Prediction(cache, noisy_video, noisy_actions, state, video_t, action_t)])[0]

    @torch.no_grad()
    def predict_many(self, items: list[Prediction], static: bool = False, blocks=None) -> list[WamOutputs]:
        """`predict` for several caches in one forward (continuous batching); each may be at a different chunk.
        Eagerly, the linear layers run on every row at once and attention per cache, over its own keys (nothing
        padded or copied). With `static` (the caches rows of one KVPool, read in place), every row attends to its
        committed context padded to the longest in the batch (shapes that change only with the chunk position, for
        torch.compile and CUDA graphs), then its own new tokens, under a per-row mask that hides the padding.
        `blocks`: a compiled run_blocks."""
        f, a, tpf = items[0].cache.frames_per_chunk, items[0].cache.actions_per_chunk, items[0].cache.tokens_per_frame
        layouts = []
        for item in items:
            cache = item.cache
            if cache.layout is None:
                raise RuntimeError("observe the first frame before predicting")
            if cache.next_chunk >= cache.max_chunks:
                raise ValueError(f"the cache holds {cache.max_chunks} chunks; reset it for a new context window")
            layouts.append(TokenLayout.prediction(range(cache.next_chunk, cache.next_chunk + 1), f, tpf, a))
        action_t = torch.cat([item.action_t for item in items]).reshape(-1, 1)
        x = torch.cat([
            self._embed_sessions([item.noisy_video for item in items], [item.cache for item in items], layouts),
            self.action_encoder(torch.cat([item.noisy_actions for item in items]), action_t.expand(-1, a)),
            self.state_encoder(torch.cat([item.state for item in items]).unsqueeze(1)),
        ], dim=1).float()
        layout = layouts[0]  # the chunks' prediction layouts differ only in their positions
        video_t = torch.cat([item.video_t for item in items]).reshape(-1, 1)
        span_t = self._span_timesteps(layout, video_t, action_t, x.shape[0], x.device)
        caches = [item.cache for item in items]
        e, modulation = self._time_modulation(layout, span_t)
        if static:
            x = (blocks or self.run_blocks)(x, modulation, *self._pooled(caches, layouts, x.device))
        else:
            x = self.run_blocks(x, modulation, *self._sessions(caches, layouts, x.device))
        out = self._decode(x, e, layout, caches[0].grid, f)
        sizes = [item.state.shape[0] for item in items]
        return [WamOutputs(video, actions[:, 0])
                for video, actions in zip(out.video.split(sizes), out.actions.split(sizes), strict=True)]

    def _sessions(self, caches: list[KVCache], layouts: list[TokenLayout], device: torch.device):
        """Per-row RoPE tables, and per block each session's own cache, mask and cross-attention context
        (predict_many eager, observe_many): no key is padded or copied, attention does what serving each alone does."""
        sizes = tuple(cache.layers[0].k.shape[0] for cache in caches)
        rope = self._row_rope(caches, layouts, sizes, device)
        masks = tuple(_attention_mask(layout, layout if cache.layout is None else cache.layout + layout)
                      for cache, layout in zip(caches, layouts, strict=True))
        for mask in masks:
            self._prepare_mask(mask, device)
        context = [SessionContexts(sizes, tuple(cache.cross_context[i] for cache in caches))
                   for i in range(len(self.blocks))]
        layers = [SessionRows(sizes, tuple(cache.layers[i] for cache in caches), masks)
                  for i in range(len(self.blocks))]
        return rope, None, context, layers

    def _row_rope(self, caches: list[KVCache], layouts: list[TokenLayout], sizes: tuple[int, ...],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin): every row's RoPE angles at its session's chunk, each (B, L, head_dim/2); (L, head_dim/2)
        for one session (its rows share them)."""
        if len(layouts) == 1:
            return rope_tables(layouts[0], caches[0].grid, self.arch.head_dim, self.arch.rope_theta, device)
        tables = [rope_tables(layout, caches[0].grid, self.arch.head_dim, self.arch.rope_theta, device)
                  for layout in layouts]
        return tuple(torch.cat([t[i].expand(r, -1, -1) for t, r in zip(tables, sizes, strict=True)]) for i in (0, 1))

    def _pooled(self, caches: list[KVCache], layouts: list[TokenLayout], device: torch.device):
        """Per-row RoPE tables and mask, and per block the pool's own tensors with each row's pool row and the
        positions to gather (predict_many, static): every row attends to its committed keys padded to the most
        any of them holds, so the shapes change only with the chunk position, and nothing is copied outside the
        compiled graph."""
        if any(cache.pooled is None or cache.pooled.pool is not caches[0].pooled.pool for cache in caches):
            raise ValueError("a static (compiled) batch reads its caches from one KVPool: make them with "
                             "new_cache(pool=...) (Denoiser.new_cache)")
        pool = caches[0].pooled.pool
        rows = tuple(cache.pooled.rows for cache in caches)
        context = max(cache.layout.length for cache in caches)
        rope = self._row_rope(caches, layouts, rows, device)
        mask = _padded_mask(tuple((c.layout, layout) for c, layout in zip(caches, layouts, strict=True)), rows,
                            context, device)
        at = torch.tensor([c.pooled.start + r for c in caches for r in range(c.pooled.rows)], device=device)
        positions = torch.arange(context, device=device)
        for tensor, dim in ((mask.rows, 3), (positions, 0)):
            torch._dynamo.maybe_mark_dynamic(tensor, dim)  # one compiled graph for every chunk position
        cross = [PooledContext(pool.text, pool.image, i, at) for i in range(len(self.blocks))]
        layers = [PooledRows(pool.k, pool.v, i, at, positions) for i in range(len(self.blocks))]
        return rope, mask, cross, layers
