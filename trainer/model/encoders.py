"""The frozen encoders a WAM conditions on, built together from a preset: VAE, umT5 text, CLIP image.

Each loads from a local path or fsspec URI; with no path, the tiny preset's encoders get random weights
from a seed (tests and demos); the real presets refuse to run without weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wam.platform.errors import ConfigError
from wam.platform.presets import WamArch
from wam.trainer.model.clip import ClipImageEncoder, clip_config
from wam.trainer.model.text_encoder import TextEncoder, load_text_encoder
from wam.trainer.model.vae import WanVAE, vae_config
from wam.trainer.model.weights import load_frozen


@dataclass(frozen=True)
class EncoderPaths:
    vae: str | None = None  # Wan2.1_VAE.pth
    text: str | None = None  # HF umT5 folder or models_t5_umt5-xxl-enc-bf16.pth
    tokenizer: str | None = None  # umT5 tokenizer folder (defaults to the text weights' folder)
    image: str | None = None  # models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth (its visual.* part)


def _random_or_load(build, name: str, path: str | None, seed: int, prefix: str = "",
                    part: str = "") -> torch.nn.Module:
    """The module with its published weights (checkpoint keys under `prefix` into submodule `part`), or
    (tiny only) PyTorch's default init from `seed`."""
    if path is None and name != "tiny":
        raise ConfigError(f"the {name} encoder needs its published weights: set its path")
    torch.manual_seed(seed)
    module = build()
    if path is not None:
        load_frozen(module.get_submodule(part), path, prefix)
    return module.eval().requires_grad_(False)


@dataclass
class FrozenEncoders:
    vae: WanVAE | None
    text: TextEncoder
    image: ClipImageEncoder | None

    @classmethod
    def build(cls, arch: WamArch, paths: EncoderPaths = EncoderPaths(), seed: int = 0,
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
        encoders = cls(vae, text, image)
        for module in (vae, text, image):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return encoders

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
