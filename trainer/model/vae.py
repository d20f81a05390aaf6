"""The Wan video VAEs (frozen): causal 3D convolutions, 4x temporal compression with the first frame alone.

Wan2.1 (z = 16) compresses 8x in space. Wan2.2 (z = 48, Wan2.2-TI2V-5B) compresses 16x: it folds 2x2 pixel
patches into 12 input channels first, decodes with a wider decoder, and gives every stage a parameter-free
shortcut that moves space (and time) into channels, averaging on the way down and repeating on the way up.
Parameter names match the public `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth`.

Every temporal operation is causal, so the network is written as a stream: each call takes the next frames
and a `StreamState` that carries the few frames of history each causal convolution needs. Encoding a clip in
one call, or as Wan does (first frame alone, then groups of 4 frames), or frame group by frame group as a
robot observes them, gives the same latents; the chunked form bounds memory. Latents are normalised per
channel with the VAE's mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wam.platform.errors import ConfigError

# Per-channel latent statistics of Wan2.1_VAE.pth (z = 16).
WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# Per-channel latent statistics of Wan2.2_VAE.pth (z = 48).
WAN22_LATENT_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                     0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                     -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                     -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                     0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENT_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


@dataclass(frozen=True)
class VaeConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN21_LATENT_STD
    decoder_dim: int | None = None  # None: dim (Wan2.2's decoder is wider than its encoder)
    patch: int = 1  # pixels folded into channels before the encoder (Wan2.2: 2x2 -> 12 channels)
    residual: bool = False  # Wan2.2: stages with space-to-channel shortcuts

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return self.patch * 2 ** (len(self.dim_mult) - 1)

    @property
    def pixel_channels(self) -> int:
        return 3 * self.patch**2


VAE_CONFIGS = {
    "wan2.1": VaeConfig(),
    "wan2.2": VaeConfig(dim=160, decoder_dim=256, z_dim=48, latent_mean=WAN22_LATENT_MEAN,
                        latent_std=WAN22_LATENT_STD, patch=2, residual=True),
    "tiny": VaeConfig(dim=8, z_dim=4, latent_mean=(0.0,) * 4, latent_std=(1.0,) * 4),
    "tiny-wan2.2": VaeConfig(dim=8, decoder_dim=12, z_dim=8, latent_mean=(0.0,) * 8, latent_std=(1.0,) * 8,
                             patch=2, residual=True),
}


def vae_config(name: str) -> VaeConfig:
    if name not in VAE_CONFIGS:
        raise ConfigError(f"unknown VAE {name!r}; available: {', '.join(VAE_CONFIGS)}")
    return VAE_CONFIGS[name]


@dataclass
class StreamState:
    """History carried between calls of a streaming encoder/decoder, per module."""

    frames: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    started: set[nn.Module] = field(default_factory=set)


def stack_streams(states: list[StreamState]) -> StreamState:
    """Streams at the same point (each module's history kept by all or by none) as one stream of a batch, a row each
    in order. A causal convolution's history shorter than its kernel needs (after a stream's first frame) is
    zero-padded on the left: the convolution pads its input with the same zeros where it has no history."""
    first = states[0]
    if any(s.frames.keys() != first.frames.keys() or s.started != first.started for s in states):
        raise ValueError("streams at different points (one started, another not) cannot be encoded as one batch")
    frames = {}
    for module in first.frames:
        length = max(s.frames[module].shape[2] for s in states)
        frames[module] = torch.cat([F.pad(s.frames[module], (0, 0, 0, 0, length - s.frames[module].shape[2], 0))
                                    for s in states])
    return StreamState(frames, set(first.started))


def unstack_streams(batch: StreamState, states: list[StreamState]) -> None:
    """Each of `states` continued from its row of `batch` (the stream stack_streams made of them, since encoded)."""
    for row, state in enumerate(states):
        state.frames = {module: history[row:row + 1].clone() for module, history in batch.frames.items()}
        state.started = set(batch.started)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time (2 * padding_t frames on the left), symmetrically in space."""

    def __init__(self, in_ch: int, out_ch: int, kernel, stride=1, padding=0):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.history = 2 * pt
        self.spatial_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        left = self.history
        if self.history and state is not None:
            past = state.frames.get(self)
            if past is not None:
                x = torch.cat([past, x], dim=2)
                left -= past.shape[2]
            state.frames[self] = x[:, :, -self.history:]
        return super().forward(F.pad(x, self.spatial_pad + (left, 0)))


