"""What a traced training step means on an accelerator, torch-free: memory per rank, step time and MFU from a
roofline, the fewest GPUs that fit, and the time and GPU-hours of a recipe (`wam plan`).

`TracedStep` is what wam.trainer.titan.plan records at one rank count: peak memory per category, every
operator's FLOPs and bytes, every collective's bytes and group. Other rank counts follow from it: the sharded
categories (parameters, gradients, optimizer state) scale as 1/ranks, the rest is per rank; collectives keep
their bytes and span the new group. The roofline: each operator takes max(FLOPs / matmul peak, bytes / HBM
bandwidth); each collective moves (g-1)/g of its bytes (twice for all-reduce) over NVLink inside the NVLink
domain, else over the network; FSDP overlaps the two, so a step takes the longer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from wam.platform.accelerators import Accelerator
from wam.platform.accounting import FROZEN_ENCODER_PARAMS
from wam.platform.presets import Preset, WamArch

GIB = 1024**3
# Sharded (scale as 1/ranks): parameters, gradients, optimizer state. Per rank: the blocks' gathered parameters
# and unsharded gradients (with FSDP's all-gather and reduce-scatter buffers), activations, temporaries.
CATEGORIES = ("parameters", "gradients", "optimizer_state", "gathered_parameters", "gradient_buffers", "activations",
              "temporaries")
SHARDED = ("parameters", "gradients", "optimizer_state")
HEADROOM = 0.9  # of device memory usable by tensors (the allocator's fragmentation, CUDA context, NCCL buffers)


@dataclass(frozen=True)
class Recipe:
    """DreamZero's training recipe: global batch 128 for 100K steps."""

    global_batch: int = 128
    steps: int = 100_000


@dataclass(frozen=True)
class Collective:
    name: str  # c10d op: _allgather_base, _reduce_scatter_base, allreduce
    bytes: int  # the full buffer: all-gather output, reduce-scatter input, all-reduce tensor
    group: int  # ranks in the group
    count: int  # times per step


