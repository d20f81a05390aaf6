"""`wam train`: check a run before any process starts, run it under its launcher, follow its progress.

torchrun here; `training.launcher: ray` starts the Ray Train driver instead (wam.platform.ray_launch).
Torch-free: the training processes import torch, this one only starts them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from wam.platform import ray_launch
from wam.platform.accounting import GIB
from wam.platform.config import WamConfig, check_memory, to_yaml
from wam.platform.errors import ConfigError
from wam.platform.storage import probe_writable

TRAIN_MODULE = "wam.trainer.titan.train"
CONFIG_MODULE = "wam.trainer.titan"
TRAIN_ARGS = ("--module", CONFIG_MODULE, "--config", "from_yaml")  # torchtitan's: the config function


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


def prepare(cfg: WamConfig) -> Path:
    """Validate what can be validated before starting, and write the resolved config into the run dir."""
    if cfg.training.nodes != 1:
        raise ConfigError(f"`wam train` runs on this machine; a {cfg.training.nodes}-node job is submitted as a "
                          "TrainJob (`wam submit`)")
    if cfg.training.launcher == "ray":
        ray_launch.check_installed()
    check_capacity(cfg)
    probe_writable(cfg.checkpoint_uri)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir / "config.yaml"
    path.write_text(to_yaml(cfg))
    return path


def command(cfg: WamConfig) -> list[str]:
    if cfg.training.launcher == "ray":
        return ray_launch.command()
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.training.processes}",
            "-m", TRAIN_MODULE, *TRAIN_ARGS]


@dataclass
class Progress:
    step: int
    steps: int
    metrics: dict


def follow(progress_file: Path, process: subprocess.Popen, poll: float = 0.5) -> Iterator[Progress]:
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
                        yield Progress(record.pop("step"), record.pop("steps"), record)
                        offset += len(line.encode())
        if finished:
            return
        time.sleep(poll)


def start(cfg: WamConfig, config_path: Path) -> subprocess.Popen:
    """Start the training processes (a new session, so Ctrl-C reaches all of them through `stop`)."""
    log = (cfg.run_dir / "train.log").open("ab")
    env = {**os.environ, "WAM_CONFIG": str(config_path.resolve()), "PYTHONUNBUFFERED": "1"}
    if cfg.training.launcher == "ray":
        env.pop("RAY_ADDRESS", None)  # a private cluster on this machine, never one a shell points at
        env.update(ray_launch.local_environment())
    return subprocess.Popen(command(cfg), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_info(cfg: WamConfig) -> dict:
    path = cfg.run_dir / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def log_tail(cfg: WamConfig, lines: int = 30) -> str:
    path = cfg.run_dir / "train.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
