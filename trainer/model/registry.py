"""Builds the torchtitan config tree of a WamModel from a preset's architecture.

Every Linear is declared here as a `Linear.Config` (with its initialiser), so torchtitan's converters
(float8 / MX quantization, LoRA) see and can replace each of them. Initialisation follows Wan2.1
(xavier-uniform linears, N(0, 0.02) text/time embeddings, zero output head, modulation ~ N(0, 1/dim))
and DreamZero for the action/state heads (N(0, 0.02) weights, zero biases).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torchtitan.models.common.linear import Linear

from wam.platform.presets import SampleShape, WamArch
from wam.trainer.model.attention import KERNELS, CrossAttention, SelfAttention
from wam.trainer.model.block import WanBlock
from wam.trainer.model.heads import ActionEncoder, ImageProjection, OutputHead, ReluMLP
from wam.trainer.model.layers import Conv3d, FP32RMSNorm
from wam.trainer.model.model import WamModel


def _xavier_flat(weight: torch.Tensor) -> None:
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))


_XAVIER = {"weight": nn.init.xavier_uniform_, "bias": nn.init.zeros_}
_NORMAL_02 = {"weight": partial(nn.init.normal_, std=0.02), "bias": nn.init.zeros_}
_ZERO = {"weight": nn.init.zeros_, "bias": nn.init.zeros_}


def _linear(n_in: int, n_out: int, init: dict = _XAVIER) -> Linear.Config:
    return Linear.Config(in_features=n_in, out_features=n_out, bias=True, param_init=init)


def _modulation_init(dim: int) -> dict:
    return {"modulation": partial(nn.init.normal_, std=dim**-0.5)}


def block_config(arch: WamArch, attention: str) -> WanBlock.Config:
    d = arch.dim
    if attention not in KERNELS:
        raise ValueError(f"unknown attention backend {attention!r}; choose one of {', '.join(KERNELS)}")

    def norm() -> FP32RMSNorm.Config:
        return FP32RMSNorm.Config(normalized_shape=d, eps=arch.eps)

    image = arch.has_image_branch
    return WanBlock.Config(
        dim=d,
        eps=arch.eps,
        cross_attn_norm=arch.cross_attn_norm,
        self_attn=SelfAttention.Config(
            num_heads=arch.num_heads, q=_linear(d, d), k=_linear(d, d), v=_linear(d, d), o=_linear(d, d),
            norm_q=norm(), norm_k=norm(), kernel=KERNELS[attention].Config(),
        ),
        cross_attn=CrossAttention.Config(
            num_heads=arch.num_heads, q=_linear(d, d), k=_linear(d, d), v=_linear(d, d), o=_linear(d, d),
            norm_q=norm(), norm_k=norm(),
            k_img=_linear(d, d) if image else None,
            v_img=_linear(d, d) if image else None,
            norm_k_img=norm() if image else None,
        ),
        ffn_in=_linear(d, arch.ffn_dim),
        ffn_out=_linear(arch.ffn_dim, d),
        param_init=_modulation_init(d),
    )


def model_config(arch: WamArch, sample: SampleShape, attention: str = "sdpa") -> WamModel.Config:
    arch.validate()
    d, h = arch.dim, arch.head_hidden
    patch_out = math.prod(arch.patch) * arch.out_dim
    return WamModel.Config(
        arch=arch,
        sample=sample,
        patch_embedding=Conv3d.Config(in_channels=arch.in_dim, out_channels=d, kernel_size=arch.patch,
                                      stride=arch.patch, param_init={"weight": _xavier_flat, "bias": nn.init.zeros_}),
        text_in=_linear(arch.text_dim, d, _NORMAL_02),
        text_out=_linear(d, d, _NORMAL_02),
        time_in=_linear(arch.freq_dim, d, _NORMAL_02),
        time_out=_linear(d, d, _NORMAL_02),
        time_projection=_linear(d, 6 * d),
        blocks=[block_config(arch, attention) for _ in range(arch.num_layers)],
        head=OutputHead.Config(dim=d, eps=arch.eps, head=_linear(d, patch_out, _ZERO), param_init=_modulation_init(d)),
        img_emb=ImageProjection.Config(image_dim=arch.image_dim, dim=d, fc1=_linear(arch.image_dim, arch.image_dim),
                                       fc2=_linear(arch.image_dim, d)) if arch.has_image_branch else None,
        state_encoder=ReluMLP.Config(layer1=_linear(arch.state_dim, h, _NORMAL_02), layer2=_linear(h, d, _NORMAL_02)),
        action_encoder=ActionEncoder.Config(dim=d, W1=_linear(arch.action_dim, d, _NORMAL_02),
                                            W2=_linear(2 * d, d, _NORMAL_02), W3=_linear(d, d, _NORMAL_02)),
        action_decoder=ReluMLP.Config(layer1=_linear(d, h, _NORMAL_02), layer2=_linear(h, arch.action_dim, _NORMAL_02)),
    )


def meta_model(config: WamModel.Config, dtype: torch.dtype = torch.float32) -> WamModel:
    """The model's structure on the meta device: every parameter's name, shape and dtype, no memory."""
    with torch.device("meta"):
        return config.build().to(dtype)


def build_model(config: WamModel.Config, device: torch.device | str = "cpu", seed: int = 0,
                dtype: torch.dtype = torch.float32) -> WamModel:
    """Meta-device construction, then materialise on `device` in `dtype` and initialise, as torchtitan's
    Trainer does (no full-size copy in another dtype is ever allocated)."""
    model = meta_model(config, dtype)
    model.verify_module_protocol()
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_states()
    return model
