"""The launch contract: the command every process of the platform runs, wherever it runs.

A training process is torchtitan's own `main` with the project's config function, started by torchrun
(`training.launcher: torchrun`) or by the Ray Train driver (`ray`); a quantization pod runs `wam quantize`,
a serving pod `wam serve`. `wam train`, the local pipeline, the operator's JobSet, RayJob, quantize Job and
serving Deployment all build their commands here, so a laptop run and a pod cannot drift apart.
"""

from __future__ import annotations

import errno
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from wam.platform.errors import ConfigError

TRAIN_MODULE = "wam.trainer.titan.train"
# torchtitan's arguments: the config function `from_yaml` of wam.trainer.titan reads $WAM_CONFIG.
CONFIG_ARGS = ("--module", "wam.trainer.titan", "--config", "from_yaml")
RAY_MODULE = "wam.trainer.titan.ray_train"
RAY_VERSION = "2.60.0"  # the trainer extra's pin, and the RayJob's rayVersion (tests check they agree)
SERVING_PORT = 8000

# How the Ray Train driver runs, here and in a RayJob's pods (set before it starts: Ray reads some on import).
RAY_DRIVER_ENV = {
    "RAY_CHDIR_TO_TRIAL_DIR": "0",  # workers keep the working directory: relative run paths stay valid
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # each output line once, not also through Ray Train's logger
    "RAY_DEDUP_LOGS": "0",  # every rank's lines, as under torchrun
    "RAY_COLOR_PREFIX": "0",  # logs are files, not terminals
}


def quiet_ray_train_cleaner() -> None:
    """Ray Train's placement-group cleaner asks the dashboard whether a run is alive and, without one, warns every few
    seconds; a local run has none, and ray.shutdown() removes everything. Here, torch-free: each of Ray's processes
    (its train controller and the cleaner too) imports the hook's module, and the training module's torch imports
    cost a run 8-10 s of start-up on 2 cores (benchmarks/launchers.py)."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


# Every process of a local Ray run (the driver starts its cluster without a dashboard, ~1 GB less) runs this first.
RAY_LOCAL_WORKER_SETUP = f"{quiet_ray_train_cleaner.__module__}.{quiet_ray_train_cleaner.__qualname__}"


def training_command(launcher: str, *, python: str = "python", standalone_processes: int | None = None) -> list[str]:
    """The command that starts a training job's processes on one node. torchrun takes its rendezvous from
    `PET_*` variables (a pod) unless `standalone_processes` asks for a single-machine run of that many;
    the Ray driver starts or joins a Ray cluster and runs one Ray Train worker per process."""
    if launcher == "ray":
        return [python, "-m", RAY_MODULE]
    standalone = ["--standalone", f"--nproc_per_node={standalone_processes}"] if standalone_processes else []
    return [python, "-m", "torch.distributed.run", *standalone, "-m", TRAIN_MODULE, *CONFIG_ARGS]


def quantize_command(checkpoint: str, out: str) -> list[str]:
    return ["wam", "quantize", checkpoint, "--out", out]


def serve_command(model: str, port: int = SERVING_PORT, host: str = "0.0.0.0") -> list[str]:
    return ["wam", "serve", model, "--host", host, "--port", str(port)]


def local_command(command: list[str]) -> list[str]:
    """A `wam ...` command of the contract, run with this installation's `wam`."""
    return [shutil.which("wam") or str(Path(sys.executable).parent / "wam"), *command[1:]]


_PORTS = random.SystemRandom()  # not the global generator: processes that seed it alike would pick alike


def free_port() -> int:
    """A loopback TCP port free at the moment of asking, for a process started next to listen on (a local server, a
    rendezvous). Chosen below the kernel's ephemeral range (net.ipv4.ip_local_port_range: 32768 and up by default),
    where the OS never hands out ports itself: a port it picked could be taken meanwhile by any client connection
    or port-0 server on this machine."""
    while True:
        port = _PORTS.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


LISTEN_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)  # what the user can fix by choosing elsewhere


def listen_error(host: str, port: int, err: OSError) -> ConfigError:
    return ConfigError(f"cannot listen on {host}:{port}: {err.strerror}; pick another --port (or --host), or stop what "
                       "uses it")


def check_can_listen(host: str, port: int) -> None:
    """Refuse a server's address it could not listen on now (in use, not this machine's, privileged), before a model
    loads for minutes; the server still handles a port taken meanwhile. Bound as asyncio's server binds it."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise listen_error(host, port, err) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(address)
            except OSError as err:
                if err.errno in LISTEN_ERRNOS:
                    raise listen_error(host, port, err) from None
                raise


def wait_ready(port: int, server: subprocess.Popen, timeout: float = 600.0) -> None:
    """Wait for a local policy server's /readyz (its model loaded); RuntimeError when it exits first or the
    timeout passes (loading a large model on a busy machine takes minutes: the timeout is generous)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the policy server exited (code {server.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the policy server was not ready within {timeout:.0f} s")
