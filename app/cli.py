"""The `wam` command line: the single entry point for researchers, CI and the images.

Every command parses its options, calls one function of the layer below and shows the result. Commands
needing the model (train's processes, eval, serve, ...) import wam.trainer inside the command, and the
cluster commands wam.operators, so `wam --help` and the torch-free commands work in the operator image too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from wam.app import local_training
from wam.app.console import Options, console, err_console, fail, human, user_errors
from wam.app.pipeline import run_pipeline, show_replay
from wam.platform import plan
from wam.platform.accounting import GIB, count_flops, count_params, estimate_memory, min_gpus, training_layout
from wam.platform.checkpoints import check_weight_dtype, require_quantized_model, require_training_checkpoint
from wam.platform.config import ACTIVATION_CHECKPOINTING, PROTOCOLS, load_config, resolve_preset
from wam.platform.errors import ConfigError
from wam.platform.presets import PRESETS

app = typer.Typer(help="WAM Platform: train, quantize and serve DreamZero-style World Action Models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)


@app.callback()
def options(debug: bool = typer.Option(False, "--debug", help="show tracebacks of user errors too")) -> None:
    Options.debug = debug
model_app = typer.Typer(help="Model presets: architecture, parameters, FLOPs and memory.", no_args_is_help=True)
app.add_typer(model_app, name="model")
data_app = typer.Typer(help="Robot datasets (LeRobot v2.1 / v3.0): synthesize, inspect, validate, stats.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
sim_app = typer.Typer(help="Physics simulation (Meta-World): record scripted demonstrations.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")


@model_app.command("list")
def model_list() -> None:
    """The model presets."""
    table = Table("preset", "trained params", "description", box=box.SIMPLE_HEAD)
    for preset in PRESETS.values():
        table.add_row(preset.name, human(count_params(preset.arch).total), preset.description)
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
    # Traced steps of this model at this micro-batch (`wam plan`, shipped or cached) replace the static estimate.
    traced = {ac: plan.with_encoders(step, arch, cfg.data.source) for ac in ACTIVATION_CHECKPOINTING
              if (step := plan.cached(plan.cache_key(resolved, dataclasses.replace(
                  cfg.training, batch_size=batch_per_gpu, activation_checkpointing=ac)))) is not None}
    if traced:
        fewest = min(filter(None, (plan.fewest_ranks(step, plan.HEADROOM * gpu_memory * GIB)
                                   for step in traced.values())), default=None)
    info = {
        "preset": preset,
        "arch": dataclasses.asdict(arch),
        "sample": dataclasses.asdict(sample),
        "vae": {"name": arch.vae, **dataclasses.asdict(arch.vae_layout)},
        "canvas": list(sample.canvas(arch)),
        "params": {**dataclasses.asdict(params), "total": params.total},
        "tokens_per_sample": layout.length,
        "flops_per_sample": {"forward": flops.forward, "training": flops.training, "linear": flops.linear,
                             "self_attention": flops.self_attention, "cross_attention": flops.cross_attention,
                             "attention_density": flops.self_attention / flops.self_attention_dense},
        "memory_gib_per_gpu": {"gpus": gpus, "with_activation_checkpointing": memory[True].total / GIB,
                               "without_activation_checkpointing": memory[False].total / GIB},
        "traced_memory_gib_per_gpu": {ac: step.total_at(gpus) / GIB for ac, step in traced.items()},
        "min_gpus": {"gpu_memory_gib": gpu_memory, "count": fewest, "by": "traced step" if traced else "static estimate"},
    }
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(title=f"{preset}: {resolved.description}", show_header=False, box=box.SIMPLE)
    table.add_column(no_wrap=True)
    table.add_column()
    table.add_row("trained parameters", f"{params.total:,} ({human(params.total)})")
    for label, count in (("blocks", params.blocks), ("embeddings", params.embeddings), ("output head", params.head),
                         ("WAM heads", params.wam_heads)):
        table.add_row(f"  {label}", human(count))
    table.add_row("sample", f"{sample.num_chunks} chunks of {sample.frames_per_chunk} latent frames + "
                  f"{sample.actions_per_chunk} actions")
    vae, (height, width) = arch.vae_layout, sample.canvas(arch)
    table.add_row("  latent frame", f"{sample.latent_height}x{sample.latent_width} ({height}x{width} px canvas)")
    table.add_row("VAE", f"{arch.vae}: {vae.latent_channels} channels, {vae.spatial_stride}x space, "
                  f"{vae.temporal_stride}x time (first frame alone)")
    table.add_row("tokens per sample", f"{layout.length:,}")
    table.add_row("FLOPs per sample (fwd+bwd)", human(flops.training, "FLOP"))
    table.add_row("  attention density", f"{flops.self_attention / flops.self_attention_dense:.1%} of dense pairs")
    for ac, step in traced.items():
        parts = " / ".join(f"{v / GIB:.1f}" for v in step.memory_at(gpus).values())
        table.add_row(f"memory per GPU, {gpus} GPUs, AC {ac} (traced)", f"{step.total_at(gpus) / GIB:.1f} GiB")
        table.add_row(f"  {' / '.join(k.replace('_', ' ') for k in step.memory_at(gpus))}", f"{parts} GiB")
    for ac, est in memory.items():
        table.add_row(f"memory per GPU, {gpus} GPUs, AC {'on' if ac else 'off'} (static estimate)",
                      f"{est.total / GIB:.1f} GiB")
        table.add_row("  states / encoders / activations", f"{est.sharded_states / GIB:.1f} / "
                      f"{est.frozen_encoders / GIB:.1f} / {est.activations / GIB:.1f} GiB")
    table.add_row(f"fewest {gpu_memory:g} GiB GPUs ({info['min_gpus']['by']})", str(fewest) if fewest else "does not fit")
    console.print(table)


@app.command("plan")
def plan_command(
    config: Path = typer.Argument(..., help="the run's YAML config (model, sample, training sections are traced)"),
    accelerator: str = typer.Option(..., help="h100 | h200 | gb200"),
    gpus: int | None = typer.Option(None, min=1, help="ranks to trace (FSDP over all of them; HSDP with "
                                    "training.dp_replicate); required unless --serve"),
    serve: bool = typer.Option(False, "--serve", help="plan serving on one device instead: chunk latency at best for "
                               "1..max_batch robots, what batching them gains, how many sessions fit"),
    control_hz: float | None = typer.Option(None, min=0.1, help="--serve: the robots' control rate (a chunk of "
                                            "actions_per_chunk actions runs at it; default: the rate the config's "
                                            "robot data was recorded at, the fastest of several, else DROID's 15 Hz)"),
    overrides: list[str] = typer.Option([], "--set", help="config override key=value (repeatable)"),
    fresh: bool = typer.Option(False, help="trace again even if this config and rank count were traced before"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Trace one real training step at N GPUs without them: memory per GPU, collectives, step time, MFU, fit,
    fewest GPUs, and DreamZero's recipe (batch 128, 100K steps) on 8, 64 and 512 GPUs. With --serve: the serving
    roofline of the config's served sampler on one device."""
    from wam.app import plan

    with user_errors():
        cfg = load_config(config, overrides)
        if serve:
            result = plan.serving_plan(cfg, accelerator, control_hz)
        elif gpus is None:
            raise ConfigError("--gpus is required to plan training (the ranks to trace), e.g. --gpus 64; "
                              "or --serve to plan serving on one device")
        else:
            result = plan.plan(cfg, accelerator, gpus, fresh=fresh)
    if as_json:
        console.print_json(json.dumps(result))
    elif serve:
        plan.show_serving(result)
    else:
        plan.show(result)


