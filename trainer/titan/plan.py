"""Trace one real training step of a config at N ranks without the GPUs (`wam plan`), or measure it for real.

The step is the trainer's own: the model from the torchtitan config `trainer_config` builds, `parallelize_wam`
(FSDP2/HSDP, activation checkpointing), the optimizer torchtitan builds, `WamTrainer.forward_backward_step`
(noise, flow loss, backward), torchtitan's gradient clipping and the optimizer step. Traced, every tensor is a
fake tensor and the process group is torch's fake one of N ranks (this process is rank 0), so a 14B model at
512 ranks needs no memory; measured (`fake=False`), the same step runs on real tensors in a real process group.
Either way torch's FSDPMemTracker records the peak per category, a dispatch recorder the collectives and, per
operator, FLOPs and bytes moved (the roofline's inputs). Two steps run; the second, with optimizer states, is
the one reported, as torchtitan's own memory estimation does.

Where the trace differs from a GPU run: attention is the platform's block-sparse kernel op (model.attention=
triton) whatever the config says: its fake implementation gives the fused kernel's outputs (the attention output
and its log-sum-exp), which is also all flex_attention keeps, and no kernel runs (flex itself has no backward on
CPU tensors, and torch's memory tracker does not pass its higher-order op); its FLOPs are SDPA's on the tiles the
mask allows. Blocks run eagerly (dynamo does not run under the memory tracker, a dispatch mode), and zeros in
the shape of cached prompt features stand in for the text encoder. On a GPU machine the model, its inputs and
the layout constants are on the GPU; measured there, the allocator's peak is reported too.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections import Counter
from contextlib import ExitStack, nullcontext

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from wam.platform.accounting import count_flops
from wam.platform.config import WamConfig, resolve_preset
from wam.platform.plan import CATEGORIES, Collective, TracedStep

if not torch.cuda.is_available():
    from wam.trainer.titan import cpu  # noqa: F401

from torchtitan.distributed import ParallelDims  # noqa: E402
from torchtitan.distributed import utils as dist_utils  # noqa: E402

from wam.trainer.flow import LossWeighting  # noqa: E402
from wam.trainer.kernels import op as _attention_ops  # noqa: E402, F401  (registers the block-sparse attention ops)
from wam.trainer.titan.config_registry import trainer_config  # noqa: E402
from wam.trainer.titan.trainer import WamTrainer  # noqa: E402
from wam.trainer.tracing import LayoutConstants  # noqa: E402

# FSDPMemTracker's categories -> the plan's.
_CATEGORY = {"Sharded Param": "parameters", "Unsharded Param": "gathered_parameters", "Buffer": "parameters",
             "Sharded Grad": "gradients", "Unsharded Grad": "gradient_buffers", "Activation": "activations",
             "Temp": "temporaries", "All Gather": "gathered_parameters", "Reduce Scatter": "gradient_buffers",
             "OptState": "optimizer_state", "Inputs": "activations"}
# The block-sparse attention op's FLOPs: SDPA's (torch's formulas, shapes (batch, heads, tokens, head dim)) on the
# tiles the mask allows.
_ATTENTION_FLOPS = {
    torch.ops.wam.block_sparse_attention: lambda q, k, v, *_: sdpa_flop_count(*(t.transpose(1, 2).shape
                                                                                for t in (q, k, v))),
    torch.ops.wam.block_sparse_attention_backward: lambda grad, _, q, k, v, *__: sdpa_backward_flop_count(
        *(t.transpose(1, 2).shape for t in (grad, q, k, v))),
}


_NOT_COLLECTIVES = ("barrier", "monitored_barrier_", "wait_tensor")

def _group_size(args) -> int:
    """Ranks of a collective's group: a ProcessGroup object (c10d ops) or a group name (functional ones)."""
    for arg in tree_leaves(args):
        if isinstance(arg, torch.ScriptObject):
            return dist.ProcessGroup.unbox(arg).size()
        if isinstance(arg, str):
            return _resolve_process_group(arg).size()
    return dist.get_world_size()


