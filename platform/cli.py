"""The `wam` command line: the single entry point for researchers, CI and the images.

Commands needing the model (demo, train, ...) import wam.trainer lazily, so `wam --help` and the
torch-free commands work in the operator image too.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from wam.platform.accounting import GIB, count_flops, count_params, estimate_memory, min_gpus, training_layout
from wam.platform.config import load_config, resolve_preset
from wam.platform.errors import UserError
from wam.platform.presets import PRESETS

app = typer.Typer(help="WAM Platform: train, quantize and serve DreamZero-style World Action Models.",
                  no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="Model presets: architecture, parameters, FLOPs and memory.", no_args_is_help=True)
app.add_typer(model_app, name="model")
console = Console()
err_console = Console(stderr=True)


@contextmanager
def user_errors():
    """Turn configuration mistakes into a one-line error and exit code 2, not a traceback."""
    try:
        yield
    except (UserError, FileNotFoundError) as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None


def _human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()


@model_app.command("list")
def model_list() -> None:
    """The model presets."""
    table = Table("preset", "trained params", "description")
    for preset in PRESETS.values():
        table.add_row(preset.name, _human(count_params(preset.arch).total), preset.description)
    console.print(table)


@model_app.command("info")
def model_info(
    preset: str = typer.Argument(..., help=f"one of: {', '.join(PRESETS)}"),
    config: Path | None = typer.Option(None, help="YAML config whose model/sample sections to apply"),
    gpus: int = typer.Option(8, min=1, help="GPUs for the memory estimate (FSDP over all of them)"),
    gpu_memory: float = typer.Option(80.0, help="memory per GPU in GiB"),
    batch_per_gpu: int = typer.Option(1, min=1),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Parameters, FLOPs per training sample and a per-GPU memory estimate of a preset."""
    with user_errors():
        cfg = load_config(config, [f"model.preset={preset}"])
        resolved = resolve_preset(cfg)
    arch, sample = resolved.arch, resolved.sample
    params = count_params(arch)
    flops = count_flops(arch, sample)
    layout = training_layout(arch, sample)
    memory = {ac: estimate_memory(arch, sample, gpus, batch_per_gpu=batch_per_gpu, activation_checkpointing=ac)
              for ac in (True, False)}
    fewest = min_gpus(arch, sample, gpu_memory, batch_per_gpu=batch_per_gpu)
    info = {
        "preset": preset,
        "arch": dataclasses.asdict(arch),
        "sample": dataclasses.asdict(sample),
        "params": {**dataclasses.asdict(params), "total": params.total},
        "tokens_per_sample": layout.length,
        "flops_per_sample": {"forward": flops.forward, "training": flops.training, "linear": flops.linear,
                             "self_attention": flops.self_attention, "cross_attention": flops.cross_attention,
                             "attention_density": flops.self_attention / flops.self_attention_dense},
        "memory_gib_per_gpu": {"gpus": gpus, "with_activation_checkpointing": memory[True].total / GIB,
                               "without_activation_checkpointing": memory[False].total / GIB},
        "min_gpus": {"gpu_memory_gib": gpu_memory, "count": fewest},
    }
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(title=f"{preset}: {resolved.description}", show_header=False)
    table.add_row("trained parameters", f"{params.total:,} ({_human(params.total)})")
    table.add_row("  blocks / embeddings / head / WAM heads",
                  " / ".join(_human(x) for x in (params.blocks, params.embeddings, params.head, params.wam_heads)))
    table.add_row("sample", f"{sample.num_chunks} chunks x ({sample.frames_per_chunk} latent frames + "
                  f"{sample.actions_per_chunk} actions), latent {sample.latent_height}x{sample.latent_width}")
    table.add_row("tokens per sample", f"{layout.length:,}")
    table.add_row("FLOPs per sample (fwd+bwd)", _human(flops.training, "FLOP"))
    table.add_row("  attention density", f"{flops.self_attention / flops.self_attention_dense:.1%} of dense pairs")
    for ac, est in memory.items():
        table.add_row(f"memory per GPU, {gpus} GPUs, AC {'on' if ac else 'off'}",
                      f"{est.total / GIB:.1f} GiB (states {est.sharded_states / GIB:.1f}, encoders "
                      f"{est.frozen_encoders / GIB:.1f}, activations {est.activations / GIB:.1f})")
    table.add_row(f"fewest {gpu_memory:g} GiB GPUs (AC on)", str(fewest) if fewest else "does not fit")
    console.print(table)


@model_app.command("import")
def model_import(
    checkpoint: str = typer.Argument(..., help="Wan2.1 / DreamZero DiT: .safetensors, sharded index, .pth, a folder, "
                                               "or an fsspec URI"),
    preset: str = typer.Option(..., help="the preset the checkpoint belongs to"),
    out: Path = typer.Option(..., help="safetensors file to write: the initial weights of a training run"),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float32"),
) -> None:
    """Import a published Wan2.1 / DreamZero checkpoint into a preset; new WAM heads are initialised."""
    from wam.trainer.model.export import import_to_safetensors  # needs the trainer extra

    with user_errors():
        cfg = load_config(None, [f"model.preset={preset}"])
        report = import_to_safetensors(resolve_preset(cfg), checkpoint, out, dtype)
    console.print(f"{report.summary()}; wrote {out}")


@app.command()
def demo(
    steps: int = typer.Option(4, min=1, help="denoising steps per chunk"),
    seed: int = typer.Option(0),
) -> None:
    """Chunk-wise closed-loop inference of the tiny preset on a synthetic scene, with a KV cache."""
    from wam.trainer.demo import run_demo  # needs the trainer extra

    run_demo(console, steps=steps, seed=seed)


def main() -> None:
    app()
