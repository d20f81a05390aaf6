"""The one YAML schema of the platform (omegaconf structured config).

The same file runs `wam` locally and inside a pod; a TrainJob embeds overrides of it. Unknown keys and
wrong types are errors that name the key and the file.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wam.platform import plan
from wam.platform.accounting import GIB, estimate_memory, min_gpus
from wam.platform.checkpoints import run_series
from wam.platform.embodiment import ProfileSection, resolve_profile
from wam.platform.errors import ConfigError, yaml_position
from wam.platform.presets import Preset, WamArch, get_preset

ATTENTION_BACKENDS = ("sdpa", "flex", "triton")
NOISE_SCHEDULES = ("coupled", "flash")
SOLVERS = ("euler", "unipc")
DIT_CACHES = ("none", "static", "dynamic")
LOSS_WEIGHTINGS = ("uniform", "bell")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
PRECISIONS = ("auto", "bfloat16", "float32")
DATA_SOURCES = ("synthetic", "lerobot")
DECODERS = ("auto", "torchcodec", "pyav", "dali")
BAD_SAMPLE_POLICIES = ("error", "skip")
LAUNCHERS = ("torchrun", "ray")
COMPILE_MODES = ("auto", "on", "off")
PROTOCOLS = ("openpi", "roboarena")  # what a policy server speaks to its robots
# The served matmuls: FP4 on Blackwell, FP8 (rowwise-scaled activations and weights) on Hopper, else the NVFP4
# weights dequantized once (bf16 on other GPUs, fp32 on CPU). auto picks by the device's compute capability.
COMPUTE_PATHS = ("auto", "nvfp4", "fp8", "bf16-dequantized", "fp32-dequantized")


@dataclass
class ModelSection:
    preset: str = "tiny"
    # sdpa (dense mask; runs everywhere) | flex (flex_attention, block-sparse BlockMask; GPU training) |
    # triton (the platform's block-sparse Triton kernels; GPU training)
    attention: str = "sdpa"
    # Architecture overrides of the preset; None keeps the preset's value.
    dim: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    ffn_dim: int | None = None


@dataclass
class SampleSection:
    """Latent shape of one training sample; None keeps the preset's default."""

    num_chunks: int | None = None
    frames_per_chunk: int | None = None
    actions_per_chunk: int | None = None
    latent_height: int | None = None
    latent_width: int | None = None


@dataclass
class FlowSection:
    shift: float = 5.0  # sigma' = shift*sigma / (1 + (shift-1)*sigma)
    schedule: str = "coupled"  # coupled: video and action share t per chunk; flash: DreamZero-Flash
    flash_video_beta: tuple[float, float] = (7.0, 1.0)  # flash: video noise level ~ Beta(a, b), mean a/(a+b)
    loss_weighting: str = "bell"  # bell: DreamZero's exp(-2((t-500)/1000)^2) weighting; uniform: none
    # Classifier-free guidance needs an unconditional branch: each sample's prompt is replaced by
    # dropout_prompt with this probability (drawn from (seed, step, rank) like all training randomness).
    prompt_dropout: float = 0.0
    dropout_prompt: str = ""  # the empty prompt, as Wan trains its unconditional branch
    video_loss_weight: float = 1.0
    action_loss_weight: float = 1.0


@dataclass
class SamplerSection:
    solver: str = "euler"  # euler | unipc: FlowUniPC multistep (order 2), as Wan2.1 and DreamZero sample
    steps: int = 4  # denoising steps per chunk (1 works for Flash-trained checkpoints)
    shift: float = 5.0
    video_final_sigma: float = 0.0  # stop video denoising early (actions always go to 0)
    # Classifier-free guidance: v = v_uncond + scale (v_cond - v_uncond); 1 = the conditional pass only.
    guidance: float = 1.0  # on video (DreamZero serves 5.0)
    action_guidance: float = 1.0  # on actions, separately (DreamZero: none)
    negative_prompt: str | None = None  # the unconditional pass's prompt; default flow.dropout_prompt if trained with dropout
    guidance_batch: bool = True  # both passes as one forward of batch 2B (else two forwards of batch B)
    # DiT step cache: the transformer runs on some steps only, the others reuse the last velocity.
    dit_cache: str = "none"  # none | static (the steps below) | dynamic (skip while velocities barely change)
    dit_passes: int = 8  # static: transformer passes per chunk (DreamZero's tables at 16 steps; else evenly spaced)
    dit_steps: list[int] = field(default_factory=list)  # static: exactly these steps run (must start with 0)


