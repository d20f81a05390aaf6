"""`wam eval`: open-loop evaluation of a checkpoint on held-out episodes, as DreamZero evaluates offline.

Every held-out window is rolled out chunk by chunk against the KV cache from its REAL context: the first
frame, then after each chunk the chunk's real latents are written into the cache in place of the
prediction, as a robot loop would. Each chunk's predicted actions are compared with the recorded ones in
robot units (q01/q99 normalisation inverted, relative dims made absolute from the chunk's starting state:
the model's own output, before the policy server's smoothing and gripper binarisation), per action dim
(MSE, L1), and its predicted video latents with the real ones (MSE). `wam demo` rolls out with this code.

Held-out data: a LeRobot dataset read with the training profile and the dataset's own q01/q99 stats, or,
for a model trained on procedural latents (data.source: synthetic), episodes of the same generator that
training never drew (their actions are in the generator's units). Windows, noise and results are a
function of the seed: the same checkpoint, data and seed give the same report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wam.platform.accounting import count_params
from wam.platform.config import DatasetEntry, WamConfig, config_from_dict, resolve_preset
from wam.platform.errors import ConfigError
from wam.platform.storage import is_remote, local_path
from wam.trainer.data.robot import RobotSource
from wam.trainer.data.synthetic import REAL_ACTION_DIMS, SyntheticLatents
from wam.trainer.inference import ChunkRollout
from wam.trainer.model import WamModel
from wam.trainer.model.encoders import EncoderPaths, FrozenEncoders
from wam.trainer.model.export import complete_checkpoint, load_from_checkpoint
from wam.trainer.model.registry import model_config
from wam.trainer.model.weights import CheckpointError
from wam.trainer.serve.actions import unnormalize

SMALL_PRESET_PARAMS = 100_000_000  # `--device auto` evaluates presets below this on the CPU, others on a GPU


# -- the checkpoint -------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    uri: str  # the complete checkpoint folder, or the exported .safetensors file
    step: int
    config: WamConfig  # the training config
    state: dict[str, torch.Tensor]  # float32 weights on the CPU
    folder: str  # the checkpoint folder (for an export: the one it was exported from, if recorded)


def read_checkpoint(uri: str) -> Checkpoint:
    """A complete DCP checkpoint folder (verified against its manifest), a checkpoints root (its newest
    complete checkpoint), or a .safetensors file from `wam export` (which carries its training config)."""
    if uri.endswith(".safetensors"):
        if is_remote(uri):
            raise ConfigError(f"{uri}: evaluate an exported file from a local path (or the checkpoint folder by URI)")
        path = Path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"no file {uri}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise CheckpointError(f"{uri} carries no training config (only `wam export` writes one): evaluate the "
                                  "checkpoint folder it came from, or export it with `wam export`")
        cfg = config_from_dict(json.loads(meta["config"]), f"training config in {uri}")
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        return Checkpoint(uri, int(meta.get("step", 0)), cfg, state, meta.get("source", ""))
    folder, manifest = complete_checkpoint(uri)
    cfg = config_from_dict(manifest.config, f"training config in {folder}")
    preset = resolve_preset(cfg)
    with torch.device("meta"):
        shapes = model_config(preset.arch, preset.sample).build().state_dict()
    state = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in shapes.items()}
    load_from_checkpoint(state, folder)
    return Checkpoint(folder, manifest.step, cfg, state, folder)


def build_policy(ckpt: Checkpoint, device: torch.device) -> WamModel:
    """The checkpoint's model on `device`: float32 on CPUs, bfloat16 on GPUs (as training's forward)."""
    preset = resolve_preset(ckpt.config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = model_config(preset.arch, preset.sample).build().to(dtype)
    model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in ckpt.state.items()}, strict=True)
    return model.eval().requires_grad_(False)


def choose_device(requested: str, cfg: WamConfig) -> torch.device:
    """auto: small presets on the CPU (fast enough, reproducible anywhere), the others on a GPU."""
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: this machine has no CUDA GPU")
        return device
    params = count_params(resolve_preset(cfg).arch).total
    if params < SMALL_PRESET_PARAMS:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"preset {cfg.model.preset} ({params / 1e9:.1f} B parameters) is evaluated on a GPU and "
                          "this machine has none; pass --device cpu to run it on the CPU anyway (slow)")
    return torch.device("cuda")


# -- held-out data --------------------------------------------------------------------------------------


@dataclass
class Window:
    """One held-out window as the model sees it, and what the robot recorded."""

    label: str  # e.g. "episode 2 @ frame 36"
    episode: int
    prompt: str
    latents: torch.Tensor  # (1, z, 1 + K*F, h, w) real video latents, the first frame included
    text: torch.Tensor  # (1, text_len, text_dim) prompt features
    image: torch.Tensor | None  # (1, tokens, image_dim) CLIP tokens of the first frame
    i2v: torch.Tensor | None  # (1, 4 + z, 1 + K*F, h, w) I2V channels
    state: torch.Tensor  # (K, state_dim) normalised and padded, as in training
    actions: torch.Tensor  # (K, A, action_dim) normalised targets, as in training
    dims: torch.Tensor  # (action_dim,) bool: real action dims
    recorded: np.ndarray  # (K, A, D) recorded actions in robot units
    anchors: np.ndarray  # (K, state dims) robot-unit state at each chunk's start


class HeldOut(ABC):
    """Held-out windows of one dataset, and the map from the model's normalised actions to robot units."""

    units: str  # what the action errors are measured in
    description: str
    dim_names: list[str]

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def window(self, index: int) -> Window: ...

    @abstractmethod
    def to_robot(self, normalised: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        """(A, action_dim) normalised chunk -> (A, D) in the units of `recorded`."""

    def select(self, count: int) -> list[int]:
        """`count` windows spread evenly over the data (all of them when there are fewer)."""
        if count >= len(self):
            return list(range(len(self)))
        return sorted({int(i) for i in np.linspace(0, len(self) - 1, count).round()})


class RobotHeldOut(HeldOut):
    def __init__(self, cfg: WamConfig, uri: str, profile: str, encoders: FrozenEncoders, device: torch.device):
        preset = resolve_preset(cfg)
        self.arch, self.shape, self.encoders, self.device = preset.arch, preset.sample, encoders, device
        self.source = RobotSource([DatasetEntry(uri=uri, profile=profile)], cfg.data.profiles, preset.arch,
                                  preset.sample, cfg.seed, decoder=cfg.data.decoder)
        chosen = self.source.profiles[0]
        if not chosen.has_actions:
            raise ConfigError(f"profile {chosen.name} reads no actions from {uri}: evaluate on data with actions")
        windows = self.source.windows
        self.order = sorted(range(len(windows)), key=lambda i: (windows[i].episode, windows[i].start))
        _, _, self.action_q01, self.action_q99 = self.source.stats[0].arrays()
        self.relative_dims = chosen.relative_dims
        self.units = "robot"
        self.description = f"{uri} (profile {chosen.name})"
        self.dim_names = _dim_names(self.source.datasets[0].info, chosen.action_keys)

    def __len__(self) -> int:
        return len(self.order)

    @torch.no_grad()
    def window(self, index: int) -> Window:
        position = self.order[index]
        where = self.source.windows[position]
        data = self.source.load(where)
        sample = self.source.transform(position, where, data)
        dtype = next(self.encoders.vae.parameters()).dtype
        frames = sample.pixels[None].to(self.device, dtype) / 127.5 - 1
        latents = self.encoders.vae.encode(frames)
        first = frames[:, :, 0]
        image = self.encoders.image(first) if self.encoders.image is not None else None
        i2v = self.encoders.i2v_condition(first, latents.shape[2]) if self.arch.i2v_concat else None
        k = self.shape.num_chunks
        return Window(f"episode {where.episode} @ frame {where.start}", where.episode, sample.prompt, latents.float(),
                      self.encoders.text([sample.prompt]).float(), _float(image), _float(i2v), sample.state,
                      sample.actions, sample.action_dims, data.actions.reshape(k, -1, data.actions.shape[1]),
                      data.state)

    def to_robot(self, normalised: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        actions = unnormalize(normalised[:, :len(self.action_q01)].astype(np.float64), self.action_q01, self.action_q99)
        if self.relative_dims:
            actions[:, list(self.relative_dims)] += anchor[list(self.relative_dims)]
        return actions


class SyntheticHeldOut(HeldOut):
    """Episodes of the procedural latent generator that training never drew (indices past data.episodes)."""

    def __init__(self, cfg: WamConfig, count: int, encoders: FrozenEncoders):
        preset = resolve_preset(cfg)
        self.first = cfg.data.episodes
        self.source = SyntheticLatents(preset.arch, preset.sample, self.first + count, cfg.seed)
        self.count, self.encoders = count, encoders
        self.units = "procedural"  # the generator's own velocity and gripper commands
        self.description = f"{count} procedural episodes never trained on (seed {cfg.seed})"
        self.dim_names = ["velocity x", "velocity y", "gripper"][:REAL_ACTION_DIMS]

    def __len__(self) -> int:
        return self.count

    @torch.no_grad()
    def window(self, index: int) -> Window:
        episode = self.first + index
        s = self.source[episode]
        device = next(self.encoders.text.parameters()).device
        actions = s.actions[:, :, :REAL_ACTION_DIMS].numpy().astype(np.float64)
        return Window(f"episode {episode}", episode, s.prompt, s.video[None].to(device),
                      self.encoders.text([s.prompt]).float(), _batched(s.image, device), _batched(s.i2v_cond, device),
                      s.state, s.actions, s.action_dims, actions, s.state.numpy())

    def to_robot(self, normalised: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        return normalised[:, :REAL_ACTION_DIMS].astype(np.float64)


def _float(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float()


def _batched(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if x is None else x[None].to(device)


def _dim_names(info: dict, keys: tuple[str, ...]) -> list[str]:
    """Per action dim, the dataset's own axis names when it declares them (LeRobot `names`), else key[i]."""
    names: list[str] = []
    for key in keys:
        feature = info.get("features", {}).get(key, {})
        size = math.prod(feature.get("shape", [1]))
        axes = feature.get("names")
        axes = axes.get("axes", axes.get("motors")) if isinstance(axes, dict) else axes
        names += list(axes) if isinstance(axes, list) and len(axes) == size else [f"{key}[{i}]" for i in range(size)]
    return names


def held_out(cfg: WamConfig, dataset: str | None, profile: str | None, windows: int, encoders: FrozenEncoders,
             device: torch.device) -> HeldOut:
    if cfg.data.source == "synthetic":
        if dataset is not None:
            raise ConfigError("this checkpoint was trained on procedural latents (data.source: synthetic): it is "
                              "evaluated on held-out procedural episodes, not on a LeRobot dataset; drop --data")
        return SyntheticHeldOut(cfg, windows, encoders)
    if dataset is None:
        trained_on = ", ".join(e.uri for e in cfg.data.datasets)
        raise ConfigError(f"name the held-out LeRobot dataset with --data (this checkpoint was trained on {trained_on}; "
                          "evaluate on episodes it never saw, e.g. from `wam data synth OUT --seed 1`)")
    return RobotHeldOut(cfg, dataset, profile or cfg.data.datasets[0].profile, encoders, device)


# -- rollouts -------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """One model's open-loop predictions on the evaluated windows."""

    labels: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    episodes: list[int] = field(default_factory=list)
    predicted: list[np.ndarray] = field(default_factory=list)  # per window (K, A, D), units of `recorded`
    recorded: list[np.ndarray] = field(default_factory=list)
    normalised_l1: list[list[float]] = field(default_factory=list)  # per window, per chunk: over real dims
    video_mse: list[list[float]] = field(default_factory=list)  # per window, per chunk
    denoise_ms: list[list[float]] = field(default_factory=list)


def new_rollout(model: WamModel, cfg: WamConfig, steps: int | None = None) -> ChunkRollout:
    s = resolve_preset(cfg).sample
    sampler = cfg.sampler if steps is None else dataclasses.replace(cfg.sampler, steps=steps)
    return ChunkRollout(model, sampler, max_chunks=s.num_chunks, frames_per_chunk=s.frames_per_chunk,
                        actions_per_chunk=s.actions_per_chunk, latent_hw=(s.latent_height, s.latent_width))


@torch.no_grad()
def roll_out(rollout: ChunkRollout, window: Window, heldout: HeldOut, generator: torch.Generator,
             into: Rollouts) -> None:
    """Predict each chunk from the real context, then write the chunk's real latents into the cache."""
    device = window.latents.device
    f = rollout.frames_per_chunk
    rollout.reset(window.latents[:, :, :1], window.text, window.image, window.i2v)
    predicted, l1, video, ms = [], [], [], []
    for c in range(rollout.max_chunks):
        start = time.perf_counter()
        chunk = rollout.act(window.state[c][None].to(device), generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ms.append((time.perf_counter() - start) * 1000)
        real = window.latents[:, :, 1 + c * f:1 + (c + 1) * f]
        rollout.observe(real)
        normalised = chunk.actions[0].float().cpu()
        predicted.append(heldout.to_robot(normalised.numpy(), window.anchors[c]))
        l1.append((normalised[:, window.dims] - window.actions[c][:, window.dims]).abs().mean().item())
        video.append((chunk.video.float() - real).square().mean().item())
    into.labels.append(window.label)
    into.prompts.append(window.prompt)
    into.episodes.append(window.episode)
    into.predicted.append(np.stack(predicted))
    into.recorded.append(window.recorded)
    into.normalised_l1.append(l1)
    into.video_mse.append(video)
    into.denoise_ms.append(ms)


def evaluate(models: dict[str, WamModel], cfg: WamConfig, heldout: HeldOut, indices: list[int], seed: int,
             steps: int | None = None) -> dict[str, Rollouts]:
    """Every model on the same windows with the same noise (one generator per model, seeded alike); each
    window is read and encoded once."""
    device = next(iter(models.values())).patch_embedding.weight.device
    rollouts = {name: new_rollout(model, cfg, steps) for name, model in models.items()}
    generators = {name: torch.Generator(device).manual_seed(seed) for name in models}
    results = {name: Rollouts() for name in models}
    for index in indices:
        window = heldout.window(index)
        for name in models:
            roll_out(rollouts[name], window, heldout, generators[name], results[name])
    return results


# -- the report -----------------------------------------------------------------------------------------


def summarize(r: Rollouts) -> dict:
    """Metrics over all windows: per action dim, per chunk, and overall means."""
    error = np.stack(r.predicted) - np.stack(r.recorded)  # (W, K, A, D)
    per_dim_mse, per_dim_l1 = np.square(error).mean(axis=(0, 1, 2)), np.abs(error).mean(axis=(0, 1, 2))
    video = np.asarray(r.video_mse)
    return {
        "action_mse": float(per_dim_mse.mean()),
        "action_l1": float(per_dim_l1.mean()),
        "action_l1_normalised": float(np.mean(r.normalised_l1)),
        "video_mse": float(video.mean()),
        "denoise_ms": float(np.mean(r.denoise_ms)),
        "per_dim": [{"mse": float(m), "l1": float(a)} for m, a in zip(per_dim_mse, per_dim_l1, strict=True)],
        "per_chunk": [{"action_l1": float(a), "video_mse": float(v), "denoise_ms": float(t)} for a, v, t in
                      zip(np.abs(error).mean(axis=(0, 2, 3)), video.mean(axis=0), np.mean(r.denoise_ms, axis=0),
                          strict=True)],
    }


def mlflow_metrics(summary: dict, dim_names: list[str]) -> dict[str, float]:
    """The summary as flat MLflow metric names under eval/ (names as MLflow allows them)."""
    metrics = {f"eval/{k}": v for k, v in summary.items() if isinstance(v, float)}
    for i, d in enumerate(summary["per_dim"]):
        name = "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in dim_names[i])
        metrics[f"eval/action_l1/{name}"], metrics[f"eval/action_mse/{name}"] = d["l1"], d["mse"]
    for c, d in enumerate(summary["per_chunk"]):
        metrics[f"eval/action_l1/chunk_{c}"], metrics[f"eval/video_mse/chunk_{c}"] = d["action_l1"], d["video_mse"]
    return metrics


def plot_actions(r: Rollouts, dim_names: list[str], units: str, out: Path, episodes: int = 3) -> Path:
    """Predicted vs recorded actions per dim for the first evaluated window of up to `episodes` episodes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    first = {}
    for i, episode in enumerate(r.episodes):
        first.setdefault(episode, i)
    shown = list(first.values())[:episodes]
    dims = len(dim_names)
    fig, axes = plt.subplots(len(shown), dims, figsize=(2.4 * dims, 2.0 * len(shown) + 0.6), squeeze=False,
                             sharex=True)
    for row, i in enumerate(shown):
        k, a, _ = r.recorded[i].shape
        steps = np.arange(k * a)
        for d in range(dims):
            ax = axes[row][d]
            ax.plot(steps, r.recorded[i][:, :, d].reshape(-1), color="black", lw=1.2, label="recorded")
            ax.plot(steps, r.predicted[i][:, :, d].reshape(-1), color="tab:orange", lw=1.2, ls="--", label="predicted")
            for c in range(1, k):
                ax.axvline(c * a, color="grey", lw=0.5, ls=":")
            if row == 0:
                ax.set_title(dim_names[d], fontsize=9)
            if d == 0:
                ax.set_ylabel(r.labels[i], fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"predicted vs recorded actions ({units} units); dotted lines: chunk boundaries", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


# -- `wam eval` -----------------------------------------------------------------------------------------


@dataclass
class EvalReport:
    report: dict  # what report.json holds
    out: Path  # the folder holding report.json and actions.png
    metrics: dict[str, float]  # flat, as logged to MLflow
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    tracking_note: str = ""  # why nothing was logged, when nothing was


def training_run(ckpt: Checkpoint) -> tuple[str | None, str | None, Path | None]:
    """(tracking URI, MLflow run id, run dir) of the run that wrote the checkpoint: from run.json beside its
    checkpoints (where `wam train` puts them), else the config's tracking URI (the run is then found by its job
    tag), else nothing known."""
    if ckpt.folder and not is_remote(ckpt.folder):
        run_dir = local_path(ckpt.folder).resolve().parent.parent  # <run dir>/checkpoints/step-N
        info_path = run_dir / "run.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            if Path(info.get("run_dir", "")) == run_dir:
                return info.get("tracking_uri"), info.get("mlflow_run_id"), run_dir
    return ckpt.config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"), None, None


def run_eval(checkpoint: str, dataset: str | None = None, profile: str | None = None, windows: int = 8,
             steps: int | None = None, seed: int = 0, device: str = "auto", out: Path | None = None,
             plot_episodes: int = 3, tracking_uri: str | None = None, log_mlflow: bool = True,
             run_id: str | None = None) -> EvalReport:
    """Evaluate a checkpoint; write report.json and actions.png; log them and the metrics to MLflow."""
    from wam.platform.tracking import log_evaluation

    if windows < 1:
        raise ConfigError(f"--windows must be >= 1, got {windows}")
    ckpt = read_checkpoint(checkpoint)
    cfg = ckpt.config
    chosen = choose_device(device, cfg)
    encoders = FrozenEncoders.build(resolve_preset(cfg).arch, EncoderPaths(**vars(cfg.encoders)), seed=cfg.seed,
                                    device=chosen, dtype=torch.bfloat16 if chosen.type == "cuda" else torch.float32,
                                    vision=cfg.data.source == "lerobot")
    heldout = held_out(cfg, dataset, profile, windows, encoders, chosen)
    indices = heldout.select(windows)
    started = time.perf_counter()
    rollouts = evaluate({"model": build_policy(ckpt, chosen)}, cfg, heldout, indices, seed, steps)["model"]
    summary = summarize(rollouts)
    known_uri, known_run, run_dir = training_run(ckpt)
    out = out or ((run_dir / "eval" if run_dir else Path("eval") / cfg.name) / f"step-{ckpt.step}")
    report = {
        "checkpoint": ckpt.uri, "step": ckpt.step, "preset": cfg.model.preset, "run": cfg.name,
        "data": heldout.description,
        "windows": [{"window": w, "prompt": p} for w, p in zip(rollouts.labels, rollouts.prompts, strict=True)],
        "seed": seed, "denoising_steps": steps or cfg.sampler.steps, "device": str(chosen), "units": heldout.units,
        "seconds": round(time.perf_counter() - started, 2),
        **{k: v for k, v in summary.items() if k != "per_dim"},
        "per_dim": [{"dim": name, **d} for name, d in zip(heldout.dim_names, summary["per_dim"], strict=True)],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_actions(rollouts, heldout.dim_names, heldout.units, out / "actions.png", plot_episodes)
    metrics = mlflow_metrics(summary, heldout.dim_names)
    result = EvalReport(report, out, metrics)
    uri = tracking_uri or known_uri
    if not log_mlflow:
        result.tracking_note = "MLflow logging off (--no-mlflow)"
    elif uri is None:
        result.tracking_note = ("no MLflow store known for this checkpoint (no run.json beside its checkpoints, no "
                                "tracking.uri, no MLFLOW_TRACKING_URI): pass --tracking-uri to log the evaluation")
    else:
        try:
            result.mlflow_run_id = log_evaluation(uri, cfg.tracking.experiment, cfg.name, ckpt.step, metrics, out,
                                                  run_id or (known_run if uri == known_uri else None))
            result.tracking_uri = uri
        except Exception as err:  # noqa: BLE001 - the report on disk stands; the caller says what was not logged
            result.tracking_note = f"MLflow at {uri} did not take the evaluation ({type(err).__name__}: {err})"
    return result
