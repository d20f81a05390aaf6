"""`wam plan`: trace a config's training step at N GPUs (wam.trainer.titan.plan, cached per config and rank
count) and show what it means on an accelerator: memory per rank by category, the collectives of a step,
roofline step time and MFU, the fewest GPUs that fit, and DreamZero's recipe on 8, 64 and 512 GPUs.
`wam plan --serve`: the serving roofline of the config's served sampler on one device
(wam.platform.serving_roofline): chunk latency at best for 1..max_batch robots, what batching them can gain,
and how many sessions' KV caches fit."""

from __future__ import annotations

import dataclasses

from rich import box
from rich.table import Table

from wam.app.console import console, human
from wam.platform.accelerators import ACCELERATORS
from wam.platform.config import WamConfig, resolve_preset, served_sampler
from wam.platform.data_contract import control_rates
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
from wam.platform.serving_roofline import (
    ServingLoad,
    check_compute,
    chunk_time,
    encoder_bytes,
    kv_cache_bytes,
    rows_per_device,
    sessions_that_fit,
    weight_bytes,
)

RECIPE_GPUS = (8, 64, 512)
SERVING_SESSIONS = (1, 4, 8)  # robots served together in the table (and serving.max_batch)


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


DROID_HZ = 15.0  # the control rate assumed where the config's robot data cannot be read


def serving_plan(cfg: WamConfig, accelerator: str, control_hz: float | None = None) -> dict:
    """control_hz: the robots' control rate; None: the rates the config's robot data was recorded at (the fastest:
    its robots' chunks are the shortest), else DROID's."""
    import torch

    from wam.trainer.flow import transformer_passes
    from wam.trainer.serve.memory import serving_memory

    if accelerator not in ACCELERATORS:
        raise ConfigError(f"--accelerator {accelerator!r} is not known; choose one of {', '.join(ACCELERATORS)}")
    acc = ACCELERATORS[accelerator]
    preset = resolve_preset(cfg)
    arch, sample = preset.arch, preset.sample
    sampler = served_sampler(cfg)
    load = ServingLoad(transformer_passes(sampler), rows_per_device(sampler, cfg.serving.devices))
    compute = acc.serving_compute if cfg.serving.compute == "auto" else cfg.serving.compute
    check_compute(acc, compute)
    fixed = weight_bytes(arch, compute) + encoder_bytes(arch)
    compiled = cfg.serving.compile != "off"  # as wam serve decides on a GPU: compiled, with CUDA graphs
    per_session = kv_cache_bytes(arch, sample, load.rows)
    # what else serving takes (the model and the encoders in bf16 on a GPU; fp8 and nvfp4 compute in bf16 between
    # their matmuls), traced on fake tensors as `wam serve` counts it
    with console.status("tracing a batched forward and the VAE's work (fake tensors)"):
        memory = serving_memory(arch, sample, load.rows, torch.bfloat16, torch.bfloat16)
    fits = sessions_that_fit(HEADROOM * acc.memory_gib * GIB - fixed, per_session, max_batch=cfg.serving.max_batch,
                             compiled=compiled, blocks=arch.num_layers, held=memory.stream,
                             activations=memory.activations, transient=memory.request)
    paths = [compute] + ([] if compute == "bf16-dequantized" else ["bf16-dequantized"])
    sessions = sorted({*SERVING_SESSIONS, cfg.serving.max_batch})
    rows = []
    for path in paths:
        times = {n: chunk_time(arch, sample, acc, load, n, path) for n in sessions}
        one = times[1]
        rows += [{"compute": path, "sessions": n, "chunk_s": t.seconds, "chunks_per_s": t.chunks_per_s,
                  "batching_gain": t.chunks_per_s / one.chunks_per_s, "latency_over_lone": t.seconds / one.seconds,
                  "bound": t.bound} for n, t in times.items()]
    # With asynchronous execution a robot asks for its next chunk as it starts this one: the chunk must be denoised
    # before this one's actions run out. The most robots one device keeps fed so, batched, at the chip's path:
    if control_hz is not None:
        control_from = "--control-hz"
    elif rates := control_rates(cfg):
        control_hz = max(rates.values())
        control_from = "the data's: " + ", ".join(f"{name} {hz:g} Hz" for name, hz in rates.items())
    else:
        control_hz, control_from = DROID_HZ, "DROID's (no robot data readable from here; --control-hz sets it)"
    period = sample.actions_per_chunk / control_hz
    limits = {"serving.max_batch": cfg.serving.max_batch, "memory": fits,
              "latency": next((n - 1 for n in range(1, cfg.serving.max_sessions + 2)
                               if chunk_time(arch, sample, acc, load, n, compute).seconds > period),
                              cfg.serving.max_sessions + 1)}
    fed_by = min(limits, key=limits.get)
    return {
        "accelerator": accelerator, "compute": compute, "chunks_per_window": sample.num_chunks,
        "devices": cfg.serving.devices,
        "control_hz": control_hz, "control_hz_from": control_from, "chunk_period_s": period, "robots_kept_fed": limits[fed_by],
        "robots_kept_fed_limited_by": fed_by,
        "sampler": {"solver": sampler.solver, "steps": sampler.steps, "dit_cache": sampler.dit_cache,
                    "transformer_passes": load.passes, "rows_per_session": load.rows},
        "max_batch": cfg.serving.max_batch,
        "memory_gib": {"weights": weight_bytes(arch, compute) / GIB, "frozen_encoders": encoder_bytes(arch) / GIB,
                       "per_session": per_session / GIB, "vae_stream_per_session": memory.stream / GIB,
                       "activations_per_batched_session": memory.activations / GIB, "request": memory.request / GIB},
        "compiled": compiled,
        "sessions_that_fit": fits,
        "device_gib": acc.memory_gib,
        "rows": rows,
    }