# DreamZero's released server (socket_test_optimized_AR.py with its action head's defaults); its negative
# prompt is the one its data transform gives every sample.
DREAMZERO_NEGATIVE_PROMPT = (
    "Vibrant colors, overexposed, static, blurry details, text, subtitles, style, artwork, painting, image, still, "
    "grayscale, dull, worst quality, low quality, JPEG artifacts, ugly, mutilated, extra fingers, bad hands, bad face, "
    "deformed, disfigured, mutated limbs, fused fingers, stagnant image, cluttered background, three legs, many people "
    "in the background, walking backwards.")
SAMPLER_PRESETS = {
    "dreamzero": {"solver": "unipc", "steps": 16, "shift": 5.0, "video_final_sigma": 0.0, "guidance": 5.0,
                  "action_guidance": 1.0, "negative_prompt": DREAMZERO_NEGATIVE_PROMPT, "dit_cache": "static",
                  "dit_passes": 8, "dit_steps": []},
}


def sampler_preset(sampler: SamplerSection, name: str, key: str = "serving.sampler") -> SamplerSection:
    """`sampler` with a preset's settings in place of its own (`key` names the setting, for the message)."""
    if name not in SAMPLER_PRESETS:
        raise ConfigError(f"{key} = {name!r} is not a sampler preset; choose {', '.join(SAMPLER_PRESETS)}")
    return dataclasses.replace(sampler, **SAMPLER_PRESETS[name])


def served_sampler(cfg: WamConfig, preset: str | None = None, steps: int | None = None) -> SamplerSection:
    """The sampler a server runs: `preset` (else serving.sampler) in place of the sampler section, with `steps`
    (else serving.steps, unless a preset was named here) refining it; validated against the flow it trained."""
    name = preset or cfg.serving.sampler
    key = "--sampler" if preset else "serving.sampler"
    served = sampler_preset(cfg.sampler, name, key) if name else cfg.sampler
    served = dataclasses.replace(served, steps=steps or (None if preset else cfg.serving.steps) or served.steps)
    validate_sampler(served, cfg.flow, key if name else "sampler")
    return served


# Modules kept in bf16 by NVFP4 quantization (fnmatch patterns on module names): the patch embedding, norms,
# time/text embeddings, the WAM's action/state heads and the output head. Biases and 1D parameters always are.
DEFAULT_KEEP_BF16 = ("patch_embedding", "text_embedding.*", "time_embedding.*", "time_projection.*", "*norm*",
                     "head.*", "state_encoder.*", "action_encoder.*", "action_decoder.*")


@dataclass
class QuantizationSection:
    keep: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_BF16))
    shard_mb: int = 1024  # output safetensors shards; the quantizer holds about one shard + one tensor


