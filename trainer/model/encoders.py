"""The frozen encoders a WAM conditions on, built together from a preset: VAE, umT5 text, CLIP image.

Each loads from a local path or fsspec URI; with no path, the tiny preset's encoders get random weights
from a seed (tests and demos); the real presets refuse to run without weights. `encode_clip` is the one
way frames become what the DiT sees (VAE latents, CLIP tokens of the first frame, I2V channels): the
training step, evaluation and the policy server all call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wam.platform.config import EncodersSection, WamConfig, resolve_preset
from wam.platform.errors import ConfigError
from wam.platform.presets import WamArch
from wam.trainer.model.clip import ClipImageEncoder, clip_config
from wam.trainer.model.text_encoder import TextEncoder, load_text_encoder
from wam.trainer.model.vae import StreamState, WanVAE, vae_config
from wam.trainer.model.weights import load_frozen


def _random_or_load(build, name: str, path: str | None, seed: int, prefix: str = "",
                    part: str = "") -> torch.nn.Module:
    """The module with its published weights (checkpoint keys under `prefix` into submodule `part`), or
    (tiny only) PyTorch's default init from `seed`."""
    if path is None and not name.startswith("tiny"):
        raise ConfigError(f"the {name} encoder needs its published weights: set its path")
    torch.manual_seed(seed)
    module = build()
    if path is not None:
        load_frozen(module.get_submodule(part), path, prefix)
    return module.eval().requires_grad_(False)


@dataclass
class EncodedClip:
    latents: torch.Tensor  # (B, z, T', h, w) VAE latents of the frames
    image: torch.Tensor | None  # (B, image_tokens, image_dim) CLIP tokens of the first frame (models with a CLIP branch)
    i2v: torch.Tensor | None  # (B, 4 + z, i2v_frames, h, w) Wan2.1-I2V channels of the first frame (I2V models)


@dataclass
class FrozenEncoders:
    vae: WanVAE | None
    text: TextEncoder
    image: ClipImageEncoder | None
    i2v_concat: bool = False  # the model takes Wan2.1-I2V channels

    @classmethod
    def of_config(cls, cfg: WamConfig, device: torch.device | str = "cpu", vision: bool = True) -> FrozenEncoders:
        """The encoders a run trains (or was trained) with: its preset's, from its `encoders` paths and seed, in
        bfloat16 on GPUs and float32 on CPUs, as training's forward runs."""
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return cls.build(resolve_preset(cfg).arch, cfg.encoders, cfg.seed, device, dtype, vision)

    @classmethod
    def build(cls, arch: WamArch, paths: EncodersSection = EncodersSection(), seed: int = 0,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              vision: bool = True) -> FrozenEncoders:
        """The text encoder, and with `vision` the VAE and (for I2V models) CLIP, all frozen."""
        text = load_text_encoder(arch.text_encoder, arch.text_len, paths.text, paths.tokenizer, seed=seed + 1)
        if text.model.config.d_model != arch.text_dim:
            raise ConfigError(f"text encoder width {text.model.config.d_model} != model.text_dim {arch.text_dim}")
        vae = image = None
        if vision:
            vae_cfg = vae_config(arch.vae)
            if vae_cfg.z_dim != arch.latent_channels:
                raise ConfigError(f"VAE {arch.vae} has {vae_cfg.z_dim} latent channels, the model expects "
                                  f"{arch.latent_channels}")
            vae = _random_or_load(lambda: WanVAE(vae_cfg), arch.vae, paths.vae, seed)
        if vision and arch.has_image_branch:
            cfg = clip_config(arch.image_encoder)
            if (cfg.num_tokens, cfg.dim) != (arch.image_tokens, arch.image_dim):
                raise ConfigError(f"image encoder {arch.image_encoder} gives {cfg.num_tokens} tokens of width "
                                  f"{cfg.dim}; the model expects {arch.image_tokens} x {arch.image_dim}")
            image = _random_or_load(lambda: ClipImageEncoder(cfg), arch.image_encoder, paths.image, seed + 2,
                                    prefix="visual.", part="visual")
        encoders = cls(vae, text, image, arch.i2v_concat)
        for module in (vae, text, image):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return encoders

    def unit_range(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> [-1, 1] on the vision encoders' device and in their dtype, what the VAE and CLIP take."""
        weight = next(self.vae.parameters())
        return pixels.to(weight.device, weight.dtype) / 127.5 - 1

    @torch.no_grad()
    def encode_clip(self, pixels: torch.Tensor, *, stream: StreamState | None = None,
                    i2v_frames: int | None = None) -> EncodedClip:
        """uint8 frames (B, 3, T, H, W) -> what the DiT is conditioned on. With `stream` the VAE continues a causal
        stream (a robot's frames arriving chunk by chunk); the I2V channels span `i2v_frames` latent frames
        (default: the clip's)."""
        frames = self.unit_range(pixels)
        latents = self.vae.encode(frames) if stream is None else self.vae.encode_stream(frames, stream)
        first = frames[:, :, 0]
        image = self.image(first) if self.image is not None else None
        i2v = self.i2v_condition(first, i2v_frames or latents.shape[2]) if self.i2v_concat else None
        return EncodedClip(latents, image, i2v)

    @torch.no_grad()
    def i2v_condition(self, first_frame: torch.Tensor, latent_frames: int) -> torch.Tensor:
        """Wan2.1-I2V channels for a clip of `latent_frames`: 4 mask channels (1 on latent frame 0) and the
        latents of [first frame, black frames...]. first_frame (B, 3, H, W) in [-1, 1] -> (B, 4 + z, T, h, w)."""
        stride = self.vae.cfg.temporal_stride
        pixels = 1 + stride * (latent_frames - 1)
        video = torch.zeros(first_frame.shape[0], 3, pixels, *first_frame.shape[-2:], device=first_frame.device,
                            dtype=first_frame.dtype)
        video[:, :, 0] = first_frame
        latents = self.vae.encode(video)
        mask = torch.zeros(latents.shape[0], stride, *latents.shape[2:], device=latents.device)
        mask[:, :, 0] = 1
        return torch.cat([mask, latents], dim=1)