class _StepRecorder(TorchDispatchMode):
    """Per operator FLOPs (torch's FLOP formulas) and bytes read + written, and every collective with its bytes."""

    def __init__(self, attention_density: float):
        super().__init__()
        self.attention_density = attention_density
        self.ops: Counter[tuple[int, int]] = Counter()  # (flops, bytes) -> count
        self.collectives: Counter[tuple[str, int, int]] = Counter()  # (name, bytes, group size) -> count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in ("c10d", "_c10d_functional") and func._opname not in _NOT_COLLECTIVES:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.collectives[(func._opname.strip("_"), max(t.nbytes for t in tensors), _group_size(args))] += 1
            return out
        flops = 0
        if func.overloadpacket in flop_registry:
            flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        elif func.overloadpacket in _ATTENTION_FLOPS:
            flops = int(_ATTENTION_FLOPS[func.overloadpacket](*args) * self.attention_density)
        moved = 0 if func.is_view else sum(t.nbytes for t in tree_leaves((args, kwargs, out))  # views move nothing
                                           if isinstance(t, torch.Tensor) and t.device.type != "meta")
        self.ops[(flops, moved)] += 1
        return out


def plan_config(cfg: WamConfig, gpus: int, attention: str) -> WamConfig:
    """The config as a GPU job of `gpus` ranks would run it (bf16 parameters), on latents (robot video's encoders
    are added by the plan: wam.platform.plan.with_encoders), with this attention kernel."""
    t = dataclasses.replace(cfg.training, processes=gpus, nodes=1,
                            precision="bfloat16" if cfg.training.precision == "auto" else cfg.training.precision)
    return dataclasses.replace(cfg, training=t, model=dataclasses.replace(cfg.model, attention=attention),
                               data=dataclasses.replace(cfg.data, source="synthetic", datasets=[]))