@dataclass
class ServingSection:
    sampler: str | None = None  # a sampler preset served in place of the sampler section: dreamzero
    steps: int | None = None  # denoising steps per chunk; default sampler.steps (1 suits Flash checkpoints)
    # every embodiment the model was trained on with actions is served, each at /<name>; this one also at /
    embodiment: str | None = None  # (a data.datasets profile); default the first
    smoothing_window: int = 7  # Savitzky-Golay window over the 2x-upsampled chunk (odd; 0 = no smoothing)
    smoothing_order: int = 3
    # The safety envelope (wam.trainer.serve.safety), where the embodiment profile declares no explicit limits:
    action_margin: float = 0.25  # actions stay within the training range widened by this many spans per side
    step_margin: float = 1.0  # a step may change an action by the data's 99th-percentile step x (1 + this)
    state_margin: float = 1.0  # a state beyond the training range widened by this many spans is refused
    max_sessions: int = 16  # concurrent robot connections per server (fewer where they do not fit in memory)
    # for the sessions (KV caches, VAE streams, a batch's and a request's work); default on a GPU: 90% of what is
    # free once the model is loaded (the CPU: not counted); a robot beyond what fits is refused as at capacity
    session_memory_gib: float | None = None
    max_request_mb: float = 64.0  # larger requests are refused while being read
    idle_timeout_s: float = 300.0  # a session that sends nothing for this long is closed (its slot freed)
    # every session's requests and replies (camera frames included) written to this folder or fsspec URI, off the
    # robots' path (wam.trainer.serve.recorder); `wam rerun` serves a recorded session again. None: not recorded
    record: str | None = None
    drain_timeout_s: float = 30.0  # on SIGTERM: how long requests in flight get to be answered before the server
    # closes every session (1001, going away) and exits; the serving pod's grace period is this + 15 s
    # The engine (wam.trainer.serve.engine): every session's chunk is denoised step by step in a shared forward.
    max_batch: int = 8  # chunks of different sessions in one forward (continuous batching); 1 = one at a time
    compile: str = "auto"  # auto (on CUDA) | on | off: the step under torch.compile (CUDA graphs on CUDA), warmed up
    compute: str = "auto"  # matmuls: auto (by compute capability) | nvfp4 | fp8 | bf16-dequantized | fp32-dequantized
    devices: int = 1  # 2: guidance in parallel, the unconditional pass on a second process and device (GPU 1)
    cpu_threads: int | None = None  # an engine on the CPU: torch's threads; default: the faster of 1 and torch's own
    # default (every core), measured at start (with several threads running torch's ops, a small model is fastest on 1)
    # openpi (openpi-client, DreamZero's closed loop) | roboarena (RoboArena's DROID evaluation client: one frame a
    # call; wam.trainer.serve.roboarena)
    protocol: str = "openpi"

    def __post_init__(self) -> None:
        # YAML reads a bare on/off as a boolean, which the string field receives as "True"/"False"
        self.compile = {"True": "on", "False": "off"}.get(self.compile, self.compile)


@dataclass
class EncodersSection:
    """Frozen encoder weights (local paths or fsspec URIs); the tiny preset needs none."""

    vae: str | None = None  # Wan2.1_VAE.pth
    text: str | None = None  # HF umT5 folder or models_t5_umt5-xxl-enc-bf16.pth
    tokenizer: str | None = None  # umT5 tokenizer folder (defaults to the text weights' folder)
    image: str | None = None  # models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth (its visual.* part)


@dataclass
class DatasetEntry:
    uri: str = MISSING  # a LeRobot v2.1 / v3.0 dataset: local path or fsspec URI
    profile: str = "droid"  # embodiment profile: built in (droid, agibot) or declared under data.profiles
    weight: float = 1.0  # share of the samples drawn from this dataset


@dataclass
class DataSection:
    source: str = "synthetic"  # synthetic: procedural latents | lerobot: the datasets below
    datasets: list[DatasetEntry] = field(default_factory=list)
    profiles: dict[str, ProfileSection] = field(default_factory=dict)
    decoder: str = "auto"  # auto: DALI on GPUs, torchcodec on CPU, PyAV if torchcodec cannot load
    workers: int = 2  # decoding processes per training process
    bad_samples: str = "error"  # error: stop naming the episode and file | skip: drop, count, warn
    crop_scale: float = 1.0  # random crop keeping this share of each view's side (augmentation); 1 = none
    epoch_samples: int | None = None  # lerobot: samples per epoch (default: one per window of the data)
    packing: bool = False  # windows of min_chunks..K chunks, packed into one sequence per micro-batch: no padding
    min_chunks: int = 1  # packing: the fewest chunks a window may hold (episode ends, short episodes)
    episodes: int = 64  # synthetic: distinct episodes per epoch
    video_only_fraction: float = 0.0  # synthetic: share of episodes without actions (video loss only)
    delay_s: float = 0.0  # seconds slept before each batch: a deliberately slow data path (regression checks)


