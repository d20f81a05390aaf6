"""Analytical parameter, FLOP and memory accounting of a World Action Model, torch-free.

Used for MFU (trainer), capacity checks (operator) and `wam model info`. tests/test_accounting.py checks
the parameter counts against the instantiated model and the FLOPs against torch's FLOP counter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wam.platform.layout import TokenKind, TokenLayout
from wam.platform.presets import SampleShape, WamArch

GIB = 1024**3

# Frozen encoders: parameter counts of the public checkpoints (checked against the modules in tests).
FROZEN_ENCODER_PARAMS = {
    "umt5-xxl": 5_680_910_336,
    "clip-vit-h-14": 632_076_800,
    "wan2.1": 126_892_531,
    "wan2.2": 704_688_668,
}


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _layer_norm(n: int) -> int:
    return 2 * n


@dataclass(frozen=True)
class ParamCount:
    embeddings: int  # patch, text, time, image projection
    blocks: int
    head: int
    wam_heads: int  # state encoder, action encoder, action decoder

    @property
    def total(self) -> int:
        return self.embeddings + self.blocks + self.head + self.wam_heads


def block_params(a: WamArch) -> int:
    d = a.dim
    attn = 4 * _linear(d, d) + (2 * d if a.qk_norm else 0)
    cross = 4 * _linear(d, d) + (2 * d if a.qk_norm else 0)
    if a.has_image_branch:
        cross += 2 * _linear(d, d) + (d if a.qk_norm else 0)
    ffn = _linear(d, a.ffn_dim) + _linear(a.ffn_dim, d)
    return attn + cross + ffn + (_layer_norm(d) if a.cross_attn_norm else 0) + 6 * d


def count_params(a: WamArch) -> ParamCount:
    d = a.dim
    patch = a.in_dim * math.prod(a.patch) * d + d
    text = _linear(a.text_dim, d) + _linear(d, d)
    time = _linear(a.freq_dim, d) + _linear(d, d) + _linear(d, 6 * d)
    image = (_layer_norm(a.image_dim) + _linear(a.image_dim, a.image_dim) + _linear(a.image_dim, d)
             + _layer_norm(d)) if a.has_image_branch else 0
    head = _linear(d, math.prod(a.patch) * a.out_dim) + 2 * d
    state_enc = _linear(a.state_dim, a.head_hidden) + _linear(a.head_hidden, d)
    action_enc = _linear(a.action_dim, d) + _linear(2 * d, d) + _linear(d, d)
    action_dec = _linear(d, a.head_hidden) + _linear(a.head_hidden, a.action_dim)
    return ParamCount(
        embeddings=patch + text + time + image,
        blocks=a.num_layers * block_params(a),
        head=head,
        wam_heads=state_enc + action_enc + action_dec,
    )


def training_layout(a: WamArch, s: SampleShape) -> TokenLayout:
    return TokenLayout.teacher_forcing(s.num_chunks, s.frames_per_chunk, s.tokens_per_frame(a), s.actions_per_chunk)


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs (multiply-add = 2) of the trained model for one sample."""

    linear: int  # every matmul against a weight (incl. the patch-embedding convolution)
    self_attention: int  # QK^T and AV over the pairs the mask allows
    self_attention_dense: int  # the same if every pair were computed (what a dense kernel does)
    cross_attention: int
    tokens: int

    @property
    def forward(self) -> int:
        return self.linear + self.self_attention + self.cross_attention

    @property
    def training(self) -> int:
        """Forward + backward (2x forward) model FLOPs; activation recomputation is not counted (MFU convention)."""
        return 3 * self.forward


def count_flops(a: WamArch, s: SampleShape) -> FlopCount:
    return layout_flops(a, training_layout(a, s))


def layout_flops(a: WamArch, queries: TokenLayout, keys: TokenLayout | None = None, *,
                 conditioning: bool = True) -> FlopCount:
    """Forward FLOPs of the tokens of `queries` attending to `keys` (default: themselves). Training embeds the
    prompt (and image) and computes every block's cross-attention keys/values in the forward (`conditioning`);
    serving does that once per session and reads the context's self-attention keys from its KV cache."""
    keys = keys or queries
    d, n = a.dim, queries.length
    n_video = queries.count(TokenKind.FIRST, TokenKind.CLEAN, TokenKind.NOISY)
    n_noisy = queries.count(TokenKind.NOISY)
    n_action = queries.count(TokenKind.ACTION)
    n_state = queries.count(TokenKind.STATE)
    n_context = a.text_len + a.image_tokens

    linear = n_video * a.in_dim * math.prod(a.patch) * d  # patch embedding
    linear += len(queries.spans) * (a.freq_dim * d + d * d + 6 * d * d)  # time MLP runs once per span
    per_block = n * (4 * d * d + 2 * d * d + 2 * d * a.ffn_dim)  # self q,k,v,o; cross q,o; ffn
    if conditioning:
        linear += a.text_len * (a.text_dim * d + d * d)
        if a.has_image_branch:
            linear += a.image_tokens * (a.image_dim * a.image_dim + a.image_dim * d)
        per_block += n_context * 2 * d * d  # cross-attention k,v of the text (+ image) tokens
    linear += a.num_layers * per_block
    linear += n_noisy * d * math.prod(a.patch) * a.out_dim
    linear += n_state * (a.state_dim * a.head_hidden + a.head_hidden * d)
    linear += n_action * (a.action_dim * d + 2 * d * d + d * d + d * a.head_hidden + a.head_hidden * a.action_dim)
    linear *= 2

    attn = a.num_layers * 4 * d  # QK^T + AV, per attended pair
    return FlopCount(
        linear=linear,
        self_attention=attn * queries.allowed_pairs(keys),
        self_attention_dense=attn * n * keys.length,
        cross_attention=attn * n * n_context,
        tokens=n,
    )


