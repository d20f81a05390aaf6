"""`wam eval --sim`: a model's closed-loop success in simulation, with the references that bound it.

MODEL is a training checkpoint (quantized first, to the handoff place beside its series, as the operator does),
a quantized folder, or a running server (`ws://`). A checkpoint or folder is served by `wam serve` in its own
process, so the simulated robots reach the policy as real ones do. In the same report, on the same seeds: the
tasks' scripted experts (the upper bound) and the untrained policy (the lower bound: the model's config at
initialisation, quantized and served the same way). The report (report.json), MP4s of the first episodes of
each task (the cameras next to the model's predicted video of the same chunk) and the metrics go to the folder
and to the training run in MLflow (under sim/step-N).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wam.platform.checkpoints import step_dir, step_of, write_manifest
from wam.platform.config import WamConfig, resolve_preset
from wam.platform.errors import UserError
from wam.platform.launch import free_port, local_command, serve_command, wait_ready
from wam.platform.storage import filesystem, join
from wam.trainer.checkpoint_reader import StoredModel, open_checkpoint, open_quantized
from wam.trainer.data.videos import encode_video, side_by_side
from wam.trainer.eval.reporting import log_to_training_run, training_run
from wam.trainer.quantize.quantizer import POLICY, quantize_checkpoint
from wam.trainer.sim import metaworld_suite as mw
from wam.trainer.sim.closed_loop import (
    EXPERT_ROW,
    POLICY_ROW,
    UNTRAINED_ROW,
    EpisodeResult,
    SimOptions,
    run_episodes,
    summarize,
)


@dataclass
class SimReport:
    report: dict  # what report.json holds
    out: Path
    metrics: dict[str, float]
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    tracking_note: str = ""


@dataclass
class _Target:
    """What MODEL names: a server to reach, or a quantized folder to serve, and the stored model if known."""

    uri: str | None = None  # ws://...
    folder: str | None = None  # a quantized model folder
    stored: StoredModel | None = None


def _target(model: str) -> _Target:
    if model.startswith(("ws://", "wss://")):
        return _Target(uri=model)
    fs, root = filesystem(model)
    if not fs.exists(root):
        raise UserError(f"{model} does not exist: pass a checkpoint folder, a quantized folder or a ws:// server")
    if fs.exists(join(root, POLICY)):
        return _Target(folder=model, stored=open_quantized(model)[0])
    stored = open_checkpoint(model)
    out = None if step_of(stored.uri) is not None else stored.uri.rstrip("/") + "-quantized"
    return _Target(folder=quantize_checkpoint(stored.uri, out).out, stored=stored)


@dataclass
class LocalServer:
    uri: str  # ws://127.0.0.1:<port>
    process: subprocess.Popen


@contextmanager
def served(folder: str, log: Path, device: str = "auto") -> Iterator[LocalServer]:
    """`wam serve folder` in its own process on a free loopback port (its output in `log`) until the block ends.
    It denoises one chunk per forward (`--max-batch 1`): batching the workers' chunks together would change the
    float rounding with their timing, and an evaluation must replay exactly for its seed."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as output:
        server = subprocess.Popen([*local_command(serve_command(folder, port, host="127.0.0.1")), "--device", device,
                                   "--max-batch", "1"],
                                  stdout=output, stderr=subprocess.STDOUT)
        try:
            try:
                wait_ready(port, server)
            except RuntimeError as err:
                raise UserError(f"{err}; its log: {log}") from None
            yield LocalServer(f"ws://127.0.0.1:{port}", server)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def untrained_policy(cfg: WamConfig, folder: Path) -> str:
    """The lower bound: the config's model at initialisation (its seed), as a step-0 checkpoint quantized like a
    trained one (not tracked: nobody trained it). Returns the quantized folder."""
    import torch.distributed.checkpoint as dcp

    from wam.trainer.model.registry import build_model, model_config

    shutil.rmtree(folder, ignore_errors=True)
    preset = resolve_preset(cfg)
    model = build_model(model_config(preset.arch, preset.sample, cfg.model.attention), seed=cfg.seed)
    checkpoint = step_dir(str(folder / "checkpoints"), 0)
    with warnings.catch_warnings():  # DCP notes that it saves in a single process, which is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(model.state_dict(), checkpoint_id=checkpoint, no_dist=True)
    write_manifest(checkpoint, 0, dataclasses.asdict(cfg), {})
    return quantize_checkpoint(checkpoint, str(folder / "quantized"), track=False).out