def _seconds(t: float) -> str:
    return f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms" if t >= 1e-3 else f"{t * 1e6:.3g} µs"


def show_serving(result: dict) -> None:
    r, s = result, result["sampler"]
    devices = f"one {r['accelerator']}" if r["devices"] == 1 else f"two {r['accelerator']}s"
    console.print(f"serving on {devices} ({r['compute']} matmuls): {s['solver']} {s['steps']} steps, "
                  f"{s['transformer_passes']} transformer passes x {s['rows_per_session']} rows per chunk "
                  f"(DiT cache {s['dit_cache']})" + (", guidance in parallel: per device of 2" if r["devices"] == 2 else "")
                  + f", chunks averaged over a {r['chunks_per_window']}-chunk context window")
    m = r["memory_gib"]
    console.print(f"memory: weights {m['weights']:.1f} GiB, frozen encoders {m['frozen_encoders']:.1f} GiB, "
                  f"KV cache {m['per_session']:.2f} GiB per session"
                  + (" (compiled: all in one pool, and a block's share of a batch gathered per forward)"
                     if r["compiled"] else "")
                  + f" and its VAE stream {m['vae_stream_per_session']:.2f} GiB, a batched forward "
                  f"{m['activations_per_batched_session']:.2f} GiB per session, a request's own work {m['request']:.2f} GiB"
                  + f": {r['sessions_that_fit']} sessions fit ({HEADROOM:.0%} of {r['device_gib']:g} GiB)"
                  + ("" if r["sessions_that_fit"] >= r["max_batch"] else
                     f"; serving.max_batch {r['max_batch']} does NOT fit"))
    console.print("the least time per chunk: FLOPs at peak, bytes at HBM bandwidth")
    table = Table(box=box.SIMPLE)
    for column in ("compute", "robots", "chunk", "chunks/s", "gain", "latency", "bound"):
        table.add_column(column, justify="left" if column in ("compute", "bound") else "right", no_wrap=True)
    for row in r["rows"]:
        rate = row["chunks_per_s"]
        table.add_row(row["compute"], str(row["sessions"]), _seconds(row["chunk_s"]),
                      f"{rate:.3g}" if rate < 1e3 else human(rate), f"{row['batching_gain']:.2f}x",
                      f"{row['latency_over_lone']:.2f}x", row["bound"])
    console.print(table)
    console.print(f"at {r['control_hz']:g} Hz ({r['control_hz_from']}) a robot runs a chunk in "
                  f"{r['chunk_period_s']:.2f} s: "
                  f"{devices} keep{'s' if r['devices'] == 1 else ''} at most {r['robots_kept_fed']} robot(s) fed ({r['compute']}; the next "
                  f"chunk denoised while this one runs), limited by {r['robots_kept_fed_limited_by']}")
    console.print("robots: chunks denoised together; chunk: the time per chunk; gain: their throughput over serving "
                  "them one at a time; latency: per chunk, over a lone robot's")
    console.print("a bound, not a prediction: launches, Python and imperfect kernels only add time "
                  "(benchmarks/serve.py measures what runs)")


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
