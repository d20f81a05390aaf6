"""Model presets: the architecture of every World Action Model the platform knows, torch-free.

The operator (capacity checks), the CLI (`wam model info`) and the trainer (which builds the torchtitan
model config from these numbers) all read the same `WamArch`, so a preset is defined exactly once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from wam.platform.errors import ConfigError


@dataclass(frozen=True)
class VaeLayout:
    """How a frozen VAE maps pixels to latents (its network lives in wam.trainer.model.vae, checked against this)."""

    latent_channels: int
    spatial_stride: int
    temporal_stride: int = 4  # 1 + 4k frames -> 1 + k latent frames: the first frame is encoded alone


VAE_LAYOUTS = {
    "wan2.1": VaeLayout(latent_channels=16, spatial_stride=8),
    "wan2.2": VaeLayout(latent_channels=48, spatial_stride=16),  # Wan2.2-TI2V-5B
    "tiny": VaeLayout(latent_channels=4, spatial_stride=8),
    "tiny-wan2.2": VaeLayout(latent_channels=8, spatial_stride=16),
}


@dataclass(frozen=True)
class SampleShape:
    """Shape of one training sample in latent space (DreamZero: 4 chunks of 2 latent frames + 24 actions)."""

    num_chunks: int = 4
    frames_per_chunk: int = 2  # latent frames; 8 raw frames at 5 fps with the 4x temporal VAE
    actions_per_chunk: int = 24  # 24 at 15 Hz (DROID), 48 at 30 Hz (AgiBot)
    latent_height: int = 44  # 352 px canvas / 8 (Wan2.1 VAE)
    latent_width: int = 80  # 640 px canvas / 8

    def validate(self, arch: WamArch) -> None:
        for name in ("num_chunks", "frames_per_chunk", "actions_per_chunk", "latent_height", "latent_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sample.{name} must be >= 1, got {getattr(self, name)}")
        _, ph, pw = arch.patch
        s = arch.vae_layout.spatial_stride
        if self.latent_height % ph or self.latent_width % pw:
            raise ConfigError(
                f"sample latent size {self.latent_height}x{self.latent_width} is not divisible by the patch "
                f"size {ph}x{pw}: choose a canvas whose size is a multiple of {s * ph}x{s * pw} pixels"
            )

    @property
    def window_frames(self) -> int:
        """Latent frames of a whole context window: the first frame, then every chunk's."""
        return 1 + self.num_chunks * self.frames_per_chunk

    def canvas(self, arch: WamArch) -> tuple[int, int]:
        """Height and width in pixels of the frames that encode to this latent size."""
        s = arch.vae_layout.spatial_stride
        return self.latent_height * s, self.latent_width * s

    def tokens_per_frame(self, arch: WamArch) -> int:
        _, ph, pw = arch.patch
        return (self.latent_height // ph) * (self.latent_width // pw)


@dataclass(frozen=True)
class WamArch:
    """Architecture of the trained DiT (Wan2.1 backbone + DreamZero action/state heads)."""

    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    freq_dim: int = 256  # sinusoidal timestep embedding width
    text_dim: int = 4096  # umT5-XXL hidden size
    text_len: int = 512
    latent_channels: int = 16  # VAE z channels
    patch: tuple[int, int, int] = (1, 2, 2)
    # Wan2.1-I2V conditioning: 4 mask channels + first-frame latent concatenated to every video frame.
    i2v_concat: bool = True
    # CLIP image tokens through k_img/v_img in cross-attention; 0 means text-only (T2V) cross-attention.
    image_tokens: int = 257
    image_dim: int = 1280
    action_dim: int = 32  # actions padded to this many dims
    state_dim: int = 64  # state padded to this many dims
    head_hidden: int = 1024  # hidden width of the state encoder / action decoder MLPs
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # Frozen components, by name (their architectures live with their loaders in wam.trainer.model).
    vae: str = "wan2.1"
    text_encoder: str = "umt5-xxl"
    image_encoder: str = "clip-vit-h-14"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def in_dim(self) -> int:
        """Channels entering the patch embedding: noisy latent (+ mask + first-frame latent for I2V)."""
        return self.latent_channels + (4 + self.latent_channels if self.i2v_concat else 0)

    @property
    def out_dim(self) -> int:
        return self.latent_channels

    @property
    def has_image_branch(self) -> bool:
        return self.image_tokens > 0

    @property
    def vae_layout(self) -> VaeLayout:
        return VAE_LAYOUTS[self.vae]

    def validate(self) -> None:
        positive = ("dim", "num_layers", "num_heads", "ffn_dim", "freq_dim", "text_dim", "text_len",
                    "latent_channels", "action_dim", "state_dim", "head_hidden")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            divisors = [h for h in range(1, self.dim + 1) if self.dim % h == 0 and (self.dim // h) % 2 == 0]
            raise ConfigError(
                f"model.dim ({self.dim}) is not divisible by model.num_heads ({self.num_heads}); "
                f"pick num_heads from {divisors[-8:]} or change dim"
            )
        # 3D RoPE splits the head's complex pairs into time/height/width parts; each needs at least one pair.
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(
                f"head dim dim/num_heads = {self.head_dim} must be even and >= 6 for 3D RoPE; "
                f"change model.dim or model.num_heads"
            )
        if self.freq_dim % 2:
            raise ConfigError(f"model.freq_dim must be even, got {self.freq_dim}")
        if self.dim % 2:
            raise ConfigError(f"model.dim must be even (action timestep sinusoid), got {self.dim}")
        if self.image_tokens < 0:
            raise ConfigError(f"model.image_tokens must be >= 0 (0 = text-only cross-attention), got {self.image_tokens}")
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ConfigError(f"model.patch must be three positive ints (t, h, w), got {self.patch}")
        if self.vae not in VAE_LAYOUTS:
            raise ConfigError(f"model.vae {self.vae!r} is not a known VAE; choose one of: {', '.join(VAE_LAYOUTS)}")
        if self.latent_channels != self.vae_layout.latent_channels:
            raise ConfigError(f"model.latent_channels ({self.latent_channels}) differs from the {self.vae} VAE's "
                              f"{self.vae_layout.latent_channels} latent channels; change one of them")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    arch: WamArch
    sample: SampleShape = field(default_factory=SampleShape)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            description="CPU tests and demos: seconds per step, every code path of the 14B model",
            arch=WamArch(
                dim=64, num_layers=2, num_heads=4, ffn_dim=128, freq_dim=32, text_dim=32, text_len=32,
                latent_channels=4, image_tokens=5, image_dim=32, head_hidden=32,
                vae="tiny", text_encoder="tiny", image_encoder="tiny",
            ),
            sample=SampleShape(num_chunks=4, frames_per_chunk=2, actions_per_chunk=8,
                               latent_height=8, latent_width=8),
        ),
        Preset(
            name="tiny-5b",
            description="CPU tests and demos: every code path of dreamzero-5b (Wan2.2 VAE layout, 16x spatial)",
            arch=WamArch(
                dim=64, num_layers=2, num_heads=4, ffn_dim=128, freq_dim=32, text_dim=32, text_len=32,
                latent_channels=8, i2v_concat=False, image_tokens=5, image_dim=32, head_hidden=32,
                vae="tiny-wan2.2", text_encoder="tiny", image_encoder="tiny",
            ),
            sample=SampleShape(num_chunks=4, frames_per_chunk=2, actions_per_chunk=8,
                               latent_height=4, latent_width=4),
        ),
        Preset(
            name="wan2.1-1.3b",
            description="Wan2.1 T2V-1.3B backbone (text-only cross-attention, no I2V channels)",
            arch=WamArch(dim=1536, num_layers=30, num_heads=12, ffn_dim=8960, i2v_concat=False,
                         image_tokens=0, image_encoder="none"),
        ),
        Preset(
            name="dreamzero-5b",
            description="DreamZero on Wan2.2-TI2V-5B (z=48 VAE, 16x spatial; CLIP branch initialised fresh)",
            arch=WamArch(dim=3072, num_layers=30, num_heads=24, ffn_dim=14336, latent_channels=48,
                         i2v_concat=False, vae="wan2.2"),
            sample=SampleShape(latent_height=22, latent_width=40),  # the 14B's 352x640 canvas, 16x compressed
        ),
        Preset(
            name="dreamzero-14b",
            description="DreamZero on Wan2.1-I2V-14B (the paper's model)",
            arch=WamArch(dim=5120, num_layers=40, num_heads=40, ffn_dim=13824),
        ),
    )
}


def get_preset(name: str, **overrides) -> Preset:
    """The named preset with architecture fields replaced by `overrides`, validated."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    arch_fields = {f.name for f in dataclasses.fields(WamArch)}
    unknown = sorted(set(overrides) - arch_fields)
    if unknown:
        raise ConfigError(f"unknown model field(s) {unknown}; valid fields: {sorted(arch_fields)}")
    arch = dataclasses.replace(preset.arch, **overrides)
    arch.validate()
    return dataclasses.replace(preset, arch=arch)