def _device() -> torch.device:
    """Where torchtitan puts the model: this rank's GPU, else the CPU (fake tensors live there too)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def run_step(cfg: WamConfig, *, fake: bool, steps: int = 2) -> TracedStep:
    """The training step of `cfg` on this rank of the initialised process group: traced on fake tensors, or run."""
    device = _device()
    config = trainer_config(cfg)
    config.compile.enable = False  # traced eagerly (see the module docstring)
    world = dist.get_world_size()
    parallel_dims = ParallelDims.from_config(config.parallelism, world)
    parallel_dims.build_mesh()
    preset = resolve_preset(cfg)
    flops = count_flops(preset.arch, preset.sample)
    batch_mesh = parallel_dims.get_optional_mesh("batch")
    loader = config.dataloader.build(dp_world_size=batch_mesh.size() if batch_mesh is not None else 1,
                                     dp_rank=batch_mesh.get_local_rank() if batch_mesh is not None else 0,
                                     tokenizer=None, seq_len=config.training.seq_len,
                                     local_batch_size=config.training.local_batch_size)
    input_dict, labels = next(iter(loader))
    input_dict = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in input_dict.items()}
    labels = labels.to(device)
    weighting = LossWeighting(cfg.flow.loss_weighting, cfg.flow.shift)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    if mode is not None:
        input_dict = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in input_dict.items()}
        labels = mode.from_tensor(labels)
    started = time.monotonic()
    with mode if mode is not None else nullcontext():
        spec = config.model_spec
        spec.model.update_from_config(config=config)
        with torch.device("meta"):
            model = spec.model.build()
        model = spec.parallelize_fn(model, parallel_dims=parallel_dims, training=config.training,
                                    parallelism=config.parallelism, compile_config=config.compile,
                                    ac_config=config.activation_checkpoint, dump_folder=str(cfg.run_dir))
        model.to_empty(device=device)
        if not fake:
            with torch.no_grad():
                model.init_weights(buffer_device=None)
        model.train()
        optimizers = config.optimizer.build(model_parts=[model])
        trainer = _step_owner(cfg, config, parallel_dims, model, weighting, preset.arch, device)
        tracker = FSDPMemTracker(mod=model, optm=optimizers.optimizers[0])
        tracker.track_inputs((input_dict,))
        recorder = _StepRecorder(flops.self_attention / flops.self_attention_dense)
        for step in range(1, steps + 1):
            with ExitStack() as stack:
                stack.enter_context(tracker)
                if step == steps:
                    stack.enter_context(recorder)
                if fake:
                    stack.enter_context(LayoutConstants())
                optimizers.zero_grad()
                trainer.step = step
                # One micro-batch: the plan multiplies its time by the accumulation (memory does not grow with it).
                trainer.forward_backward_step(input_dict=input_dict, labels=labels, global_valid_tokens=torch.tensor(1))
                dist_utils.clip_grad_norm_(list(model.parameters()), config.training.max_norm, foreach=True)
                optimizers.step()
                if step < steps:
                    tracker.reset_mod_stats()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    memory = dict.fromkeys(CATEGORIES, 0)
    for key, value in peak.items():
        if key != "Total":
            memory[_CATEGORY[key.value]] += value
    return TracedStep(
        world_size=world, micro_batch=config.training.local_batch_size,
        grad_accumulation=trainer.gradient_accumulation_steps, dp_replicate=cfg.training.dp_replicate,
        activation_checkpointing=cfg.training.activation_checkpointing, memory=memory,
        peak_bytes=int(peak["Total"]), ops=[[f, b, n] for (f, b), n in sorted(recorder.ops.items())],
        collectives=[Collective(name, size, group, count) for (name, size, group), count
                     in sorted(recorder.collectives.items())],
        model_flops_per_sample=flops.training, samples_per_step=config.training.local_batch_size
        * trainer.gradient_accumulation_steps * world, trace_seconds=round(time.monotonic() - started, 1),
        traced=fake)


def _step_owner(cfg, config, parallel_dims, model, weighting, arch, device: torch.device) -> WamTrainer:
    """The state `WamTrainer.forward_backward_step` reads, without the rest of a trainer (checkpointer, metrics,
    MLflow, data workers). Prompt features come as from the trainer's cache (the text encoder is frozen and its
    outputs are cached across steps); their size is the encoder's output."""
    trainer = WamTrainer.__new__(WamTrainer)
    trainer.config, trainer.wam, trainer.device = config, cfg, device
    trainer.model_parts, trainer.weighting, trainer.parallel_dims = [model], weighting, parallel_dims
    trainer.step, trainer.microbatch, trainer.ntokens_seen = 0, (0, 0), 0
    batch_mesh, loss_mesh = parallel_dims.get_optional_mesh("batch"), parallel_dims.get_optional_mesh("loss")
    trainer.dp_rank = batch_mesh.get_local_rank() if batch_mesh is not None else 0
    trainer.loss_group = loss_mesh.get_group() if loss_mesh is not None else None
    trainer.gradient_accumulation_steps = cfg.training.grad_accumulation
    trainer.window = torch.zeros(5, device=device)
    trainer.train_context = dist_utils.get_spmd_context(parallel_dims=parallel_dims)
    trainer._encode_prompts = lambda prompts: torch.zeros(len(prompts), arch.text_len, arch.text_dim, device=device)
    return trainer


def trace(cfg: WamConfig, gpus: int, attention: str = "triton") -> TracedStep:
    """The step of `cfg` on `gpus` ranks, traced in this process as rank 0 of a fake process group (`attention`:
    sdpa to compare with a real CPU run, which cannot run the block-sparse kernels)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        with tempfile.TemporaryDirectory(prefix="wam-plan-") as scratch:  # the trainer's run folder: nothing to keep
            return run_step(dataclasses.replace(plan_config(cfg, gpus, attention), output_dir=scratch), fake=True)
    finally:
        dist.destroy_process_group()


def measure(cfg: WamConfig, attention: str = "sdpa") -> TracedStep:
    """The same step on real tensors in this torchrun job's process group (gloo on CPUs, SDPA attention; NCCL on
    GPUs, which also report the allocator's peak, torch.cuda.max_memory_allocated, as extra["device_peak_bytes"])."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.reset_peak_memory_stats()
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        step = run_step(plan_config(cfg, dist.get_world_size(), attention), fake=False)
    finally:
        dist.destroy_process_group()
    if cuda:
        step.extra["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    return step


if __name__ == "__main__":  # torchrun --nproc_per_node N -m wam.trainer.titan.plan CONFIG OUT.json [key=value ...]
    import sys
    from pathlib import Path

    from wam.platform.config import load_config

    measured = measure(load_config(sys.argv[1], sys.argv[3:]))
    if dist.is_available() and int(os.environ.get("RANK", "0")) == 0:
        Path(sys.argv[2]).write_text(measured.to_json())
