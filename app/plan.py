"""`wam plan`: trace a config's training step at N GPUs (wam.trainer.titan.plan, cached per config and rank
count) and show what it means on an accelerator: memory per rank by category, the collectives of a step,
roofline step time and MFU, the fewest GPUs that fit, and DreamZero's recipe on 8, 64 and 512 GPUs."""

from __future__ import annotations

import dataclasses

from rich import box
from rich.table import Table

from wam.app.console import console, human
from wam.platform.accelerators import ACCELERATORS
from wam.platform.config import WamConfig, resolve_preset
from wam.platform.errors import ConfigError
from wam.platform.plan import (
    GIB,
    HEADROOM,
    TracedStep,
    cache_key,
    cached,
    fewest_gpus,
    largest_micro_batch,
    recipe_time,
    step_time,
    store,
    with_encoders,
)

RECIPE_GPUS = (8, 64, 512)


def traced_step(cfg: WamConfig, gpus: int, *, fresh: bool = False) -> TracedStep:
    """The cached trace of this config (traced at any rank count), else a new one at `gpus` ranks (minutes for a
    14B model)."""
    if gpus % cfg.training.dp_replicate:
        raise ConfigError(f"--gpus {gpus} is not a multiple of training.dp_replicate ({cfg.training.dp_replicate})")
    preset = resolve_preset(cfg)
    key = cache_key(preset, cfg.training)
    step = None if fresh else cached(key)
    if step is None:
        from wam.trainer.titan.plan import trace

        with console.status(f"tracing one training step at {gpus} ranks (fake tensors, fake process group)"):
            step = trace(cfg, gpus)
        store(key, step)
    return with_encoders(step, preset.arch, cfg.data.source)


def plan(cfg: WamConfig, accelerator: str, gpus: int, *, fresh: bool = False) -> dict:
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"--accelerator {accelerator!r} is not known; choose one of {', '.join(ACCELERATORS)}")
    acc = ACCELERATORS[accelerator]
    step = traced_step(cfg, gpus, fresh=fresh)
    memory = step.memory_at(gpus)
    total = sum(memory.values())
    t = step_time(step, acc, gpus)
    return {
        "accelerator": accelerator, "gpus": gpus, "traced_at_gpus": step.world_size, "traced_in_s": step.trace_seconds,
        "micro_batch": step.micro_batch, "activation_checkpointing": step.activation_checkpointing,
        "compile_traced": False if cfg.training.compile else None,  # dynamo does not run under the memory tracker
        "memory_gib_per_gpu": {k: v / GIB for k, v in memory.items()} | {"total": total / GIB},
        "fits": total <= HEADROOM * acc.memory_gib * GIB, "device_gib": acc.memory_gib,
        "fewest_gpus": fewest_gpus(step, acc),
        "largest_micro_batch": largest_micro_batch(step, acc, gpus),
        "collectives": [{**dataclasses.asdict(c), "group": gpus if c.group == step.world_size else c.group}
                        for c in step.collectives],
        "step": {"compute_s": t.compute_s, "communication_s": t.communication_s, "step_s": t.step_s,
                 "mfu": t.mfu, "bound": t.bound},
        "recipe": [dataclasses.asdict(recipe_time(step, acc, n)) for n in RECIPE_GPUS],
    }


def _what_to_try(r: dict) -> str:
    """The next setting to trace when a plan does not fit (each is a `--set` away)."""
    tries = []
    if r["activation_checkpointing"] != "full":
        tries.append("--set training.activation_checkpointing=full")
    if r["micro_batch"] > 1:
        tries.append("a smaller training.batch_size")
    if r["fewest_gpus"]:
        tries.append(f"--gpus {r['fewest_gpus']}")
    return "try " + ", or ".join(tries) if tries else "no setting traced here fits this accelerator"


def show(result: dict) -> None:
    r = result
    table = Table(title=f"{r['gpus']} x {r['accelerator']}: micro-batch {r['micro_batch']}, activation "
                  f"checkpointing {r['activation_checkpointing']} (traced at {r['traced_at_gpus']} ranks in "
                  f"{r['traced_in_s']:.0f} s)",
                  show_header=False, box=box.SIMPLE)
    table.add_column(no_wrap=True)
    table.add_column()
    for key, value in r["memory_gib_per_gpu"].items():
        table.add_row(f"memory per GPU: {key.replace('_', ' ')}", f"{value:.2f} GiB")
    if r["compile_traced"] is False:
        table.add_row("training.compile", "not traced: the blocks are traced eagerly (torch.compile does not run "
                      "under torch's memory tracker); compiled blocks save less for backward, so the activations "
                      "above are an upper bound (docs/limits.md)")
    table.add_row("fits", f"{'yes' if r['fits'] else 'NO'} ({HEADROOM:.0%} of {r['device_gib']:g} GiB usable)"
                  + ("" if r["fits"] else f"; {_what_to_try(r)}"))
    table.add_row("fewest GPUs that fit", str(r["fewest_gpus"] or "none"))
    table.add_row("largest micro-batch that fits", f"{r['largest_micro_batch']} (derived: activations and temporaries "
                  "x micro-batch; `--set training.batch_size=N` traces it)")
    for c in r["collectives"]:
        table.add_row(f"collective {c['name']}", f"{c['count']} x {human(c['bytes'], 'B')} over {c['group']} ranks")
    s = r["step"]
    table.add_row("step time (roofline)", f"{s['step_s']:.2f} s ({s['bound']}-bound: compute {s['compute_s']:.2f} s, "
                  f"communication {s['communication_s']:.2f} s), MFU {s['mfu']:.0%}")
    for rec in r["recipe"]:
        table.add_row(f"recipe on {rec['gpus']} GPUs", f"{rec['days']:.1f} days, {rec['gpu_hours']:,.0f} GPU-hours "
                      f"({rec['grad_accumulation']} micro-batches/step on {rec['busy_gpus']} busy GPUs, "
                      f"{rec['step_s']:.1f} s/step, {rec['memory_gib']:.1f} GiB/GPU, "
                      f"{'fits' if rec['fits'] else 'does NOT fit'})")
    console.print(table)
