"""Training under Ray Train (`training.launcher: ray`): the driver, and the function each worker runs.

    WAM_CONFIG=run/config.yaml python -m wam.trainer.titan.ray_train   # `wam train --launcher ray` does this

in the environment `wam train` gives it (wam.app.local_training). The driver starts a private Ray cluster on this machine
(loopback only), or joins the cluster it was submitted to (a KubeRay RayJob sets RAY_ADDRESS),
and runs Ray Train's TorchTrainer with one worker per training process. Each worker runs torchtitan's
own `main` exactly as a torchrun process does: Ray Train only gives it torchrun's environment (rank,
world size, rendezvous address), torchtitan creates the process group itself (gloo on CPU, nccl on
GPUs, with its timeouts), so the model, data, checkpoints and MLflow run are those of the torchrun path.

When a worker dies, Ray Train stops the group and starts a new one (`training.max_failures` times); the
new workers resume from the newest COMPLETE checkpoint through the checkpoint manager's manifests, and
rank 0 logs into the same MLflow run (found by its job tag). Ray's own checkpoint reporting is not used.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig, get_context
from ray.train.backend import Backend
from ray.train.torch import TorchConfig, TorchTrainer

from wam.platform import termination
from wam.platform.config import WamConfig, load_config
from wam.platform.errors import UserError
from wam.platform.launch import CONFIG_ARGS, RAY_LOCAL_WORKER_SETUP
from wam.platform.storage import probe_writable


def _rendezvous() -> tuple[str, int]:
    """Rank 0's address and a free port on it (torchrun's --standalone picks one the same way)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def _torchrun_environment(addr: str, port: int) -> None:
    ctx = get_context()
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(ctx.get_world_rank()),
                      WORLD_SIZE=str(ctx.get_world_size()), LOCAL_RANK=str(ctx.get_local_rank()),
                      LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()), GROUP_RANK=str(ctx.get_node_rank()))


class _TorchrunBackend(Backend):
    def on_start(self, worker_group, backend_config) -> None:
        addr, port = worker_group.execute_single(0, _rendezvous)
        worker_group.execute(_torchrun_environment, addr=addr, port=port)


class TorchrunEnvironment(TorchConfig):
    """Ray Train's torch set-up without its process group: the workers get torchrun's environment and
    torchtitan initialises distributed training itself, as it does under torchrun."""

    @property
    def backend_cls(self):
        return _TorchrunBackend


def train_worker(config: dict[str, str]) -> None:
    """One training process: torchtitan's main with the project's config function."""
    os.environ["WAM_CONFIG"] = config["config"]
    sys.argv = [sys.argv[0], *CONFIG_ARGS]  # torchtitan's main reads its arguments from here
    from wam.trainer.titan import train  # the CPU support before torchtitan, as under torchrun

    train.main()


def fit(cfg: WamConfig, config_path: Path) -> None:
    """Run the training on Ray Train; raises Ray's TrainingFailedError once restarts are used up."""
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # the RayJob's cluster
    else:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.world_size), include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": RAY_LOCAL_WORKER_SETUP})
    # `wam train` stops a run with SIGTERM to its session: leave through `finally`, so that Ray shuts down in
    # order (Ray's own handler, installed by ray.init, would abort the driver).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": str(config_path)},
            torch_config=TorchrunEnvironment(),
            scaling_config=ScalingConfig(num_workers=cfg.world_size,
                                         use_gpu=ray.cluster_resources().get("GPU", 0) >= 1),
            run_config=RunConfig(name=cfg.name, storage_path=str((cfg.run_dir / "ray").resolve()),
                                 failure_config=FailureConfig(max_failures=cfg.training.max_failures)),
        )
        trainer.fit()
    finally:
        ray.shutdown()


def _user_error(err: BaseException) -> UserError | None:
    """The UserError a worker failed with, if any (Ray re-raises worker exceptions as subclasses of theirs)."""
    failures = getattr(err, "worker_failures", None) or {}
    return next((e for e in failures.values() if isinstance(e, UserError)), None)


def main() -> None:
    path = Path(os.environ["WAM_CONFIG"]).resolve()
    try:
        cfg = load_config(path)
        probe_writable(cfg.checkpoint_uri)  # before any worker starts: a restart cannot fix this
        fit(cfg, path)
    except UserError as err:
        _fail(termination.INVALID_INPUT, str(err), 2)
    except Exception as err:  # noqa: BLE001 - said as the job's last words, for the RayJob's status
        cause = _user_error(err)
        if cause is not None:
            _fail(termination.INVALID_INPUT, str(cause), 2)
        else:
            _fail(termination.ERROR, f"{type(err).__name__}: {err}", 1)


def _fail(reason: str, message: str, code: int) -> None:
    termination.announce(reason, message)  # its last line: KubeRay puts a failed job's log tail in the RayJob
    sys.exit(code)


if __name__ == "__main__":
    # Run through the importable module: Ray sends the worker function to the workers by reference.
    from wam.trainer.titan import ray_train

    ray_train.main()