@dataclass
class TrainingSection:
    steps: int = 40
    batch_size: int = 2  # samples per process per micro-batch
    grad_accumulation: int = 1
    lr: float = 1e-4
    warmup_steps: int = 5
    lr_decay: str = "cosine"  # linear | sqrt | cosine, after warmup
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.95, 0.999)  # DreamZero's AdamW
    max_grad_norm: float = 1.0
    precision: str = "auto"  # parameter dtype in the forward: auto = bfloat16 on GPU, float32 on CPU
    activation_checkpointing: str = "none"  # none | full | selective, per DiT block
    compile: bool = False  # torch.compile each DiT block
    processes: int = 2  # processes per node (`wam train` runs them with training.launcher)
    launcher: str = "torchrun"  # torchrun | ray (Ray Train: one worker per process, restarted on failure)
    max_failures: int = 3  # ray: worker-group restarts from the newest complete checkpoint before failing
    nodes: int = 1
    dp_replicate: int = 1  # HSDP: replicas of the sharded model (shards per replica = world / dp_replicate)
    log_every: int = 1


@dataclass
class CheckpointSection:
    uri: str | None = None  # local path or fsspec URI (s3://...); default: <run dir>/checkpoints
    interval: int = 10  # steps between checkpoints (the last step is always saved)
    keep: int = 3  # complete checkpoints kept (0 = all)
    async_save: bool = True
    init_weights: str | None = None  # safetensors from `wam model import`, used when no checkpoint exists


@dataclass
class TrackingSection:
    uri: str | None = None  # MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite in the run dir
    experiment: str = "wam"
    registered_model: str | None = None  # default wam-<run name>; checkpoints become its versions


@dataclass
class WamConfig:
    name: str = "wam-run"  # the training job: one MLflow run, one checkpoint series
    output_dir: str = "runs"  # the run directory is <output_dir>/<name>
    model: ModelSection = field(default_factory=ModelSection)
    sample: SampleSection = field(default_factory=SampleSection)
    flow: FlowSection = field(default_factory=FlowSection)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    encoders: EncodersSection = field(default_factory=EncodersSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    serving: ServingSection = field(default_factory=ServingSection)
    seed: int = 0

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def checkpoint_uri(self) -> str:
        return self.checkpoint.uri or run_series(self.run_dir)

    @property
    def world_size(self) -> int:
        return self.training.processes * self.training.nodes


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(options)}")


def validate(cfg: WamConfig) -> None:
    """Checks that need more than a type: choices, ranges, and the resolved architecture."""
    _choice(cfg.model.attention, ATTENTION_BACKENDS, "model.attention")
    _choice(cfg.flow.schedule, NOISE_SCHEDULES, "flow.schedule")
    _choice(cfg.flow.loss_weighting, LOSS_WEIGHTINGS, "flow.loss_weighting")
    if cfg.flow.shift <= 0 or cfg.sampler.shift <= 0:
        raise ConfigError("flow.shift and sampler.shift must be > 0")
    if min(cfg.flow.flash_video_beta) <= 0:
        raise ConfigError(f"flow.flash_video_beta must be two positive numbers, got {cfg.flow.flash_video_beta}")
    if not 0.0 <= cfg.flow.prompt_dropout < 1.0:
        raise ConfigError(f"flow.prompt_dropout must be in [0, 1), got {cfg.flow.prompt_dropout}")
    validate_sampler(cfg.sampler, cfg.flow)
    _validate_training(cfg)
    _validate_handoff(cfg)
    resolve_preset(cfg)