@model_app.command("import")
def model_import(
    checkpoint: str = typer.Argument(..., help="Wan2.1 / DreamZero DiT: .safetensors, sharded index, .pth, a folder, "
                                               "or an fsspec URI"),
    preset: str = typer.Option(..., help="the preset the checkpoint belongs to"),
    out: Path = typer.Option(..., help="safetensors file to write: the initial weights of a training run"),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float32"),
) -> None:
    """Import a published Wan2.1 / DreamZero checkpoint into a preset; new WAM heads are initialised."""
    with user_errors():
        check_weight_dtype(dtype)
        cfg = load_config(None, [f"model.preset={preset}"])
        from wam.trainer.export import import_to_safetensors  # needs the trainer extra

        report = import_to_safetensors(resolve_preset(cfg), checkpoint, out, dtype)
    console.print(f"{report.summary()}; wrote {out}")


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Path = typer.Argument(..., help="the run's YAML config"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. training.steps=100"),
    launcher: str | None = typer.Option(None, help="torchrun | ray (Ray Train; restarts failed workers); "
                                                   "default: the config's training.launcher"),
) -> None:
    """Train locally: training.processes processes (FSDP2 over gloo on CPU, NCCL on GPUs), started by torchrun
    or by Ray Train.

    Resumes from the newest complete checkpoint of the run if there is one."""
    with user_errors():
        cfg = load_config(config, [*(overrides or []), *([f"training.launcher={launcher}"] if launcher else [])])
    local_training.run(cfg)
    local_training.print_summary(cfg)


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="a checkpoint folder (step-N), or a checkpoint URI (its newest "
                                               "complete checkpoint)"),
    out: Path = typer.Argument(..., help="the consolidated .safetensors file to write"),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float32"),
) -> None:
    """Consolidate a complete training checkpoint into one safetensors file (what quantization reads)."""
    with user_errors():
        check_weight_dtype(dtype)
        require_training_checkpoint(checkpoint, checksums=False)  # before torch loads
        from wam.trainer.export import export_checkpoint  # needs the trainer extra

        step = export_checkpoint(checkpoint, out, dtype)
    console.print(f"exported step {step} to {out}")


@app.command()
def quantize(
    checkpoint: str = typer.Argument(..., help="a complete checkpoint folder (step-N) or a checkpoint URI (its newest "
                                               "complete one); local or s3://"),
    out: str | None = typer.Option(None, help="output folder or URI (default: <checkpoints>/nvfp4/step-N)"),
    keep: list[str] | None = typer.Option(None, help="module name pattern kept in bf16 (repeatable; default: the "
                                                     "config's quantization.keep)"),
    shard_mb: int | None = typer.Option(None, min=1, help="output shard size (default: quantization.shard_mb)"),
) -> None:
    """Quantize a complete checkpoint to NVFP4 for serving; logs the per-layer report to MLflow."""
    with user_errors():
        require_training_checkpoint(checkpoint, checksums=False)  # before torch loads
        from wam.trainer.quantize.quantizer import quantize_checkpoint  # needs the trainer extra

        report = quantize_checkpoint(checkpoint, out, keep or None, shard_mb)
    s = report.summary()
    if report.reused:
        console.print(f"{report.out} already holds the complete NVFP4 model of {report.source}")
        return
    console.print(f"step {report.step}: {s['layers_nvfp4']:.0f} layers NVFP4, {s['layers_bf16']:.0f} tensors bf16; "
                  f"relative weight error mean {s['relative_error_mean']:.4f} max {s['relative_error_max']:.4f}; "
                  f"{report.input_bytes / 1e6:.1f} MB -> {report.output_bytes / 1e6:.1f} MB "
                  f"({s['compression']:.2f}x) at {s['throughput_mb_s']:.1f} MB/s")
    console.print(f"wrote {report.out}" + (f" (MLflow model version {report.mlflow_version})"
                                           if report.mlflow_version else ""))


