"""`wam train` on this machine: check a run before any process starts, start its processes under its launcher
(the commands of the launch contract, wam.platform.launch), follow their progress, stop them on Ctrl-C.

Torch-free: the training processes import torch, this one only starts them. `wam pipeline` and
`wam regress --local` train through here too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from wam.app.console import console, err_console, fail, user_errors
from wam.platform import termination
from wam.platform.accounting import GIB
from wam.platform.checkpoints import latest_complete
from wam.platform.config import WamConfig, check_memory, to_yaml
from wam.platform.data_contract import check_datasets
from wam.platform.errors import ConfigError
from wam.platform.launch import RAY_DRIVER_ENV, RAY_VERSION, training_command
from wam.platform.resume import Resume, check_resume
from wam.platform.storage import probe_writable

TERMINATION_FILE = "termination.log"  # in the run directory
# What a local Ray run's driver adds to RAY_DRIVER_ENV.
RAY_LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's loopback-only mode: every node address is 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",  # a private single-machine cluster reports nothing anywhere
    # Ray starts workers at niceness 15: on a shared machine the training processes would get a fraction of the
    # CPU that torchrun's (niceness 0) get.
    "RAY_worker_niceness": "0",
}


def _gpu_memory_gib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return min(float(line) for line in out.split()) / 1024
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _host_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def check_capacity(cfg: WamConfig) -> None:
    """Refuse a run whose estimated memory per process exceeds what each process has here."""
    gpu = _gpu_memory_gib()
    if gpu is not None:
        check_memory(cfg, gpu, "GPU")
    else:
        host = _host_memory_gib()
        check_memory(cfg, host / cfg.training.processes, f"share of this machine's {host:.0f} GiB RAM")


def check_ray_installed() -> None:
    """Refuse before anything starts when Ray is missing (find_spec: nothing of Ray is imported here)."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"training.launcher=ray needs Ray Train, which is not installed in this environment: "
                          f"pip install 'wam-platform[trainer]' (it pins ray {RAY_VERSION}), or use "
                          "training.launcher=torchrun")


@dataclass
class Prepared:
    config_path: Path  # this attempt's config: what the training processes read
    resume: Resume  # the checkpoint it continues, and what changed since


def prepare(cfg: WamConfig) -> Prepared:
    """Check everything that can be checked before a process starts (nothing is written until every check passed),
    then record this attempt's config. The run's `config.yaml` is its first attempt's and is never rewritten;
    every attempt's is kept under `attempts/`."""
    if cfg.training.nodes != 1:
        raise ConfigError(f"`wam train` runs on this machine; a {cfg.training.nodes}-node job is submitted as a "
                          "TrainJob (`wam submit`)")
    if cfg.training.launcher == "ray":
        check_ray_installed()
    check_capacity(cfg)
    check_datasets(cfg)
    resume = check_resume(cfg)
    probe_writable(cfg.checkpoint_uri)
    text = to_yaml(cfg)
    attempts = cfg.run_dir / "attempts"
    attempts.mkdir(parents=True, exist_ok=True)
    path = attempts / f"{datetime.now(UTC):%Y%m%d-%H%M%S-%f}.yaml"
    path.write_text(text)
    if not (cfg.run_dir / "config.yaml").exists():
        (cfg.run_dir / "config.yaml").write_text(text)
    return Prepared(path, resume)


def start(cfg: WamConfig, config_path: Path) -> subprocess.Popen:
    """Start the training processes (a new session, so Ctrl-C reaches all of them through `stop`)."""
    log = (cfg.run_dir / "train.log").open("ab")
    cause = cfg.run_dir / TERMINATION_FILE  # why the processes ended, as a pod's termination message says it
    cause.unlink(missing_ok=True)
    env = {**os.environ, "WAM_CONFIG": str(config_path.resolve()), "PYTHONUNBUFFERED": "1",
           termination.ENV: str(cause.resolve())}
    if cfg.training.launcher == "ray":
        env.pop("RAY_ADDRESS", None)  # a private cluster on this machine, never one a shell points at
        env.update(RAY_DRIVER_ENV, **RAY_LOCAL_ENV)
    else:
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, which it announces in a banner otherwise
    command = training_command(cfg.training.launcher, python=sys.executable,
                               standalone_processes=cfg.training.processes)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@dataclass