def validate_sampler(s: SamplerSection, flow: FlowSection, key: str = "sampler") -> None:
    """A sampler section that can run: `key` prefixes the keys named (a preset's settings are named by it)."""
    _choice(s.solver, SOLVERS, f"{key}.solver")
    _choice(s.dit_cache, DIT_CACHES, f"{key}.dit_cache")
    if s.steps < 1:
        raise ConfigError(f"{key}.steps must be >= 1, got {s.steps}")
    if not 0.0 <= s.video_final_sigma < 1.0:
        raise ConfigError(f"{key}.video_final_sigma must be in [0, 1), got {s.video_final_sigma}")
    for name in ("guidance", "action_guidance"):
        if not getattr(s, name) >= 1.0:
            raise ConfigError(f"{key}.{name} must be >= 1 (1 = no guidance), got {getattr(s, name)}")
    if guided(s) and negative_prompt(s, flow) is None:
        raise ConfigError(f"{key}.guidance {s.guidance:g} / {key}.action_guidance {s.action_guidance:g} need an "
                          f"unconditional prompt: set {key}.negative_prompt (\"\" for the empty prompt), or train with "
                          "flow.prompt_dropout > 0 so that flow.dropout_prompt is one")
    if s.dit_passes < 1:
        raise ConfigError(f"{key}.dit_passes must be >= 1, got {s.dit_passes}")
    steps = s.dit_steps
    if steps and (steps[0] != 0 or any(b <= a for a, b in itertools.pairwise(steps)) or steps[-1] >= s.steps):
        raise ConfigError(f"{key}.dit_steps must be increasing step indices in [0, {s.steps}) starting with 0 (the "
                          f"first step has no velocity to reuse), got {list(steps)}")


def guided(s: SamplerSection) -> bool:
    return s.guidance > 1.0 or s.action_guidance > 1.0


def negative_prompt(s: SamplerSection, flow: FlowSection) -> str | None:
    """The unconditional pass's prompt: the sampler's, else the one prompt dropout trained; None if neither."""
    if s.negative_prompt is not None:
        return s.negative_prompt
    return flow.dropout_prompt if flow.prompt_dropout > 0 else None


def _validate_handoff(cfg: WamConfig) -> None:
    q, s = cfg.quantization, cfg.serving
    if q.shard_mb < 1:
        raise ConfigError(f"quantization.shard_mb must be >= 1, got {q.shard_mb}")
    if s.steps is not None and s.steps < 1:
        raise ConfigError(f"serving.steps must be >= 1, got {s.steps}")
    if s.sampler is not None:
        validate_sampler(sampler_preset(cfg.sampler, s.sampler), cfg.flow, "serving.sampler")
    if s.smoothing_window and (s.smoothing_window % 2 == 0 or not 0 <= s.smoothing_order < s.smoothing_window):
        raise ConfigError(f"serving.smoothing_window must be odd (or 0 for none) and greater than serving.smoothing_order; "
                          f"got {s.smoothing_window} and {s.smoothing_order}")
    if s.session_memory_gib is not None and s.session_memory_gib <= 0:
        raise ConfigError(f"serving.session_memory_gib must be > 0 (GiB for the sessions: their KV caches and what "
                          f"else serving takes), got {s.session_memory_gib}; leave it unset for 90% of the GPU's free "
                          "memory")
    if s.max_sessions < 1:
        raise ConfigError(f"serving.max_sessions must be >= 1, got {s.max_sessions}")
    for key in ("max_request_mb", "idle_timeout_s", "drain_timeout_s"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"serving.{key} must be > 0, got {getattr(s, key)}")
    for key in ("action_margin", "step_margin", "state_margin"):
        if not 0 <= getattr(s, key) <= 100:
            raise ConfigError(f"serving.{key} must be in [0, 100] (spans of the training range), got {getattr(s, key)}")
    if not 1 <= s.max_batch <= s.max_sessions:
        raise ConfigError(f"serving.max_batch must be in [1, serving.max_sessions = {s.max_sessions}] (chunks of "
                          f"different sessions denoised in one forward), got {s.max_batch}")
    _choice(s.compile, COMPILE_MODES, "serving.compile")
    _choice(s.protocol, PROTOCOLS, "serving.protocol")
    if s.devices not in (1, 2):
        raise ConfigError(f"serving.devices must be 1, or 2 for guidance in parallel (the unconditional pass on a "
                          f"second device), got {s.devices}")
    _choice(s.compute, COMPUTE_PATHS, "serving.compute")
    if s.cpu_threads is not None and s.cpu_threads < 1:
        raise ConfigError(f"serving.cpu_threads must be >= 1 (or unset: measured at start), got {s.cpu_threads}")