@app.command()
def serve(
    model: str = typer.Argument(..., help="a quantized model folder from `wam quantize` (local or s3://)"),
    host: str = typer.Option("127.0.0.1", help="0.0.0.0 to accept robots from other machines"),
    port: int = typer.Option(8000),
    device: str = typer.Option("auto", help="auto (cuda if present) | cpu | cuda[:N]"),
    steps: int | None = typer.Option(None, min=1, help="denoising steps per chunk (default: serving.steps, else "
                                                       "sampler.steps; 1 for Flash checkpoints)"),
    embodiment: str | None = typer.Option(None, help="the embodiment served at / (default: serving.embodiment, else "
                                                     "the first trained); each trained one is also served at /<name>"),
    sampler: str | None = typer.Option(None, help="sampler preset (default: serving.sampler): dreamzero = UniPC, 16 "
                                                  "steps, shift 5, guidance 5.0, transformer on 8 of the 16 steps"),
    max_batch: int | None = typer.Option(None, min=1, help="chunks of different sessions denoised in one forward "
                                                           "(default: serving.max_batch; 1 = one at a time)"),
    compile: str | None = typer.Option(None, help="auto (on CUDA) | on | off: the denoising step under torch.compile "
                                                  "(CUDA graphs on CUDA), warmed up before /readyz (default: "
                                                  "serving.compile)"),
    compute: str | None = typer.Option(None, help="the matmuls: auto (nvfp4 on Blackwell, fp8 on Hopper, else "
                                                  "dequantized) | nvfp4 | fp8 | bf16-dequantized | fp32-dequantized "
                                                  "(default: serving.compute)"),
    devices: int | None = typer.Option(None, min=1, max=2, help="2: guidance in parallel, the unconditional pass on "
                                                                "a second process and GPU (default: serving.devices)"),
    record: str | None = typer.Option(None, help="a folder or URI (s3://...) where every session's requests and "
                                                 "replies are recorded, for `wam rerun` (default: serving.record)"),
    protocol: str | None = typer.Option(None, help="openpi (openpi-client, DreamZero's closed loop) | roboarena "
                                                   "(RoboArena's DROID evaluation client) (default: serving.protocol)"),
) -> None:
    """Serve a quantized policy over openpi's websocket protocol, or RoboArena's (health: /healthz /readyz, metrics:
    /metrics). Robots must send $WAM_POLICY_API_KEY where it is set; SIGTERM or Ctrl-C drains the sessions, then
    exits."""
    from wam.platform.launch import check_can_listen
    from wam.platform.storage import probe_writable

    with user_errors():
        require_quantized_model(model, checksums=False)  # before torch and the model load
        if protocol is not None and protocol not in PROTOCOLS:
            raise ConfigError(f"--protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        check_can_listen(host, port)
        if record:
            probe_writable(record)
        from wam.trainer.serve.policy import load_runtime
        from wam.trainer.serve.roboarena import ROBOARENA
        from wam.trainer.serve.server import serve_forever

        runtime = load_runtime(model, device, steps, embodiment, sampler, max_batch, compile, compute, devices)
        meta = runtime.metadata()
        s, e = meta["sampler"], meta["engine"]
        console.print(f"policy {meta['preset']} step {meta['step']} ({meta['compute_path']}, {s['solver']} "
                      f"{meta['denoising_steps']} steps, guidance {s['guidance']:g}, DiT cache {s['dit_cache']}, "
                      f"embodiment {meta['embodiment']}) on ws://{host}:{port}")
        if len(meta["embodiments"]) > 1:
            console.print("robots pick their embodiment by the path: " + ", ".join(
                f"ws://{host}:{port}/{name}" for name in meta["embodiments"]) + f" (/ is {meta['embodiment']})")
        console.print(f"engine: {e['device']}" + (" + a guidance peer (2 devices)" if e["devices"] == 2 else "")
                      + f", up to {e['max_sessions']} sessions ({e['session_memory_gib']:.2g} GiB of KV cache each), "
                      + f"{e['max_batch']} sessions' chunks per forward, "
                      + ("compiled with CUDA graphs" if e["cuda_graphs"] else "compiled" if e["compiled"] else "eager")
                      + (" (warming up before /readyz)" if e["compiled"] else ""))
        if record := record or runtime.policy.config.serving.record:
            console.print(f"recording every session under {record}")
        if (protocol := protocol or runtime.policy.config.serving.protocol) == ROBOARENA:
            console.print("speaking RoboArena's protocol: one frame a call, each opening a new context window")
        serve_forever(runtime, host, port, record, protocol)


@app.command()
def rerun(
    recording: str = typer.Argument(..., help="a session's recording: <serving.record>/<embodiment>/<session>"),
    model: str | None = typer.Option(None, help="serve it with this quantized model (default: the recorded one)"),
    device: str = typer.Option("cpu", help="cpu | cuda[:N]"),
    compute: str | None = typer.Option(None, help="the matmuls' path (default: the recorded one)"),
    atol: float = typer.Option(1e-3, min=0, help="the largest action difference (robot units) still the same"),
    video: Path | None = typer.Option(None, help="also write what the robot's cameras sent, as an MP4, here"),
) -> None:
    """Send a recorded session's requests, in order, to a server of its model here and compare each reply with the
    one the robot got: actions, gripper commands, errors. Exit code 1 if any differs."""
    from wam.trainer.serve.recorder import read_recording

    with user_errors():
        session, exchanges = read_recording(recording)  # before torch loads
        from wam.trainer.serve.rerun import missing_exchanges, write_robot_view
        from wam.trainer.serve.rerun import rerun as rerun_session

        if missing := missing_exchanges(exchanges):
            err_console.print(f"[yellow]exchanges {missing} were dropped while recording (storage behind or failing): "
                              "the replies after them may differ[/]")
        if video is not None:
            shown = write_robot_view(session, exchanges, video)
            console.print(f"the robot's view: {video} ({shown} frames)" if shown else
                          "the recording holds no camera frames: no video written")
        results = rerun_session(session, exchanges, model, device, compute, atol)
    table = Table("#", "reply", "then ms", "now ms", "max |Δ action|", "gripper flips", "same", box=box.SIMPLE_HEAD,
                  title=f"{recording}: {session['embodiment']} robot, model step {session['step']} "
                        f"({session['compute_path']} then), started {session['started']}")
    for r in results:
        table.add_row(str(r.number), r.kind + (f" ({escape(r.note)})" if r.note else ""), f"{r.recorded_ms:.0f}",
                      f"{r.rerun_ms:.0f}", "" if r.deviation is None else f"{r.deviation:.2e}", str(r.gripper_flips),
                      "yes" if r.same else "[bold red]no[/]")
    console.print(table)
    differ = [r.number for r in results if not r.same]
    if differ:
        fail(f"{len(differ)} of {len(results)} replies differ from the recorded ones: {differ}")
    console.print(f"all {len(results)} replies as recorded (actions within {atol:g})")


@app.command()
def client(
    uri: str = typer.Argument(..., help="the policy server, e.g. ws://127.0.0.1:8000"),
    config: Path = typer.Option(..., help="the model's training config (profiles, sample shape)"),
    dataset: str = typer.Option(..., help="a LeRobot dataset whose episodes play the robot"),
    windows: int = typer.Option(1, min=1, help="context windows (episodes segments) to replay"),
    asynchronous: bool = typer.Option(False, "--async", help="compute chunk k+1 while chunk k executes"),
    control_hz: float | None = typer.Option(None, min=0.1, help="the robot's control rate: sets the per-chunk "
                                            "deadline (default: the server's, the rate its robot data was recorded at)"),
) -> None:
    """Drive a served policy with recorded episodes through openpi-client; prints chunks and latencies."""
    with user_errors():
        cfg = load_config(config)
        show_replay(cfg, uri, dataset, windows, asynchronous, control_hz)


@app.command(context_settings={"allow_extra_args": False})
def pipeline(
    config: Path = typer.Argument(..., help="the run's YAML config"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides"),
    every: bool = typer.Option(False, help="quantize every complete checkpoint, not only the final one"),
    serve_policy: bool = typer.Option(True, "--serve/--no-serve", help="serve the final quantized model"),
    port: int = typer.Option(8000),
    client_dataset: str | None = typer.Option(None, help="replay this LeRobot dataset against the served policy "
                                                         "through openpi-client, then stop the server"),
    asynchronous: bool = typer.Option(False, "--async", help="the replay client computes ahead (async execution)"),
) -> None:
    """Train -> quantize the final (or every) complete checkpoint to NVFP4 -> serve it, as the operator does
    in a cluster, with the same `wam quantize` / `wam serve` commands."""
    with user_errors():
        cfg = load_config(config, overrides or [])
    run_pipeline(cfg, every=every, serve=serve_policy, port=port, client_dataset=client_dataset,
                 asynchronous=asynchronous)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="an empty or new folder"),
    episodes: int = typer.Option(12, min=1),
    version: str = typer.Option("v3.0", help="v3.0 | v2.1"),
    codec: str = typer.Option("h264", help="h264 | vp9 (DALI's CPU decoder reads only VP9) | av1"),
    seed: int = typer.Option(0),
    video_only: bool = typer.Option(False, help="write no actions (like human or other-robot video)"),
) -> None:
    """Write a LeRobot dataset of a procedural scene: a gripper pushing blocks, three cameras, instructions."""
    from wam.trainer.data.synth_dataset import SynthOptions, synthesize

    try:
        root = synthesize(out, SynthOptions(episodes=episodes, version=version, codec=codec, seed=seed,
                                            video_only=video_only))
    except (ValueError, FileExistsError) as err:
        fail(str(err), 2)
    console.print(f"wrote a LeRobot {version} dataset of {episodes} episodes to {root}")


