"""The Ray launcher of `wam train` (`training.launcher: ray`), its torch-free half.

`wam train` starts the Ray Train driver (wam.trainer.titan.ray_train) as one process in its own session,
as it starts torchrun: the driver starts a private Ray cluster on this machine (loopback only), runs one
Ray Train worker per training process and shuts the cluster down at the end. In Kubernetes the same
driver is the entrypoint of a KubeRay RayJob and joins that job's cluster instead (wam.operators.rayjob).
"""

from __future__ import annotations

import importlib.util
import sys

from wam.platform.errors import ConfigError

RAY_MODULE = "wam.trainer.titan.ray_train"
RAY_VERSION = "2.60.0"  # the trainer extra's pin, and the RayJob's rayVersion (tests check they agree)


def check_installed() -> None:
    """Refuse before anything starts when Ray is missing (find_spec: nothing of Ray is imported here)."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"training.launcher=ray needs Ray Train, which is not installed in this environment: "
                          f"pip install 'wam-platform[trainer]' (it pins ray {RAY_VERSION}), or use "
                          "training.launcher=torchrun")


def command() -> list[str]:
    return [sys.executable, "-m", RAY_MODULE]


# How the driver runs Ray Train, here and in a RayJob's pods (set before it starts: Ray reads some on import).
DRIVER_ENV = {
    "RAY_CHDIR_TO_TRIAL_DIR": "0",  # workers keep the working directory: relative run paths stay valid
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # each output line once, not also through Ray Train's logger
    "RAY_DEDUP_LOGS": "0",  # every rank's lines, as under torchrun
    "RAY_COLOR_PREFIX": "0",  # logs are files, not terminals
}


def local_environment() -> dict[str, str]:
    """What a local run's driver adds to its environment."""
    return {
        **DRIVER_ENV,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's loopback-only mode: every node address is 127.0.0.1
        "RAY_USAGE_STATS_ENABLED": "0",  # a private single-machine cluster reports nothing anywhere
        # Ray starts workers at niceness 15: on a shared machine the training processes would get a fraction of
        # the CPU that torchrun's (niceness 0) get.
        "RAY_worker_niceness": "0",
    }
