"""What an installation decides (the Helm chart's values, mounted as a YAML file): images, the default queue
and gang scheduler, where checkpoints go, the MLflow server, and how each accelerator is placed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from wam.platform.accelerators import Accelerator
from wam.platform.apischema import api_field, from_api
from wam.platform.errors import ConfigError
from wam.platform.trainjob import GANG_BACKENDS, Platform

SETTINGS_ENV = "WAM_OPERATOR_SETTINGS"  # the installation's settings file (the chart mounts it)


@dataclass
class AcceleratorProfile:
    """One kind of node: how many GPUs of how much memory, and how pods land on it."""

    gpus_per_node: int = api_field("", default=8, minimum=1)
    gpu_memory_gib: float = api_field("", default=80.0, minimum=1)
    peak_bf16_tflops: float = api_field("", default=989.0, minimum=1)
    arch: str = api_field("", default="amd64", enum=("amd64", "arm64"))
    gpu_resource: str = api_field("Extended resource of a GPU.", default="nvidia.com/gpu")
    node_selector: dict[str, str] = api_field("", default_factory=dict)
    tolerations: list[dict] = api_field("", default_factory=list)
    cpu: str = api_field("CPU request of a training pod.", default="32")
    memory: str = api_field("Memory request of a training pod.", default="512Gi")
    shm_size: str = api_field("Size of /dev/shm (data-loader workers share batches through it).", default="64Gi")
    # Multi-node NVLink (GB200 NVL72): a ComputeDomain gives the pods IMEX channels, and every pod of a
    # job is kept inside one NVLink clique (the domain's NVLink only reaches within a clique).
    nvlink_domain: bool = api_field("", default=False)
    clique_label: str = api_field("", default="nvidia.com/gpu.clique")

    def accelerator(self, name: str) -> Accelerator:
        return Accelerator(name, self.peak_bf16_tflops * 1e12, self.gpu_memory_gib, self.gpus_per_node, self.arch)


def _default_accelerators() -> dict[str, AcceleratorProfile]:
    gpu_toleration = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "h100": AcceleratorProfile(
            gpus_per_node=8, gpu_memory_gib=80, peak_bf16_tflops=989, arch="amd64",
            node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, tolerations=gpu_toleration,
            cpu="96", memory="1600Gi"),
        "h200": AcceleratorProfile(
            gpus_per_node=8, gpu_memory_gib=141, peak_bf16_tflops=989, arch="amd64",
            node_selector={"nvidia.com/gpu.product": "NVIDIA-H200"}, tolerations=gpu_toleration,
            cpu="96", memory="1600Gi"),
        "gb200": AcceleratorProfile(
            gpus_per_node=4, gpu_memory_gib=186, peak_bf16_tflops=2500, arch="arm64",
            node_selector={"nvidia.com/gpu.product": "NVIDIA-GB200"}, tolerations=gpu_toleration,
            cpu="120", memory="800Gi", nvlink_domain=True),
    }


@dataclass
class MlflowSettings:
    tracking_uri: str | None = api_field("What pods log to (the chart's server or an external one).", default=None)
    external_url: str | None = api_field("What people open in a browser, for status links.", default=None)


@dataclass
class ServingSettings:
    port: int = api_field("", default=8000, minimum=1, maximum=65535)
    cpu: str = api_field("", default="8")
    memory: str = api_field("", default="64Gi")


@dataclass
class RaySettings:
    head_cpu: str = api_field("CPU request of a RayJob's head pod (Ray's control plane and the Ray Train driver; "
                              "no training runs there).", default="4")
    head_memory: str = api_field("Memory of a RayJob's head pod.", default="16Gi")


@dataclass
class OperatorSettings:
    trainer_image: str = api_field("Image of training, quantization and serving pods.",
                                   default="ghcr.io/wam-platform/trainer:0.1.0")
    image_pull_policy: str = api_field("", default="IfNotPresent", enum=("Always", "IfNotPresent", "Never"))
    gang: str = api_field("Default gang scheduler.", default="kueue", enum=GANG_BACKENDS)
    queue: str = api_field("Default Kueue LocalQueue / Volcano queue.", default="default")
    checkpoint_base: str = api_field("Checkpoints of a job default to <base>/<namespace>/<name>.",
                                     default="s3://wam-checkpoints")
    secret_refs: list[str] = api_field("Secrets exposed to every pod (S3 / MLflow credentials).",
                                       default_factory=list)
    service_account: str | None = api_field("ServiceAccount of training pods.", default=None)
    mlflow: MlflowSettings = api_field("", default_factory=MlflowSettings)
    serving: ServingSettings = api_field("", default_factory=ServingSettings)
    ray: RaySettings = api_field("KubeRay RayJobs of TrainJobs with spec.launcher: ray.", default_factory=RaySettings)
    accelerators: dict[str, AcceleratorProfile] = api_field("", default_factory=_default_accelerators)
    progress_interval_seconds: float = api_field("How often running jobs' progress and checkpoints are read.",
                                                 default=30.0, minimum=0.1)
    namespaces: list[str] = api_field("Namespaces to watch (empty: all).", default_factory=list)
    workers: int = api_field("TrainJobs reconciled at the same time.", default=16, minimum=1, maximum=256)

    def platform(self) -> Platform:
        return Platform(accelerators={name: p.accelerator(name) for name, p in self.accelerators.items()},
                        checkpoint_base=self.checkpoint_base, tracking_uri=self.mlflow.tracking_uri)


def load_settings(path: str | Path | None) -> OperatorSettings:
    """Settings from a YAML file (camelCase keys, as in the chart's values); defaults when `path` is None."""
    if path is None:
        return OperatorSettings()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"operator settings {path}: {err}") from None
    return from_api(OperatorSettings, data, f"settings({path})")

