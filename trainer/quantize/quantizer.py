"""`wam quantize`: a complete training checkpoint -> an NVFP4 model folder the policy server loads.

The checkpoint is read in groups of at most `quantization.shard_mb` (DCP reads only those tensors' bytes)
and written in safetensors shards of the same size, so memory stays at about two shards plus a few copies
of the largest tensor, whatever the model size. The folder (layout in the README):

  model-00001-of-0000N.safetensors ...  per quantized weight W: W.packed, W.scales, W.global_scale (nvfp4.py);
                                        every other tensor in bfloat16 under its own name
  model.safetensors.index.json          tensor -> shard, and the quantized weight names
  report.json                           per layer: shape, format, relative error, scale statistics
  policy.json                           what serving needs besides weights: embodiments and their stats
  manifest.json                         written LAST (files, sizes, sha256, training config): no manifest,
                                        not complete, never served
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from wam.platform.checkpoints import quantized_uri, read_manifest, series_of, step_of, verify, write_manifest
from wam.platform.config import WamConfig
from wam.platform.data_contract import action_embodiments, check_datasets
from wam.platform.errors import CheckpointError, ConfigError
from wam.platform.storage import filesystem, is_remote, join, local_path, open_uri
from wam.platform.tracking import log_quantized_model, resolve_uri
from wam.trainer.checkpoint_reader import open_checkpoint
from wam.trainer.quantize import nvfp4

log = logging.getLogger("wam.quantize")

FORMAT = "wam-nvfp4/1"
INDEX = "model.safetensors.index.json"
REPORT = "report.json"
POLICY = "policy.json"
SUFFIXES = ("packed", "scales", "global_scale")


@dataclass
class LayerReport:
    name: str
    shape: list[int]
    format: str  # nvfp4 | bfloat16
    reason: str = ""  # why a weight stayed in bfloat16
    relative_error: float | None = None  # ||W - dequant(Q(W))|| / ||W||
    scale_min: float | None = None  # of the FP8 block scales, in weight units (x global scale)
    scale_max: float | None = None
    scale_mean: float | None = None
    global_scale: float | None = None


_SIZES = ("input_bytes", "output_bytes", "seconds")


@dataclass
class QuantizationReport:
    step: int
    source: str
    out: str
    layers: list[LayerReport] = field(default_factory=list)
    input_bytes: int = 0  # the model's weights in float32 as checkpointed
    output_bytes: int = 0
    seconds: float = 0.0
    reused: bool = False  # an intact result of an earlier run
    mlflow_version: str | None = None  # of the registered quantized model

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "step": self.step, "source": self.source,
                **{k: getattr(self, k) for k in _SIZES}, "layers": [asdict(layer) for layer in self.layers]}

    @property
    def quantized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.format == "nvfp4"]

    def summary(self) -> dict[str, float]:
        errors = [layer.relative_error for layer in self.quantized]
        return {"layers_nvfp4": len(errors), "layers_bf16": len(self.layers) - len(errors),
                "relative_error_mean": sum(errors) / len(errors) if errors else 0.0,
                "relative_error_max": max(errors, default=0.0),
                "compression": self.input_bytes / max(self.output_bytes, 1),
                "throughput_mb_s": self.input_bytes / 1e6 / max(self.seconds, 1e-9)}


def kept_reason(name: str, shape: tuple[int, ...], keep: list[str]) -> str:
    """Why tensor `name` stays in bfloat16 ('' when it is quantized)."""
    if not name.endswith(".weight") or len(shape) != 2:
        return "not a linear weight"
    module = name.removesuffix(".weight")
    for pattern in keep:
        if fnmatch.fnmatchcase(module, pattern):
            return f"kept by pattern {pattern!r}"
    if not nvfp4.quantizable(shape):
        return f"input width {shape[1]} is not a multiple of {nvfp4.BLOCK}"
    return ""


def _layer_report(name: str, weight: torch.Tensor, q: nvfp4.NVFP4Weight) -> LayerReport:
    error = (nvfp4.dequantize(q) - weight).norm() / weight.norm().clamp_min(1e-30)
    scales = q.scales.float() * q.global_scale
    return LayerReport(name, list(weight.shape), "nvfp4", relative_error=error.item(), scale_min=scales.min().item(),
                       scale_max=scales.max().item(), scale_mean=scales.mean().item(),
                       global_scale=q.global_scale.item())


class _ShardWriter:
    """Tensors into numbered safetensors shards of at most `limit` bytes (a tensor larger than that gets a
    shard of its own); a remote destination receives each shard as soon as it is written."""

    def __init__(self, staging: Path, limit: int, metadata: dict[str, str]):
        self.staging, self.limit, self.metadata = staging, limit, metadata
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary name, tensor names)
        self.bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.nbytes for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.limit:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in self.pending.items()}, str(self.staging / name), self.metadata)
        self.shards.append((name, list(self.pending)))
        self.bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> dict[str, str]:
        """Name the shards model-0000i-of-0000N, move them to the destination; returns tensor -> shard."""
        self.flush()
        weight_map = {}
        for i, (temporary, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.staging / temporary).rename(self.staging / final)
            weight_map.update(dict.fromkeys(names, final))
        return weight_map


def _embodiments(cfg: WamConfig) -> dict[str, dict]:
    """Each action-bearing dataset's profile, normalisation stats and recording rate: serving needs them to turn
    normalised actions back into robot commands, and to know how long a robot takes to execute a chunk (its actions
    at the rate it was recorded at). Missing stats are computed now (as training did)."""
    from wam.trainer.data.lerobot import LeRobotDataset
    from wam.trainer.data.stats import load_or_compute_stats

    found = {}
    for name, (profile, uri) in action_embodiments(cfg).items():
        dataset = LeRobotDataset(uri)
        stats, _ = load_or_compute_stats(dataset, profile)
        found[name] = {"profile": asdict(profile), "stats": asdict(stats), "dataset": uri, "control_hz": dataset.fps}
    return found


def _read_groups(shapes: dict[str, tuple[int, ...]], limit: int) -> list[list[str]]:
    """Consecutive tensors in groups of at most `limit` float32 bytes (a larger tensor alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * math.prod(shape)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _release_large_buffers_to_the_os() -> None:
    """glibc raises its mmap threshold after large frees, so later tensor-sized buffers come from the heap,
    which fragments and never shrinks: streaming a big model would then hold about the model's size anyway.
    A fixed 1 MiB threshold (what MALLOC_MMAP_THRESHOLD_ sets) keeps each tensor's memory its own."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _already_quantized(out: str, source: str, step: int) -> QuantizationReport | None:
    """The report of a complete, intact quantized model of this checkpoint at `out` (a retried Job)."""
    try:
        manifest = read_manifest(out)
    except CheckpointError:  # a corrupt result is made again
        return None
    if manifest is None or manifest.metrics.get("source") != source or manifest.step != step:
        return None
    if verify(out, manifest, checksums=False):
        return None
    with open_uri(join(out, REPORT), "r") as f:
        data = json.load(f)
    layers = [LayerReport(**layer) for layer in data["layers"]]
    return QuantizationReport(step, source, out, layers, reused=True, **{k: data[k] for k in _SIZES})


def quantize_checkpoint(checkpoint: str, out: str | None = None, keep: list[str] | None = None,
                        shard_mb: int | None = None, track: bool = True) -> QuantizationReport:
    """Quantize the complete checkpoint at `checkpoint` (a step folder, or a checkpoint series: its newest
    complete one) into `out` (default: the handoff path beside the series). Refuses unfinished or
    corrupted checkpoints; an intact result of an earlier run is reused. `track`: record it on the training run
    and register it in MLflow (not for a reference model nobody trained)."""
    start = time.perf_counter()
    _release_large_buffers_to_the_os()
    stored = open_checkpoint(checkpoint)
    uri, manifest, cfg = stored.uri, stored.manifest, stored.config
    if out is None and step_of(uri) is None:
        raise ConfigError(f"{uri} is not a step-N folder of a checkpoint series, so it has no default output place: "
                          "pass --out")
    out = out or quantized_uri(series_of(uri), manifest.step)
    done = _already_quantized(out, uri, manifest.step)
    if done is not None:
        return done
    check_datasets(cfg)  # the embodiments' statistics come from them
    keep = list(cfg.quantization.keep if keep is None else keep)
    limit = (shard_mb or cfg.quantization.shard_mb) << 20
    shapes = stored.shapes
    report = QuantizationReport(step=manifest.step, source=uri, out=out)
    policy = {"format": FORMAT, "step": manifest.step, "source": uri, "preset": stored.preset.name,
              "embodiments": _embodiments(cfg), "keep": keep}

    fs, root = filesystem(out)
    if fs.exists(root):  # an unfinished earlier attempt (no manifest, or another checkpoint's)
        fs.rm(root, recursive=True)
    staging_parent = None if is_remote(out) else local_path(out).parent
    if staging_parent is not None:
        staging_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".quantize-", dir=staging_parent))
    try:
        writer = _ShardWriter(staging, limit, {"format": FORMAT, "step": str(manifest.step)})
        for group in _read_groups(shapes, limit):  # one DCP read per group: its fixed cost is ~50 ms
            loaded = stored.read(group)
            for name, weight in loaded.items():
                report.input_bytes += weight.nbytes
                reason = kept_reason(name, shapes[name], keep)
                if reason:
                    writer.add({name: weight.to(torch.bfloat16)})
                    report.layers.append(LayerReport(name, list(shapes[name]), "bfloat16", reason=reason))
                    continue
                q = nvfp4.quantize(weight)
                writer.add({f"{name}.{suffix}": getattr(q, suffix) for suffix in SUFFIXES})
                report.layers.append(_layer_report(name, weight, q))
            del loaded
        weight_map = writer.finish()
        report.output_bytes = writer.bytes
        report.seconds = time.perf_counter() - start
        index = {"metadata": {"format": FORMAT, "total_size": writer.bytes,
                              "nvfp4": [layer.name for layer in report.quantized]}, "weight_map": weight_map}
        (staging / INDEX).write_text(json.dumps(index, indent=1))
        (staging / REPORT).write_text(json.dumps(report.to_dict(), indent=1))
        (staging / POLICY).write_text(json.dumps(policy, indent=1))
        staging.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
        for path in staging.iterdir():
            path.chmod(0o644)
        if is_remote(out):
            fs.put(str(staging) + "/", root, recursive=True)
        else:
            staging.rename(local_path(out))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_manifest(out, manifest.step, manifest.config, {"source": uri, **report.summary()}, format=FORMAT)  # last
    if track:
        _track(cfg, report)
    return report


def _track(cfg: WamConfig, report: QuantizationReport) -> None:
    """Log the report on the training run and register the model; a tracking outage only warns (the
    quantized model is complete and usable without it)."""
    uri = resolve_uri(cfg.tracking.uri, cfg.run_dir)
    if uri.startswith("sqlite:") and not cfg.run_dir.exists():
        log.warning("no MLflow store for run %s here (%s); the quantized model is not tracked", cfg.name, uri)
        return
    try:
        report.mlflow_version = log_quantized_model(
            uri, cfg.tracking.experiment, cfg.name, cfg.tracking.registered_model or f"wam-{cfg.name}", report.step,
            report.out, json.dumps(report.to_dict(), indent=1), report.summary())
    except Exception as err:  # noqa: BLE001 - tracking never fails the handoff
        log.warning("could not record the quantized model in MLflow at %s: %s: %s", uri, type(err).__name__, err)


def report_path(out: str) -> str:
    return join(out, REPORT)