def _validate_data(cfg: WamConfig) -> None:
    d = cfg.data
    _choice(d.decoder, DECODERS, "data.decoder")
    _choice(d.bad_samples, BAD_SAMPLE_POLICIES, "data.bad_samples")
    if d.episodes < 1 or not 0.0 <= d.video_only_fraction < 1.0 or d.workers < 0 or not 0.1 <= d.crop_scale <= 1.0:
        raise ConfigError("data.episodes must be >= 1, data.video_only_fraction in [0, 1), data.workers >= 0 and "
                          "data.crop_scale in [0.1, 1]")
    if d.delay_s < 0:
        raise ConfigError(f"data.delay_s must be >= 0, got {d.delay_s}")
    chunks = resolve_preset(cfg).sample.num_chunks
    if d.packing and not 1 <= d.min_chunks <= chunks:
        raise ConfigError(f"data.min_chunks must be 1..{chunks} (sample.num_chunks), got {d.min_chunks}")
    if d.source != "lerobot":
        return
    if not d.datasets:
        raise ConfigError("data.source is lerobot but data.datasets is empty: list datasets as "
                          "[{uri: /path/or/s3://..., profile: droid, weight: 1.0}]")
    sample = resolve_preset(cfg).sample
    for entry in d.datasets:
        if entry.weight <= 0:
            raise ConfigError(f"data.datasets: weight of {entry.uri} must be > 0, got {entry.weight}")
        profile = resolve_profile(entry.profile, d.profiles)
        profile.validate(4 * sample.frames_per_chunk)  # the VAE packs 4 video frames per latent frame
        if profile.action_horizon != sample.actions_per_chunk:
            raise ConfigError(f"dataset {entry.uri}: profile {profile.name} has {profile.action_horizon} actions per "
                              f"chunk but sample.actions_per_chunk is {sample.actions_per_chunk}; a run trains one "
                              "action horizon, so set sample.actions_per_chunk to match")


def _validate_training(cfg: WamConfig) -> None:
    t, c = cfg.training, cfg.checkpoint
    _choice(t.activation_checkpointing, ACTIVATION_CHECKPOINTING, "training.activation_checkpointing")
    _choice(t.precision, PRECISIONS, "training.precision")
    _choice(t.launcher, LAUNCHERS, "training.launcher")
    _choice(t.lr_decay, ("linear", "sqrt", "cosine"), "training.lr_decay")
    _choice(cfg.data.source, DATA_SOURCES, "data.source")
    for key in ("steps", "batch_size", "grad_accumulation", "processes", "nodes", "dp_replicate", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"training.{key} must be >= 1, got {getattr(t, key)}")
    if t.max_failures < 0:
        raise ConfigError(f"training.max_failures must be >= 0, got {t.max_failures}")
    if t.lr <= 0 or t.warmup_steps < 0 or t.max_grad_norm <= 0:
        raise ConfigError("training.lr and training.max_grad_norm must be > 0 and training.warmup_steps >= 0")
    if cfg.world_size % t.dp_replicate:
        raise ConfigError(f"training.dp_replicate ({t.dp_replicate}) must divide the number of processes "
                          f"({cfg.world_size} = {t.nodes} nodes x {t.processes})")
    if c.interval < 1 or c.keep < 0:
        raise ConfigError(f"checkpoint.interval must be >= 1 and checkpoint.keep >= 0, got {c.interval}, {c.keep}")
    _validate_data(cfg)
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name must be a non-empty run name without '/', got {cfg.name!r}")


def resolve_preset(cfg: WamConfig) -> Preset:
    """The preset with the config's architecture and sample overrides applied and validated."""
    arch_overrides = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelSection)
                      if f.name in {g.name for g in dataclasses.fields(WamArch)}
                      and getattr(cfg.model, f.name) is not None}
    preset = get_preset(cfg.model.preset, **arch_overrides)
    sample_overrides = {k: v for k, v in dataclasses.asdict(cfg.sample).items() if v is not None}
    sample = dataclasses.replace(preset.sample, **sample_overrides)
    sample.validate(preset.arch)
    return dataclasses.replace(preset, sample=sample)