def context_layout(a: WamArch, s: SampleShape, chunks: int) -> TokenLayout:
    """A serving KV cache's committed tokens before chunk `chunks` is predicted: the first frame and the observed
    chunks 0..chunks-1."""
    tpf = s.tokens_per_frame(a)
    layout = TokenLayout.first_frame(tpf, s.actions_per_chunk)
    for c in range(chunks):
        layout = layout + TokenLayout.clean_chunk(c, s.frames_per_chunk, tpf, s.actions_per_chunk)
    return layout


def prediction_flops(a: WamArch, s: SampleShape, chunk: int) -> FlopCount:
    """One denoising forward of chunk `chunk` for one cache row (WamModel.predict)."""
    queries = TokenLayout.prediction(range(chunk, chunk + 1), s.frames_per_chunk, s.tokens_per_frame(a),
                                     s.actions_per_chunk)
    return layout_flops(a, queries, context_layout(a, s, chunk) + queries, conditioning=False)


def observation_flops(a: WamArch, s: SampleShape, chunk: int) -> FlopCount:
    """Writing chunk `chunk`'s observed frames into one cache row (WamModel.observe)."""
    queries = TokenLayout.clean_chunk(chunk, s.frames_per_chunk, s.tokens_per_frame(a), s.actions_per_chunk)
    return layout_flops(a, queries, context_layout(a, s, chunk) + queries, conditioning=False)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory of FSDP2 training (fp32 master weights, grads and AdamW states fully sharded)."""

    sharded_states: float  # bytes
    gathered_params: float
    frozen_encoders: float
    activations: float

    @property
    def total(self) -> float:
        return self.sharded_states + self.gathered_params + self.frozen_encoders + self.activations


def estimate_memory(a: WamArch, s: SampleShape, gpus: int, *, batch_per_gpu: int = 1,
                    activation_checkpointing: bool = True, cached_text: bool = False) -> MemoryEstimate:
    """An estimate, not a measurement: fp32 states (param + grad + 2 AdamW moments = 16 B/param) sharded over
    `gpus`; bf16 all-gathered weights of two blocks in flight; frozen encoders in bf16 on every GPU; saved
    activations of ~(34*dim + 4*ffn) bytes per token per block (fp32 residual and modulation, bf16 matmul
    inputs), of which full activation checkpointing keeps only the fp32 block inputs plus one block's set."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    params = count_params(a)
    frozen = [a.vae, a.image_encoder] + ([] if cached_text else [a.text_encoder])
    frozen_bytes = 2 * sum(FROZEN_ENCODER_PARAMS.get(name, 0) for name in frozen)
    tokens = training_layout(a, s).length * batch_per_gpu
    per_block = tokens * (34 * a.dim + 4 * a.ffn_dim)
    if activation_checkpointing:
        activations = a.num_layers * tokens * 4 * a.dim + per_block
    else:
        activations = a.num_layers * per_block
    return MemoryEstimate(
        sharded_states=16 * params.total / gpus,
        gathered_params=2 * 2 * block_params(a),
        frozen_encoders=frozen_bytes,
        activations=activations,
    )


def min_gpus(a: WamArch, s: SampleShape, gpu_memory_gib: float, *, headroom: float = 0.9,
             **memory_kwargs) -> int | None:
    """Fewest GPUs whose estimated per-GPU memory fits `headroom` of `gpu_memory_gib`; None if none up to 4096
    (activations or frozen encoders alone do not fit one GPU)."""
    budget = headroom * gpu_memory_gib * GIB
    for gpus in (2**i for i in range(13)):
        if estimate_memory(a, s, gpus, **memory_kwargs).total <= budget:
            lo = gpus // 2 + 1 if gpus > 1 else 1
            return next(n for n in range(lo, gpus + 1) if estimate_memory(a, s, n, **memory_kwargs).total <= budget)
    return None