@sim_app.command("record")
def sim_record(
    out: Path = typer.Argument(..., help="an empty or new folder for the LeRobot v3.0 dataset"),
    suite: str = typer.Option("metaworld", help="simulation suite"),
    tasks: str = typer.Option(..., help="comma-separated tasks, e.g. push-v3,reach-v3"),
    episodes: int = typer.Option(10, help="episodes kept per task"),
    seed: int = typer.Option(0),
    action_noise: float = typer.Option(0.0, help="std of Gaussian noise added to every expert action (diversity)"),
    cameras: str = typer.Option("corner,gripperPOV", help="comma-separated cameras, rendered at the control rate"),
    height: int = typer.Option(128),
    width: int = typer.Option(128),
    max_steps: int | None = typer.Option(None, help="step limit per episode (default: the task's, 500)"),
    keep_failed: bool = typer.Option(False, help="keep failed episodes (success=false) instead of dropping them"),
    after_success: int = typer.Option(0, help="control steps recorded after the first success (the expert holds "
                                              "the goal; episodes then last at least one chunk)"),
) -> None:
    """Run the suite's scripted experts (seeded, positions randomised) and write their episodes as a LeRobot
    dataset: cameras, state, actions, an instruction per task, per-episode success (`metaworld` profile)."""
    from wam.trainer.sim.record import RecordOptions, record

    options = RecordOptions(tasks=[t.strip() for t in tasks.split(",") if t.strip()], episodes=episodes, suite=suite,
                            seed=seed, action_noise=action_noise,
                            cameras=[c.strip() for c in cameras.split(",") if c.strip()], height=height, width=width,
                            max_steps=max_steps, keep_failed=keep_failed, after_success=after_success)
    with user_errors():
        summaries = record(out, options)
    table = Table(title=f"{out} (LeRobot v3.0, {suite})", box=box.SIMPLE)
    for column in ("task", "instruction", "attempts", "succeeded", "kept", "mean length"):
        table.add_column(column)
    for s in summaries:
        table.add_row(s.task, escape(s.instruction), str(s.attempts), str(s.successes), str(s.kept),
                      f"{sum(s.lengths) / len(s.lengths):.0f}" if s.lengths else "-")
    console.print(table)
    console.print(f"wrote {sum(s.kept for s in summaries)} episodes to {out} (embodiment profile: metaworld)")