def check_memory(cfg: WamConfig, gib_per_process: float, where: str) -> None:
    """Refuse a run whose memory per training process exceeds `gib_per_process` (`where` says what that memory
    is, for the message): by the traced step of this config (`wam plan`, shipped or cached), else by the static
    estimate, and say how many processes would fit."""
    preset = resolve_preset(cfg)
    traced = plan.cached(plan.cache_key(preset, cfg.training))
    if traced is not None:
        traced = plan.with_encoders(traced, preset.arch, cfg.data.source)
        need = traced.memory_at(cfg.world_size)
        total = sum(need.values())
        if total / GIB <= gib_per_process:
            return
        fewest = plan.fewest_ranks(traced, gib_per_process * GIB)
        parts = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.1f}" for k, v in need.items() if v >= 0.05 * GIB)
        source = "by the memory of its traced training step"
    else:
        t = cfg.training
        kwargs = dict(batch_per_gpu=t.batch_size, activation_checkpointing=t.activation_checkpointing != "none")
        estimate = estimate_memory(preset.arch, preset.sample, cfg.world_size, **kwargs)
        total = estimate.total
        if total / GIB <= gib_per_process:
            return
        fewest = min_gpus(preset.arch, preset.sample, gib_per_process, headroom=1.0, **kwargs)
        with_ac = min_gpus(preset.arch, preset.sample, gib_per_process, headroom=1.0,
                           **{**kwargs, "activation_checkpointing": True})
        parts = (f"sharded states {estimate.sharded_states / GIB:.1f}, encoders {estimate.frozen_encoders / GIB:.1f}, "
                 f"activations {estimate.activations / GIB:.1f}")
        source = "by the static memory estimate (no traced plan of this config: `wam plan` traces one)"
    if fewest:
        hint = f"it needs at least {fewest} GPUs (processes) of this size"
    elif traced is None and with_ac and t.activation_checkpointing == "none":
        hint = f"with training.activation_checkpointing=full it needs at least {with_ac} GPUs (processes) of this size"
    else:
        hint = "no number of processes of this size fits (activations or frozen encoders alone do not)"
    raise ConfigError(
        f"preset {preset.name} needs ~{total / GIB:.1f} GiB per process with {cfg.world_size} process(es) {source} "
        f"({parts} GiB) but each process has {gib_per_process:.1f} GiB ({where}); {hint}. Use more processes or "
        "nodes, training.activation_checkpointing=full, a smaller batch, or a smaller preset")


_per_thread = threading.local()


def _schema() -> DictConfig:
    """The schema as an omegaconf node, built once per thread (~12 ms); never modified: merges copy it. Not
    shared between threads: omegaconf detaches a node's children while it copies them."""
    if not hasattr(_per_thread, "schema"):
        _per_thread.schema = OmegaConf.structured(WamConfig)
    return _per_thread.schema


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> WamConfig:
    """Schema defaults <- YAML file <- `key=value` overrides, validated. Raises ConfigError on bad input."""
    schema = _schema()
    layers: list[Any] = [schema]
    source = "overrides"
    try:
        if path is not None:
            layers.append(_read_yaml(Path(path)))
        source = "overrides" if path is None else f"{path} or its overrides"
        layers.append(_dotlist(overrides))
        layers[1:] = [_without_moved_keys(layer, source) for layer in layers[1:]]
        _check_shapes(schema, layers[1:], source)
        merged: DictConfig = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"invalid config in {source}: key {key!r}: {_first_line(err)}") from None
    assert isinstance(cfg, WamConfig)
    validate(cfg)
    return cfg


_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+|\[\d+\])*$")