class ProgressRecord:
    step: int
    steps: int
    metrics: dict


def follow(progress_file: Path, process: subprocess.Popen, poll: float = 0.5) -> Iterator[ProgressRecord]:
    """Progress records as rank 0 writes them, until the process ends."""
    offset = 0
    while True:
        finished = process.poll() is not None
        if progress_file.exists():
            with progress_file.open() as f:
                f.seek(offset)
                for line in f:
                    if line.endswith("\n"):
                        record = json.loads(line)
                        yield ProgressRecord(record.pop("step"), record.pop("steps"), record)
                        offset += len(line.encode())
        if finished:
            return
        time.sleep(poll)


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_info(cfg: WamConfig) -> dict:
    """What rank 0 recorded about the run (MLflow store and run id, checkpoints), or {} before it started."""
    path = cfg.run_dir / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def log_tail(cfg: WamConfig, lines: int = 30) -> str:
    path = cfg.run_dir / "train.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# -- the run as a person sees it --------------------------------------------------------------------------


def run(cfg: WamConfig) -> None:
    """Check, start, show progress with an ETA until the processes end; exit non-zero when they fail."""
    with user_errors():
        prepared = prepare(cfg)
    resume = prepared.resume
    console.print(f"[bold]{escape(cfg.name)}[/]: preset {cfg.model.preset}, {cfg.training.processes} processes "
                  f"({cfg.training.launcher}), {cfg.training.steps} steps"
                  + (f", resuming step {resume.step}" if resume.step is not None else "")
                  + f"; log {escape(str(cfg.run_dir / 'train.log'))}")
    if resume.changed:
        err_console.print(f"[yellow]changed since step {resume.step}:[/] {escape(resume.describe())} (recorded on the "
                          "MLflow run)")
    process = start(cfg, prepared.config_path)
    try:
        _show_progress(follow(cfg.run_dir / "progress.jsonl", process), cfg.training.steps)
    except KeyboardInterrupt:
        stop(process)
        err_console.print("interrupted; `wam train` with the same config resumes from the last complete checkpoint")
        raise typer.Exit(130) from None
    if process.returncode != 0:
        reported = termination.parse(_read(cfg.run_dir / TERMINATION_FILE))
        if reported and reported[0] == termination.INVALID_INPUT:  # a user error: its message is the whole story
            fail(reported[1], 2)
        err_console.print(log_tail(cfg), markup=False)  # logs hold brackets rich would parse
        if reported:
            err_console.print(f"[bold red]cause:[/] {escape(reported[1])}")
        err_console.print(f"[bold red]training failed[/] (exit code {process.returncode}); full log: "
                          f"{escape(str(cfg.run_dir / 'train.log'))}")
        raise typer.Exit(process.returncode or 1)


def _read(path: Path) -> str | None:
    return path.read_text(errors="replace") if path.exists() else None


def _show_progress(records: Iterator[ProgressRecord], total: int) -> None:
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[metrics]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("train", total=total, metrics="")
        for record in records:
            m = record.metrics
            shown = f"loss {m.get('loss', float('nan')):.4f}  video {m.get('video_loss', float('nan')):.4f}"
            if "action_loss" in m:
                shown += f"  action {m['action_loss']:.4f}"
            bar.update(task, completed=record.step, metrics=shown)


def print_summary(cfg: WamConfig) -> None:
    """Where the checkpoints and the MLflow run are."""
    info, checkpoints = run_info(cfg), cfg.checkpoint_uri
    latest = latest_complete(checkpoints)
    console.print(f"checkpoints: {escape(checkpoints)}" + (f" (newest complete: step {latest[0]})" if latest else ""))
    if info.get("tracking_uri"):
        console.print(f"MLflow run {info.get('mlflow_run_id')} in experiment {escape(repr(info.get('experiment')))} at "
                      f"{escape(info['tracking_uri'])}")
        if info["tracking_uri"].startswith("sqlite:"):
            console.print(f"  open it with: mlflow ui --backend-store-uri {escape(info['tracking_uri'])}")