class RMSNorm(nn.Module):
    """Wan's channel RMS norm: L2-normalise over channels, times sqrt(C) and a learned gain `gamma`."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every frame of (B, C, T, H, W)."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class NearestUpsample(nn.Upsample):
    """2x nearest-exact upsampling computed in fp32 (bf16 nearest-exact is not supported everywhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


def _run(layers: nn.Sequential, x: torch.Tensor, state: StreamState) -> torch.Tensor:
    """Run layers in order, passing the stream state to those that keep temporal history."""
    for layer in layers:
        x = layer(x, state) if isinstance(layer, _STREAMING) else layer(x)
    return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        return _run(self.residual, x, state) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, H, W)
        n, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w).transpose(2, 3).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, 1, HW, C)
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        return x + _per_frame(self._attend, x)


class Resample(nn.Module):
    """Spatial 2x down/up-sampling, optionally with causal 2x temporal down/up-sampling.

    The first frame of a stream is never resampled in time (Wan encodes it alone): downsampling keeps it
    and then convolves each following pair with the frame before; upsampling passes it through and turns
    every later frame into two. Upsampling ends with `up_dim` channels (Wan2.1 halves them, Wan2.2 keeps them).
    """

    def __init__(self, dim: int, mode: str, up_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(NearestUpsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, up_dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, state)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, state)
        return x

    def _upsample_time(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        head = None
        if self not in state.started:
            state.started.add(self)
            head, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, state).view(b, 2, c, t, h, w)
            x = torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c, 2 * t, h, w)
        return x if head is None else torch.cat([head, x], dim=2)

    def _downsample_time(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        previous = state.frames.get(self)
        state.frames[self] = x[:, :, -1:]
        if previous is None:  # stream start: the first frame passes, later frames pair up with it
            return x if x.shape[2] < 3 else torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        return self.time_conv(torch.cat([previous, x], dim=2))


def _space_to_channels(x: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*ft*fs*fs, T/ft, H/fs, W/fs), channel-major; time is zero-padded on the left to a
    multiple of ft, so a stream's first frame is grouped alone."""
    x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % ft, 0))
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * ft * fs * fs, t // ft, h // fs, w // fs)


def _channels_to_space(x: torch.Tensor, out_dim: int, ft: int, fs: int) -> torch.Tensor:
    """Each channel repeated to fill out_dim*ft*fs*fs, then unfolded into time and space (inverse layout of above)."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out_dim * ft * fs * fs // c, dim=1)
    x = x.view(b, out_dim, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, out_dim, t * ft, h * fs, w * fs)


class DownStage(nn.Module):
    """A Wan2.2 encoder stage: its layers plus a shortcut that folds each 2x2 (x2 in time) block of its input
    into channels and averages groups of them down to the stage's width."""

    def __init__(self, layers: list[nn.Module], out_dim: int, ft: int, fs: int):
        super().__init__()
        self.downsamples = nn.Sequential(*layers)
        self.out_dim, self.ft, self.fs = out_dim, ft, fs

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        shortcut = _space_to_channels(x, self.ft, self.fs).unflatten(1, (self.out_dim, -1)).mean(2)
        return _run(self.downsamples, x, state) + shortcut


class UpStage(nn.Module):
    """A Wan2.2 decoder stage: its layers plus (when it upsamples) a shortcut that repeats channels and unfolds
    them into 2x2 (x2 in time); at a stream's start the extra leading frames are dropped, as upsampling keeps
    the first frame single."""

    def __init__(self, layers: list[nn.Module], out_dim: int, ft: int, fs: int):
        super().__init__()
        self.upsamples = nn.Sequential(*layers)
        self.out_dim, self.ft, self.fs = out_dim, ft, fs

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        out = _run(self.upsamples, x, state)
        if self.fs == 1:  # the last stage does not upsample and has no shortcut
            return out
        shortcut = _channels_to_space(x, self.out_dim, self.ft, self.fs)
        if self not in state.started:
            state.started.add(self)
            shortcut = shortcut[:, :, self.ft - 1:]
        return out + shortcut


_STREAMING = (CausalConv3d, ResidualBlock, AttentionBlock, Resample, DownStage, UpStage)


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p), Wan2.2's channel order (c, column offset, row offset)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def _unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, c // (p * p), t, h * p, w * p)