@data_app.command("inspect")
def data_inspect(
    uri: str = typer.Argument(..., help="dataset folder or URI"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Episodes, lengths, cameras, fps, codecs and tasks of a dataset."""
    from wam.trainer.data.inspection import inspect
    from wam.trainer.data.lerobot import LeRobotDataset

    with user_errors():
        info = inspect(LeRobotDataset(uri))
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(title=f"{uri} (LeRobot {info['format']}, {info['robot']}, {info['fps']:g} fps)", show_header=False,
                  box=box.SIMPLE)
    lengths = info["episode_length"]
    table.add_row("episodes", f"{info['episodes']} ({info['frames']:,} frames; length {lengths['min']} / "
                  f"{lengths['median']:g} / {lengths['max']} min/median/max)")
    for key, camera in info["cameras"].items():
        table.add_row(f"camera {key}", f"{camera['shape']} {camera['codec']} {camera['fps']} fps")
    for key, shape in info["features"].items():
        table.add_row(key, str(shape))
    table.add_row("tasks", f"{info['tasks']}: " + "; ".join(info["task_examples"]))
    console.print(table)


@data_app.command("validate")
def data_validate(
    uri: str = typer.Argument(..., help="dataset folder or URI"),
    decoder: str = typer.Option("auto", help="auto | torchcodec | pyav | dali"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Check every episode: rows readable, timestamps consistent, no NaN, videos decodable. Exit 1 on problems."""
    from wam.trainer.data.inspection import problems_as_dicts, validate
    from wam.trainer.data.lerobot import LeRobotDataset

    with user_errors():
        problems = validate(LeRobotDataset(uri), decoder)
    if as_json:
        console.print_json(json.dumps(problems_as_dicts(problems)))
    elif problems:
        table = Table("episode", "file", "problem", title=f"{len(problems)} problem(s) in {uri}", box=box.SIMPLE_HEAD)
        for p in problems:
            table.add_row(str(p.episode), p.file, p.problem)
        console.print(table)
    else:
        console.print(f"{uri}: every episode is readable, consistent and decodable")
    if problems:
        raise typer.Exit(1)


@data_app.command("stats")
def data_stats(
    uri: str = typer.Argument(..., help="dataset folder or URI"),
    profile: str = typer.Option("droid", help="embodiment profile (built in: droid, agibot)"),
    config: Path | None = typer.Option(None, help="a YAML config declaring custom profiles under data.profiles"),
    bad_samples: str | None = typer.Option(None, help="error | skip: an episode with NaN/inf state or actions stops "
                                                      "it, or is left out (default: the config's data.bad_samples)"),
) -> None:
    """Compute the q01/q99 normalisation statistics (state, relative actions) of a dataset for a profile, and
    report what sampling keeps: frames in idle stretches (the profile's idle_threshold), windows by chunks."""
    from wam.platform.embodiment import resolve_profile
    from wam.trainer.data.lerobot import LeRobotDataset
    from wam.trainer.data.stats import compute_stats, sampling_summary, save_stats

    with user_errors():
        cfg = load_config(config, [f"data.bad_samples={bad_samples}"] if bad_samples else [])
        chosen = resolve_profile(profile, cfg.data.profiles)
        dataset = LeRobotDataset(uri)
        stats = compute_stats(dataset, chosen, cfg.data.bad_samples)
        path = save_stats(uri, chosen, stats)
        chunks = resolve_preset(cfg).sample.num_chunks
        summary = sampling_summary(dataset, chosen, chunks)
    console.print(f"state q01..q99 over {len(stats.state_q01)} dims, actions over {len(stats.action_q01)} dims "
                  f"(relative dims {list(chosen.relative_dims)}); saved to {path}")
    if chosen.idle_threshold is None:
        console.print(f"idle stretches: kept (profile {chosen.name} sets no idle_threshold)")
    else:
        console.print(f"idle stretches: {summary.idle_frames} of {summary.frames} frames "
                      f"({100 * summary.idle_frames / max(summary.frames, 1):.1f}%) left out of sampling (profile "
                      f"{chosen.name}: idle_threshold {chosen.idle_threshold:g}, stretches of >= "
                      f"{chosen.action_horizon // 2} still frames)")
    mix = "  ".join(f"{k}: {summary.windows[k]} (of {summary.windows_unfiltered[k]})" for k in summary.windows)
    console.print(f"windows by chunks, kept (of all) at every half chunk: {mix}; without data.packing only the "
                  f"{chunks}-chunk ones are sampled")


@app.command()
def demo(
    weights: Path | None = typer.Option(None, help="a trained checkpoint (folder, checkpoints root, or an export from "
                                                   "`wam export`); else an untrained model only"),
    dataset: str | None = typer.Option(None, help="held-out LeRobot dataset (default: a freshly synthesized one)"),
    episodes: int = typer.Option(8, min=1, help="held-out windows to roll out"),
    steps: int | None = typer.Option(None, min=1, help="denoising steps per chunk (default: the config's sampler)"),
) -> None:
    """Chunk-wise closed-loop inference on held-out robot episodes, with a KV cache: trained vs untrained."""
    from wam.trainer.demo import run_demo  # needs the trainer extra

    with user_errors():
        run_demo(console, weights=weights, dataset=dataset, episodes=episodes, steps=steps)


@app.command("eval")
def evaluate(
    checkpoint: str = typer.Argument(..., metavar="MODEL",
                                     help="a complete checkpoint folder (step-N), a checkpoints folder (its newest "
                                          "complete one), or a .safetensors file from `wam export`; with --sim also "
                                          "a quantized folder or a running server (ws://host:port)"),
    data: str | None = typer.Option(None, help="held-out LeRobot dataset (path or URI); a model trained on "
                                               "procedural latents is evaluated on held-out procedural episodes"),
    profile: str | None = typer.Option(None, help="embodiment profile of --data (default: the training data's)"),
    windows: int = typer.Option(8, min=1, help="held-out windows, spread evenly over the data"),
    steps: int | None = typer.Option(None, min=1, help="denoising steps per chunk (default: the config's sampler)"),
    seed: int = typer.Option(0, help="noise seed: the same checkpoint, data and seed give the same report"),
    device: str = typer.Option("auto", help="auto (small presets on the CPU, the others on a GPU) | cpu | cuda[:N]"),
    out: Path | None = typer.Option(None, help="folder for report.json and actions.png (default: <run dir>/eval/"
                                               "step-N beside the checkpoints, else ./eval/<run>/step-N)"),
    plot_episodes: int = typer.Option(3, min=1, help="episodes shown in actions.png"),
    tracking_uri: str | None = typer.Option(None, help="MLflow store (default: the training run's, from run.json, "
                                                       "tracking.uri or MLFLOW_TRACKING_URI)"),
    mlflow: bool = typer.Option(True, "--mlflow/--no-mlflow", help="log metrics and files to the training run"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    sweep: bool = typer.Option(False, help="also compare samplers on the same windows and noise: Euler and UniPC at "
                                           "4/8/16 steps, without and with guidance, without and with the DiT cache"),
    sweep_guidance: float = typer.Option(5.0, help="the guidance scale of --sweep (DreamZero serves 5.0)"),
    sim: str | None = typer.Option(None, help="closed loop in simulation instead: metaworld (MODEL served by "
                                              "`wam serve`, robots in worker processes)"),
    tasks: str | None = typer.Option(None, help="--sim: comma-separated tasks, e.g. reach-v3,push-v3"),
    episodes: int = typer.Option(10, help="--sim: seeded episodes per task"),
    workers: int = typer.Option(2, help="--sim: environment processes (one server session each)"),
    asynchronous: bool = typer.Option(False, "--async", help="--sim: compute chunk k+1 while chunk k executes"),
    max_steps: int | None = typer.Option(None, help="--sim: control steps per episode (default: the task's, 500)"),
    videos: int = typer.Option(1, help="--sim: episodes per task written as MP4 (cameras next to the predicted "
                                       "video)"),
    references: bool = typer.Option(True, "--references/--no-references",
                                    help="--sim: also run the scripted experts and the untrained policy on the "
                                         "same seeds"),
    height: int = typer.Option(128, help="--sim: rendered view height (render as the demonstrations were recorded)"),
    width: int = typer.Option(128, help="--sim: rendered view width"),
) -> None:
    """Open-loop evaluation on held-out episodes: each chunk predicted from the real context, actions compared
    with the recorded ones in robot units (MSE, L1 per dim), video latents with the real ones. With --sim: the
    policy acts in simulation (success rate, task progress, episode length, latency; videos)."""
    if sim is not None:
        from wam.trainer.sim.closed_loop import SimOptions

        if data is not None or sweep:
            fail("--sim evaluates in simulation: it takes no --data or --sweep", 2)
        options = SimOptions(tasks=[t.strip() for t in (tasks or "").split(",") if t.strip()], episodes=episodes,
                             suite=sim, seed=seed, asynchronous=asynchronous, workers=workers, max_steps=max_steps,
                             height=height, width=width, videos=videos)
        simulate(checkpoint, options, out=out, references=references, device=device, tracking_uri=tracking_uri,
                 log_mlflow=mlflow, as_json=as_json)
        return
    with user_errors():
        if not checkpoint.endswith(".safetensors"):  # a checkpoint (an export is read whole when loaded)
            require_training_checkpoint(checkpoint, checksums=False)  # before torch loads
        from wam.trainer.eval.evaluate import run_eval  # needs the trainer extra

        result = run_eval(checkpoint, dataset=data, profile=profile, windows=windows, steps=steps, seed=seed,
                          device=device, out=out, plot_episodes=plot_episodes, tracking_uri=tracking_uri,
                          log_mlflow=mlflow, sweep_guidance=sweep_guidance if sweep else None)
    r = result.report
    if as_json:
        console.print_json(json.dumps(r))
    else:
        console.print(f"[bold]{escape(r['run'])}[/] step {r['step']}: {len(r['windows'])} held-out windows of "
                      f"{escape(r['data'])}; actions in {r['units']} units")
        table = Table("action dim", "MSE", "L1", box=box.SIMPLE_HEAD)
        for d in r["per_dim"]:
            table.add_row(escape(d["dim"]), f"{d['mse']:.4g}", f"{d['l1']:.4g}")
        table.add_row("mean", f"{r['action_mse']:.4g}", f"{r['action_l1']:.4g}", style="bold")
        console.print(table)
        console.print(f"video latent MSE {r['video_mse']:.4f}; action L1 in normalised units "
                      f"{r['action_l1_normalised']:.4f}; {r['denoise_ms']:.1f} ms per chunk ({r['denoising_steps']} "
                      f"denoising steps, {r['device']})")
        if "sweep" in r:
            table = Table("solver", "steps", "guidance", "DiT cache", "DiT passes", "action MSE", "action L1",
                          "video MSE", "ms/chunk", box=box.SIMPLE_HEAD, title="samplers on the same windows and noise")
            for row in r["sweep"]:
                table.add_row(row["solver"], str(row["steps"]), f"{row['guidance']:g}", row["dit_cache"],
                              f"{row['dit_steps']:.1f}", f"{row['action_mse']:.4g}", f"{row['action_l1']:.4g}",
                              f"{row['video_mse']:.4f}", f"{row['denoise_ms']:.0f}")
            console.print(table)
        console.print(f"report: {result.out / 'report.json'}  plot: {result.out / 'actions.png'}")
    if result.mlflow_run_id:
        err_console.print(f"logged to MLflow run {result.mlflow_run_id} at {result.tracking_uri}")
    else:
        err_console.print(f"[yellow]not logged to MLflow:[/] {escape(result.tracking_note)}")


def simulate(model: str, options, *, out: Path | None, references: bool, device: str, tracking_uri: str | None,
             log_mlflow: bool, as_json: bool) -> None:
    """`wam eval --sim`: run, with progress, and show the report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from wam.trainer.sim.evaluation import run_sim_eval

    rows = 3 if references else 1
    with user_errors():
        options.check()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err_console,
                      transient=True) as bar:
            task = bar.add_task("episodes", total=rows * len(options.tasks) * options.episodes)

            def advance(row: str, episode) -> None:
                bar.update(task, advance=1, description=f"{row} {episode.task}")

            result = run_sim_eval(model, options, out=out, references=references, device=device,
                                  tracking_uri=tracking_uri, log_mlflow=log_mlflow, progress=advance)
    r = result.report
    if as_json:
        console.print_json(json.dumps(r))
    else:
        table = Table("policy", "task", "success", "progress", "length", "chunk p50 ms", "chunk p99 ms", "errors",
                      box=box.SIMPLE_HEAD, title=f"{escape(r['model'])} step {r['step']}: {r['episodes_per_task']} "
                                                 f"episodes per task, {r['execution']} execution, seed {r['seed']}")
        for row, summary in r["rows"].items():
            for task, st in [*summary["tasks"].items(), ("all", summary["overall"])]:
                table.add_row(row, task, f"{st['success_rate']:.0%}", f"{st['progress']:.2f}",
                              f"{st['episode_length']:.0f}", *(f"{st[k]:.0f}" if st[k] is not None else "-"
                                                               for k in ("chunk_ms_p50", "chunk_ms_p99")),
                              str(st["errors"]), style="bold" if task == "all" else None)
        console.print(table)
        for row, note in r["notes"].items():
            console.print(f"[yellow]no {row} row:[/] {escape(note)}")
        console.print(f"report: {result.out / 'report.json'}" + (f"  videos: {result.out / 'videos'}"
                                                                   if r["videos"] else ""))
    if result.mlflow_run_id:
        err_console.print(f"logged to MLflow run {result.mlflow_run_id} at {result.tracking_uri}")
    else:
        err_console.print(f"[yellow]not logged to MLflow:[/] {escape(result.tracking_note)}")


@app.command(context_settings={"allow_extra_args": False})
def regress(
    suite: Path = typer.Argument(..., help="a regression suite (configs/regress/*.yaml)"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides of the training config, e.g. "
                                                     "training.lr=0.3 to check that a regression is caught"),
    local: bool = typer.Option(False, "--local", help="train on this machine (as `wam train`) instead of "
                                                      "submitting a TrainJob to the cluster and waiting for it"),
    update_baseline: bool = typer.Option(False, help="promote this run to the suite's baseline (compared first "
                                                     "when there is one; never fails on a regression)"),
    output_dir: Path = typer.Option(Path("runs/regress"), help="runs, evaluations and reports; --local also keeps "
                                                               "checkpoints and the default MLflow store here"),
    tracking_uri: str | None = typer.Option(None, help="MLflow store of runs and baselines (default: "
                                                       "MLFLOW_TRACKING_URI, else --local: <output-dir>/mlflow.db)"),
    namespace: str = typer.Option("default", "--namespace", "-n", help="the TrainJob's namespace"),
    processes: int | None = typer.Option(None, min=1, help="--local: training processes (default: the spec's GPUs "
                                                           "per node, as in the cluster)"),
    poll: float = typer.Option(30.0, min=0.1, help="seconds between TrainJob status reads"),
    timeout: float = typer.Option(6 * 3600.0, help="seconds to wait for the TrainJob"),
) -> None:
    """Run a regression suite: train, evaluate, compare each metric with the baseline run's; exit 1 on a
    regression (the report says which metric moved by how much)."""
    from wam.app.regress import TrainingFailed, run_suite
    from wam.platform.suite import fmt_value

    try:
        with user_errors():
            report = run_suite(suite, overrides or [], local=local, update_baseline=update_baseline, out=output_dir,
                               tracking_uri=tracking_uri, namespace=namespace, processes=processes, poll=poll,
                               timeout=timeout)
    except TrainingFailed as err:  # the training itself regressed
        err_console.print(f"[bold red]REGRESSION:[/] {escape(str(err))}")
        raise typer.Exit(1) from None
    table = Table("metric", "baseline", "this run", "change", "allowed", "verdict", box=box.SIMPLE_HEAD,
                  title=f"suite {report.suite}: run {report.run} vs baseline {report.baseline_run_id or '(none yet)'}")
    for c in report.comparisons:
        verdict = "[bold red]REGRESSION[/]" if c.regressed else "ok"
        table.add_row(f"{c.name} ({c.key})", fmt_value(c.baseline), fmt_value(c.value), c.change, c.allowed, verdict)
    console.print(table)
    console.print(f"report: {report.folder}/report.md and report.json (also in MLflow run {report.run_id}, "
                  f"regress/{report.suite}/)")
    if report.promoted:
        console.print(f"run {report.run_id} is the baseline now (model version {report.promoted})")
    if not report.passed and not update_baseline:
        for c in report.regressions:
            err_console.print(f"[bold red]REGRESSION[/] {c.name}: {escape(c.note)}")
        raise typer.Exit(1)
    console.print("[bold green]passed[/]" if report.passed else "[yellow]regressions noted; promoted anyway[/]")


def main() -> None:
    app()


# -- Kubernetes: the TrainJob API for researchers (needs the `operator` extra) ----------------------------


def _cluster():
    from wam.operators import kube

    kube.load_client_config()
    return kube.Kube()


@app.command()
def submit(file: Path = typer.Argument(..., help="a TrainJob manifest (see examples/)"),
           namespace: str = typer.Option(None, "--namespace", "-n", help="default: the manifest's, else default"),
           generate_name: bool = typer.Option(False, help="append a random suffix to metadata.name"),
           local: bool = typer.Option(False, "--local", help="run it on this machine instead: an emulated cluster "
                                      "whose pods are real processes (needs bubblewrap and the `local` extra)"),
           workdir: Path = typer.Option(Path("runs/local-cluster"), help="--local: logs, MLflow's store, checkpoints"),
           serving_port: int = typer.Option(8000, help="--local: the policy server's port")) -> None:
    """Submit a TrainJob to the cluster of the current kubeconfig (or, with --local, to one on this machine)."""
    from wam.operators import trainjobs

    with user_errors():
        obj = trainjobs.read_manifest(file.read_text(), "default" if local else namespace)
        if local:
            from wam.app import local_submit

            code = local_submit.run(obj, workdir, serving_port, lambda line: err_console.print(escape(line)),
                                    show_trainjob)
            raise typer.Exit(code)
        name = trainjobs.submit(_cluster(), obj, generate_name)
    console.print(f"trainjob {obj['metadata']['namespace']}/{name} created; follow it with: wam status {name}")


@app.command()
def status(name: str, namespace: str = typer.Option("default", "--namespace", "-n")) -> None:
    """Phase, progress, checkpoint, handoff and conditions of a TrainJob."""
    from wam.operators import trainjobs

    with user_errors():
        obj = trainjobs.get(_cluster(), namespace, name)
    show_trainjob(obj.get("status") or {})


def show_trainjob(st: dict) -> None:
    """A TrainJob's status as two tables: its fields, and its conditions."""
    table = Table(show_header=False, box=box.SIMPLE)
    progress = st.get("progress") or {}
    rows = {
        "phase": st.get("phase", "Pending"),
        "step": progress.get("summary", ""),
        "loss": progress.get("loss"),
        "tokens/s": progress.get("tokensPerSecond"),
        "restarts": st.get("restarts", 0),
        "checkpoint": (st.get("checkpoint") or {}).get("uri"),
        "mlflow": (st.get("mlflow") or {}).get("url") or (st.get("mlflow") or {}).get("runId"),
        "quantized": (st.get("quantized") or {}).get("uri"),
        "serving": (st.get("serving") or {}).get("endpoint"),
        "robots served": ", ".join((st.get("serving") or {}).get("embodiments") or []),
        "last failure": (st.get("lastFailure") or {}).get("message"),
    }
    for key, value in rows.items():
        if value not in (None, ""):
            table.add_row(key, str(value))
    console.print(table)
    conditions = Table("condition", "status", "reason", "message", box=box.SIMPLE_HEAD)
    for cond in st.get("conditions") or []:
        conditions.add_row(cond["type"], cond["status"], cond.get("reason", ""), cond.get("message", ""))
    console.print(conditions)


@app.command()
def logs(name: str, namespace: str = typer.Option("default", "--namespace", "-n"),
         rank: int = typer.Option(0, help="node index (0: the node of global rank 0)"),
         follow: bool = typer.Option(False, "--follow", "-f")) -> None:
    """The training log of one node of a TrainJob's current attempt."""
    from wam.operators import trainjobs

    with user_errors():
        for chunk in trainjobs.logs(_cluster(), namespace, name, rank, follow):
            print(chunk, end="", flush=True)