@dataclass(frozen=True)
class TracedStep:
    world_size: int
    micro_batch: int
    grad_accumulation: int
    dp_replicate: int
    activation_checkpointing: str
    memory: dict[str, int]  # bytes per category at the peak of the step
    peak_bytes: int
    ops: list[list[int]]  # [flops, bytes moved, count] per distinct operator of one micro-batch and the optimizer step
    collectives: list[Collective]  # of one micro-batch and the optimizer step
    model_flops_per_sample: int  # fwd + bwd model FLOPs (the MFU numerator; recomputation not counted)
    samples_per_step: int
    trace_seconds: float
    traced: bool = True  # False: measured on real tensors
    frozen_encoder_bytes: int = 0  # bf16 weights of the frozen encoders each rank holds
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TracedStep:
        data = json.loads(text)
        data["collectives"] = [Collective(**c) for c in data["collectives"]]
        return cls(**data)

    def memory_at(self, ranks: int) -> dict[str, float]:
        """Bytes per category per rank at `ranks` ranks (sharded categories rescaled), frozen encoders included."""
        shards = self.world_size // self.dp_replicate  # ranks one copy of the states is sharded over
        new_shards = max(ranks // self.dp_replicate, 1)
        out = {k: v * shards / new_shards if k in SHARDED else float(v) for k, v in self.memory.items()}
        out["frozen_encoders"] = float(self.frozen_encoder_bytes)
        return out

    def total_at(self, ranks: int) -> float:
        return sum(self.memory_at(ranks).values())


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    communication_s: float
    step_s: float  # one optimizer step: micro-batches x max(compute, communication)
    mfu: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.communication_s else "communication"


def _link(acc: Accelerator, group: int) -> float:
    return acc.nvlink_bytes_per_s if group <= acc.nvlink_domain else acc.network_bytes_per_s


def step_time(step: TracedStep, acc: Accelerator, ranks: int | None = None) -> StepTime:
    """Roofline time of one optimizer step per rank at `ranks` ranks (default: the traced count)."""
    ranks = ranks or step.world_size
    compute = sum(n * max(f / acc.peak_bf16_flops, b / acc.hbm_bytes_per_s) for f, b, n in step.ops)
    comm = 0.0
    for c in step.collectives:
        group = ranks if c.group == step.world_size else c.group
        if group <= 1:
            continue
        factor = 2 if c.name.startswith("allreduce") else 1
        comm += c.count * factor * c.bytes * (group - 1) / group / _link(acc, group)
    per_micro_batch = max(compute, comm)
    total = per_micro_batch * step.grad_accumulation
    samples_per_rank = step.micro_batch * step.grad_accumulation
    mfu = step.model_flops_per_sample * samples_per_rank / total / acc.peak_bf16_flops if total else 0.0
    return StepTime(compute * step.grad_accumulation, comm * step.grad_accumulation, total, mfu)


def fewest_gpus(step: TracedStep, acc: Accelerator, limit: int = 4096) -> int | None:
    """Fewest ranks (a multiple of dp_replicate) whose per-rank memory fits HEADROOM of the device; None if none."""
    return fewest_ranks(step, HEADROOM * acc.memory_gib * GIB, limit)


def fewest_ranks(step: TracedStep, budget: float, limit: int = 4096) -> int | None:
    """Fewest ranks (a multiple of dp_replicate) whose per-rank memory is at most `budget` bytes; None if none."""
    return next((n for n in range(step.dp_replicate, limit + 1, step.dp_replicate) if step.total_at(n) <= budget),
                None)


def largest_micro_batch(step: TracedStep, acc: Accelerator, ranks: int) -> int:
    """The largest micro-batch whose memory fits at `ranks` ranks, derived (not traced): activations and
    temporaries grow with the micro-batch in proportion, the rest does not. 0: not even one sample fits."""
    memory = step.memory_at(ranks)
    per_sample = (memory["activations"] + memory["temporaries"]) / step.micro_batch
    fixed = sum(memory.values()) - per_sample * step.micro_batch
    return max(int((HEADROOM * acc.memory_gib * GIB - fixed) // per_sample), 0)


@dataclass(frozen=True)
class RecipeTime:
    gpus: int
    grad_accumulation: int  # micro-batches per rank per step to reach the global batch
    busy_gpus: int  # ranks with a sample (more GPUs than the global batch leave some idle)
    step_s: float
    days: float
    gpu_hours: float
    fits: bool
    memory_gib: float


def recipe_time(step: TracedStep, acc: Accelerator, gpus: int, recipe: Recipe = Recipe()) -> RecipeTime:
    """The recipe on `gpus` GPUs, data parallel with the traced micro-batch: accumulation makes up the global
    batch; ranks beyond global batch / micro-batch idle (one sample is the smallest unit of work here)."""
    busy = min(gpus, max(recipe.global_batch // step.micro_batch, 1))
    accumulation = math.ceil(recipe.global_batch / (busy * step.micro_batch))
    at = dataclasses.replace(step, grad_accumulation=accumulation)
    t = step_time(at, acc, busy)
    seconds = t.step_s * recipe.steps
    memory = step.total_at(gpus)
    return RecipeTime(gpus, accumulation, busy, t.step_s, seconds / 86400, seconds * gpus / 3600,
                      memory <= HEADROOM * acc.memory_gib * GIB, memory / GIB)


def cache_key(preset: Preset, training) -> str:
    """What changes a traced step: the resolved model and sample and the training settings that shape memory
    (micro-batch, accumulation, activation checkpointing, precision, HSDP replicas). Not the rank count (memory
    at any count follows from one trace), the accelerator (the trace is in bytes and FLOPs; the roofline applies
    the accelerator) nor the data source (the trace runs on latents; `with_encoders` adds what a source needs)."""
    t = training
    key = {"arch": dataclasses.asdict(preset.arch), "sample": dataclasses.asdict(preset.sample),
           "training": [t.batch_size, t.grad_accumulation, t.activation_checkpointing, t.precision, t.dp_replicate]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


SHIPPED = Path(__file__).parent / "plans"  # traces of the shipped configs (`make generate`), for the operator image


def with_encoders(step: TracedStep, arch: WamArch, data_source: str) -> TracedStep:
    """The step with the frozen encoders a rank holds in bf16: the text encoder, and for robot video (which the
    step encodes) the VAE and CLIP."""
    names = [arch.text_encoder] + ([arch.vae, arch.image_encoder] if data_source == "lerobot" else [])
    return dataclasses.replace(step, frozen_encoder_bytes=2 * sum(FROZEN_ENCODER_PARAMS.get(n, 0) for n in names))


def user_cache() -> Path:
    return Path(os.environ.get("WAM_PLAN_CACHE", Path.home() / ".cache" / "wam" / "plans"))


def cached(key: str) -> TracedStep | None:
    """The traced step under `key`: shipped with the package, else from an earlier `wam plan` here."""
    for folder in (SHIPPED, user_cache()):
        path = folder / f"{key}.json"
        if path.is_file():
            return TracedStep.from_json(path.read_text())
    return None


def store(key: str, step: TracedStep, folder: Path | None = None) -> Path:
    path = (folder or user_cache()) / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(step.to_json())
    return path