class Encoder3d(nn.Module):
    def __init__(self, cfg: VaeConfig):
        super().__init__()
        dims = [cfg.dim * u for u in (1,) + cfg.dim_mult]
        self.conv1 = CausalConv3d(cfg.pixel_channels, dims[0], 3, padding=1)
        stages: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                       for j in range(cfg.num_res_blocks)]
            down = i != len(cfg.dim_mult) - 1
            temporal = down and cfg.temporal_downsample[i]
            if down:
                layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
            stages += [DownStage(layers, out_dim, 2 if temporal else 1, 2 if down else 1)] if cfg.residual else layers
        self.downsamples = nn.Sequential(*stages)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim))
        self.head = nn.Sequential(RMSNorm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        x = self.conv1(x, state)
        for stage in (self.downsamples, self.middle, self.head):
            x = _run(stage, x, state)
        return x


class Decoder3d(nn.Module):
    def __init__(self, cfg: VaeConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [(cfg.decoder_dim or cfg.dim) * u for u in (mult[-1],) + tuple(reversed(mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        stages: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0 and not cfg.residual:
                in_dim //= 2  # Wan2.1's upsampling halved the channels
            layers: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                       for j in range(cfg.num_res_blocks + 1)]
            up = i != len(mult) - 1
            temporal = up and temporal_upsample[i]
            if up:
                layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d",
                                       out_dim if cfg.residual else out_dim // 2))
            stages += [UpStage(layers, out_dim, 2 if temporal else 1, 2 if up else 1)] if cfg.residual else layers
        self.upsamples = nn.Sequential(*stages)
        self.head = nn.Sequential(RMSNorm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, cfg.pixel_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        x = self.conv1(x, state)
        for stage in (self.middle, self.upsamples, self.head):
            x = _run(stage, x, state)
        return x


class WanVAE(nn.Module):
    """Frozen video VAE. Pixels in [-1, 1] (B, 3, T, H, W) <-> normalised latents (B, z, 1 + (T-1)/4, H/s, W/s),
    s the spatial stride (8 for Wan2.1, 16 for Wan2.2)."""

    def __init__(self, cfg: VaeConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        self.register_buffer("latent_mean", torch.tensor(cfg.latent_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latent_std", torch.tensor(cfg.latent_std).view(1, -1, 1, 1, 1), persistent=False)

    def _check_pixels(self, video: torch.Tensor, first_call: bool) -> None:
        s = self.cfg.spatial_stride
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video (B, 3, T, H, W), got {tuple(video.shape)}")
        if video.shape[-1] % s or video.shape[-2] % s:
            raise ValueError(f"frame size {video.shape[-2]}x{video.shape[-1]} must be a multiple of {s}")
        t = video.shape[2] - (1 if first_call else 0)
        if t % self.cfg.temporal_stride:
            expected = f"1 + {self.cfg.temporal_stride}k" if first_call else f"a multiple of {self.cfg.temporal_stride}"
            raise ValueError(f"got {video.shape[2]} frames; a stream takes {expected} frames per call")

    def encode_stream(self, video: torch.Tensor, state: StreamState) -> torch.Tensor:
        """Encode the next frames of a stream: 1 + 4k frames on the first call, 4k afterwards."""
        self._check_pixels(video, first_call=not state.frames)
        pixels = _patchify(video.to(self.conv1.weight.dtype), self.cfg.patch)
        mu = self.conv1(self.encoder(pixels, state)).chunk(2, dim=1)[0]
        return ((mu.float() - self.latent_mean) / self.latent_std)

    def encode(self, video: torch.Tensor, frames_per_call: int = 4) -> torch.Tensor:
        """Encode a whole clip (1 + 4k frames): first frame alone, then `frames_per_call` frames at a time."""
        state = StreamState()
        parts = [self.encode_stream(video[:, :, :1], state)]
        for start in range(1, video.shape[2], frames_per_call):
            parts.append(self.encode_stream(video[:, :, start:start + frames_per_call], state))
        return torch.cat(parts, dim=2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, z, T, h, w) -> pixels in [-1, 1] (B, 3, 1 + 4(T-1), sh, sw), one latent frame at a time."""
        state = StreamState()
        z = latents.float() * self.latent_std + self.latent_mean
        z = self.conv2(z.to(self.conv2.weight.dtype))
        frames = [self.decoder(z[:, :, i:i + 1], state) for i in range(z.shape[2])]
        return _unpatchify(torch.cat(frames, dim=2), self.cfg.patch).float().clamp(-1, 1)