def _server_metadata(uri: str) -> dict:
    from wam.platform.policy_client import PolicyClient

    try:
        client = PolicyClient(uri, control_hz=mw.FPS)
    except (OSError, ConnectionError, TimeoutError) as err:
        raise UserError(f"cannot reach the policy server at {uri} ({type(err).__name__}: {err}); is `wam serve` "
                        "running there?") from None
    try:
        meta = client.metadata
    finally:
        client.close()
    return {k: meta.get(k) for k in ("preset", "step", "compute_path", "sampler", "embodiment", "cameras",
                                     "actions_per_chunk", "frame_stride")}


def run_sim_eval(model: str, options: SimOptions, *, out: Path | None = None, references: bool = True,
                 device: str = "auto", tracking_uri: str | None = None, log_mlflow: bool = True,
                 run_id: str | None = None,
                 progress: Callable[[str, EpisodeResult], None] | None = None) -> SimReport:
    """Evaluate MODEL closed-loop on `options`' tasks; write report.json and videos to `out`; log to MLflow."""
    options.check()
    target = _target(model)
    stored = target.stored
    step = stored.step if stored else None
    if out is None:
        run_dir = training_run(stored)[2] if stored else None
        base = run_dir / "sim" if run_dir else Path("sim") / (stored.config.name if stored else "server")
        out = base / (f"step-{step}" if step is not None else time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: dict[str, list[EpisodeResult]] = {}

    def play(row: str, uri: str | None, row_options: SimOptions) -> None:
        rows[row] = run_episodes(uri, row_options, (lambda r: progress(row, r)) if progress else None)

    if target.uri:
        server = _server_metadata(target.uri)
        play(POLICY_ROW, target.uri, options)
    else:
        with served(target.folder, out / "server.log", device) as local:
            server = _server_metadata(local.uri)
            play(POLICY_ROW, local.uri, options)
    quiet = dataclasses.replace(options, videos=0)
    notes = {}
    if references:
        play(EXPERT_ROW, None, quiet)
        if stored is None:
            notes[UNTRAINED_ROW] = "a ws:// server does not say which config it was trained with"
        else:
            with served(untrained_policy(stored.config, out / "untrained"), out / "untrained" / "server.log",
                        device) as local:
                play(UNTRAINED_ROW, local.uri, quiet)
    videos = _write_videos(rows[POLICY_ROW], out / "videos", server["frame_stride"])
    summaries = {row: summarize(results) for row, results in rows.items()}
    report = {
        "model": model, "served": target.folder or target.uri, "step": step if step is not None else server["step"],
        "suite": options.suite, "tasks": options.tasks, "episodes_per_task": options.episodes,
        "seed": options.seed, "execution": "asynchronous" if options.asynchronous else "synchronous",
        "workers": options.workers, "max_steps": options.max_steps, "render": [options.height, options.width],
        "server": server, "rows": summaries, "notes": notes, "videos": [str(v.relative_to(out)) for v in videos],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    metrics = sim_metrics(options.suite, summaries)
    result = SimReport(report, out, metrics)
    if stored is None:
        result.tracking_note = "a ws:// server does not say which run trained it: nothing logged to MLflow"
    else:
        result.mlflow_run_id, result.tracking_uri, result.tracking_note = log_to_training_run(
            stored, stored.step, metrics, out, tracking_uri=tracking_uri, enabled=log_mlflow, run_id=run_id,
            artifact_dir="sim")
    return result


def sim_metrics(suite: str, summaries: dict[str, dict]) -> dict[str, float]:
    """Flat MLflow names: sim/<suite>/<metric> (the policy), .../<task>/<metric>, and the references' rates."""
    metrics = {}
    for row, summary in summaries.items():
        prefix = f"sim/{suite}" if row == POLICY_ROW else f"sim/{suite}/{row}"
        for scope, stats in (("", summary["overall"]), *((f"/{t}", s) for t, s in summary["tasks"].items())):
            for key in ("success_rate", "progress", "episode_length", "chunk_ms_p50", "chunk_ms_p99"):
                if stats.get(key) is not None and (row == POLICY_ROW or key in ("success_rate", "progress")):
                    metrics[f"{prefix}{scope}/{key}"] = float(stats[key])
    return metrics


def _write_videos(results: list[EpisodeResult], folder: Path, stride: int) -> list[Path]:
    """Each recorded episode as an MP4 at the frame rate of the frames sent (the control rate / stride): the
    cameras side by side, then the predicted video of the same chunk."""
    paths = []
    for r in results:
        frames = [side_by_side(views, predicted) for views, predicted in r.video or [] if views]
        if not frames:
            continue
        path = folder / f"{r.task}-episode-{r.episode}-{'success' if r.success else 'failure'}.mp4"
        encode_video(np.concatenate(frames), path, "h264", fps=max(1, round(mw.FPS / stride)))
        paths.append(path)
    return paths