def _dotlist(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """`key=value` overrides; ConfigError naming the one that is not `key=<YAML value>`."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not _OVERRIDE_KEY.match(key):
            raise ConfigError(f"override {item!r} is not key=value with a dotted config key (e.g. training.steps=100, "
                              "data.datasets.0.uri=/data/x)")
        try:
            yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: its value is not YAML ({getattr(err, 'problem', None) or err}); "
                              "quote it, e.g. key='text'") from None
    return OmegaConf.from_dotlist(list(overrides))


def _read_yaml(path: Path) -> DictConfig:
    """A config file's mapping; ConfigError for a missing file, a YAML error (with where) or anything but a
    non-empty mapping."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"config file {path} is not readable by this user")
    try:
        data = OmegaConf.load(path)  # omegaconf's YAML: `1e-4` is a number, as in the rest of the schema
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML at {yaml_position(err, 'somewhere')}: "
                          f"{getattr(err, 'problem', None) or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not text: {err}") from None
    except (OSError, AssertionError) as err:  # omegaconf's words for a YAML scalar: "Invalid loaded object type: int",
        # and a bare assertion for a quoted string that reads as a scalar again ('0')
        raise ConfigError(f"config file {path} is not a mapping of sections (model:, data:, training:, ...)"
                          + (f": {err}" if str(err) else "")) from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {path} holds a list; a config is a mapping of sections (model:, data:, "
                          "training:, ...)")
    if not data:
        raise ConfigError(f"config file {path} is empty: a run needs at least its data and training sections, e.g. "
                          "start from configs/tiny.yaml")
    return data


def config_from_dict(data: dict, source: str = "recorded config") -> WamConfig:
    """A config held as a plain dict (a checkpoint manifest, an MLflow run, a TrainJob), validated."""
    schema = _schema()
    data = _without_moved_keys(data, source)
    _check_shapes(schema, [data], source)
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(schema, data))
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid {source}: key {getattr(err, 'full_key', '?')!r}: {_first_line(err)}") from None
    validate(cfg)
    return cfg


# keys that moved elsewhere in the schema: (their old default, where they went). Configs recorded before (checkpoints)
# hold the default, which is dropped; any other value is refused with where it goes now (omegaconf would only say
# that the key is not in its section)
MOVED_KEYS = {
    ("serving", "gripper_dims"): ([], "the embodiment's profile (data.profiles.<name>.gripper_dims; the built-in droid "
                                      "profile has [7]): each robot of a server has its own"),
    ("serving", "gripper_threshold"): (0.5, "the embodiment's profile (data.profiles.<name>.gripper_threshold)"),
}


def _without_moved_keys(layer: Any, source: str) -> Any:
    """`layer` (a YAML mapping or a recorded dict) without the moved keys at their old default; ConfigError for a
    moved key set to anything else."""
    found = [(section, key) for section, key in MOVED_KEYS
             if isinstance(part := layer.get(section), (dict, DictConfig)) and key in part]
    if not found:
        return layer
    layer = copy.deepcopy(layer)
    for section, key in found:
        default, now = MOVED_KEYS[section, key]
        value = layer[section].pop(key)
        if (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value) != default:
            raise ConfigError(f"invalid config in {source}: {section}.{key} has moved to {now}; set it there")
    return layer


def _check_shapes(schema: DictConfig, layers: list, source: str) -> None:
    """A mapping where the schema has a list, or a list where it has a section: omegaconf's merge fails on
    these with a bare TypeError that names no key, so they are found here first."""
    def walk(node, value, key: str) -> None:
        sequence = OmegaConf.is_config(node) and not isinstance(node, DictConfig)  # a list or a tuple
        if sequence and isinstance(value, (dict, DictConfig)):
            raise ConfigError(f"invalid config in {source}: key {key!r} must be a list, got a mapping")
        if isinstance(node, DictConfig) and isinstance(value, (list, tuple, ListConfig)):
            raise ConfigError(f"invalid config in {source}: key {key!r} must be a mapping, got a list")
        if isinstance(node, DictConfig) and isinstance(value, (dict, DictConfig)):
            for k, v in value.items():
                child = node._get_node(k) if k in node else None
                if child is not None:
                    walk(child, v, f"{key}.{k}" if key else str(k))

    for layer in layers:
        walk(schema, layer, "")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def to_yaml(cfg: WamConfig) -> str:
    # The same text as through OmegaConf.structured(cfg), in half the time (no type analysis of the tree).
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))

