"""The `TrainJob` API (wam.dev/v1alpha1): spec and status types, validation, and the training config a job runs.

Torch-free: the operator, `wam submit` and the CRD generator (wam.platform.crd) all use these types.
A TrainJob embeds overrides of the same YAML schema the local `wam train` reads (`spec.config`); the
fields the platform owns (model preset, datasets, nodes, checkpoint location, tracking) are set by the
spec, not by the overrides, so one value has one place.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wam.platform.accelerators import ACCELERATORS, Accelerator
from wam.platform.apischema import api_field, from_api
from wam.platform.config import LAUNCHERS, DatasetEntry, WamConfig, check_memory, config_from_dict
from wam.platform.errors import ConfigError
from wam.platform.presets import PRESETS

GROUP = "wam.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainJob"
PLURAL = "trainjobs"
SHORT_NAMES = ("tj",)
CATEGORIES = ("wam", "all-training")
MAX_NAME_LENGTH = 40  # pods are named <job>-<attempt>-node-<i>-<j>; hostnames stop at 63 characters
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # what a hostname part may be: pods and services take the job's name

GANG_BACKENDS = ("kueue", "volcano", "coscheduling", "none")
QUANTIZE_WHEN = ("every", "final", "never")
# Why a training attempt failed, as classified from its pods. InvalidInput (exit code 2: a config, data
# or checkpoint the user must fix) never restarts: a restart would fail the same way.
RESTARTABLE_FAILURES = ("Disruption", "Error", "OOMKilled")
FAILURE_REASONS = (*RESTARTABLE_FAILURES, "InvalidInput", "InvalidSpec", "DeadlineExceeded")
_PROFILE_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SECRET_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # a DNS subdomain, as Secret names are


def _immutable(what: str) -> tuple[tuple[str, str], ...]:
    """A CEL transition rule. Kept to small, bounded fields: the API server refuses rules whose estimated
    cost is too high. The training config as a whole is fixed by the operator instead (rendered once)."""
    return (("self == oldSelf", f"{what} cannot change after creation; create a new TrainJob"),)


# -- spec -------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    preset: str = api_field("Model preset (`wam model list`).", default="???", enum=tuple(PRESETS))
    initial_weights: str | None = api_field(
        "safetensors from `wam model import` (local path in the image or s3:// URI), used when the job has no "
        "checkpoint yet.", default=None, max_length=1024)


@dataclass
class ResourcesSpec:
    accelerator: str = api_field("Accelerator profile of the training nodes (h100, h200, gb200, or one the "
                                 "installation defines).", default="h100", pattern=_PROFILE_NAME, max_length=63)
    nodes: int = api_field("Training nodes (pods), one torchrun agent each.", default=1, minimum=1, maximum=1024)
    gpus_per_node: int | None = api_field(
        "GPUs (training processes) per node; default: every GPU of the node (8 on H100, 4 on GB200).",
        default=None, minimum=1, maximum=8, server_default=False)
    memory: str | None = api_field("Memory request of each pod (e.g. 1600Gi); default: the accelerator profile's.",
                                   default=None, max_length=32, server_default=False)


@dataclass
class SchedulingSpec:
    gang: str | None = api_field(
        "Gang scheduler: kueue (LocalQueue), volcano or coscheduling (PodGroup), none; default: the platform's.",
        default=None, enum=GANG_BACKENDS, server_default=False)
    queue: str | None = api_field("Kueue LocalQueue or Volcano queue; default: the platform's.", default=None,
                                  max_length=63, server_default=False)
    priority_class: str | None = api_field(
        "PriorityClass of the pods (Kueue: WorkloadPriorityClass).", default=None, max_length=253)
    schedule_timeout_seconds: int = api_field(
        "volcano/coscheduling: how long a partially placed gang may wait before its pods are released.",
        default=600, minimum=10, maximum=86400)


@dataclass
class CheckpointSpec:
    uri: str | None = api_field(
        "Where step-<N> checkpoint folders go (s3://... or a mounted path); default: the platform's checkpoint "
        "base + /<namespace>/<name>. A TrainJob created again with the same URI resumes from it.",
        default=None, max_length=1024, server_default=False)
    interval: int = api_field("Training steps between checkpoints.", default=500, minimum=1)
    keep: int = api_field("Complete checkpoints kept (0 = all).", default=3, minimum=0)


@dataclass
class FailurePolicySpec:
    max_restarts: int = api_field(
        "Restarts of the whole gang (from the newest complete checkpoint) before the job fails.",
        default=3, minimum=0, maximum=100)
    restart_on: list[str] = api_field(
        "Failures that restart: Disruption (node lost, preempted, evicted), Error (a process exited non-zero), "
        "OOMKilled. Invalid input (exit code 2) never restarts.",
        default_factory=lambda: ["Disruption", "Error"], enum=RESTARTABLE_FAILURES, max_items=3)


@dataclass
class TrackingSpec:
    experiment: str = api_field("MLflow experiment of the job's run.", default="wam", max_length=256)


@dataclass
class ServingSpec:
    replicas: int = api_field("Policy-server replicas (0: no serving).", default=0, minimum=0, maximum=64)
    accelerator: str = api_field("Accelerator profile of the serving pods.", default="h100", pattern=_PROFILE_NAME,
                                 max_length=63)
    api_key_secret: str | None = api_field(
        "A Secret in the job's namespace whose key `api-key` robots must send to use the policy (openpi-client's "
        "api_key); none: any connection that reaches the Service may.", default=None, pattern=_SECRET_NAME,
        max_length=253, server_default=False)


@dataclass
class HandoffSpec:
    quantize: str = api_field(
        "Quantize to NVFP4: every complete checkpoint, the final one, or never.", default="final", enum=QUANTIZE_WHEN)
    serving: ServingSpec = api_field("Serve the newest quantized model.", default_factory=ServingSpec)


@dataclass
class EnvVar:
    name: str = api_field("", default="???", pattern=r"[A-Za-z_][A-Za-z0-9_]*", max_length=256)
    value: str = api_field("", default="")


@dataclass
class TrainJobSpec:
    model: ModelSpec = api_field("The World Action Model to train.", default_factory=ModelSpec,
                                 rules=_immutable("spec.model"))
    datasets: list[DatasetEntry] = api_field(
        "LeRobot datasets, mixed by weight (empty: the config's data source, e.g. synthetic for smoke tests).",
        default_factory=list, max_items=64)
    config: dict[str, Any] = api_field(
        "Overrides of the training YAML (the schema of `wam train`), e.g. {training: {steps: 1000}}.",
        default_factory=dict)
    launcher: str = api_field(
        "How the training processes start: torchrun (a JobSet of indexed pods) or ray (a KubeRay RayJob: a head "
        "and a worker group running Ray Train, which restarts failed workers itself, config "
        "training.max_failures times, before the attempt fails).", default="torchrun", enum=LAUNCHERS,
        rules=_immutable("spec.launcher"))
    resources: ResourcesSpec = api_field("Nodes and accelerators.", default_factory=ResourcesSpec,
                                         rules=_immutable("spec.resources") + (
                                             ("!has(self.gpusPerNode) || self.accelerator != 'gb200' || "
                                              "self.gpusPerNode <= 4", "a GB200 node has 4 GPUs"),))
    scheduling: SchedulingSpec = api_field("Queue, priority and gang scheduling.", default_factory=SchedulingSpec)
    checkpoint: CheckpointSpec = api_field("Checkpoint location and cadence.", default_factory=CheckpointSpec,
                                           rules=_immutable("spec.checkpoint"))
    failure_policy: FailurePolicySpec = api_field("When a failed attempt is restarted.",
                                                  default_factory=FailurePolicySpec)
    tracking: TrackingSpec = api_field("MLflow tracking.", default_factory=TrackingSpec)
    handoff: HandoffSpec = api_field(
        "What happens to complete checkpoints.", default_factory=HandoffSpec,
        rules=(("self.serving.replicas == 0 || self.quantize != 'never'",
                "serving needs a quantized model: set handoff.quantize to every or final"),))
    image: str | None = api_field("Trainer image; default: the platform's.", default=None, max_length=512,
                                  server_default=False)
    env: list[EnvVar] = api_field("Extra environment variables of the training pods.", default_factory=list,
                                  max_items=64)
    secret_refs: list[str] = api_field(
        "Secrets whose keys become environment variables of every pod (S3 and MLflow credentials); "
        "default: the platform's.", default_factory=list, max_items=16, server_default=False)
    suspend: bool = api_field("Suspend the job (its pods are deleted; resuming continues from the newest "
                              "checkpoint). With Kueue, the queue decides when a resumed job runs.", default=False)
    active_deadline_seconds: int | None = api_field(
        "Fail the job after this many seconds of running, restarts included.", default=None, minimum=1)


# -- status -----------------------------------------------------------------------------------------------

CONDITION_TYPES = ("Created", "Admitted", "Suspended", "Running", "Restarting", "Checkpointed", "Succeeded",
                   "Failed", "Quantized", "Serving")
PHASES = ("Pending", "Queued", "Suspended", "Running", "Restarting", "Succeeded", "Failed")


@dataclass
class Condition:
    type: str = api_field("", default="???", enum=CONDITION_TYPES)
    status: str = api_field("", default="???", enum=("True", "False", "Unknown"))
    reason: str = api_field("CamelCase reason.", default="", max_length=1024)
    message: str = api_field("", default="", max_length=32768)
    last_transition_time: str = api_field("", default="")
    observed_generation: int | None = api_field("", default=None)


@dataclass
class ProgressStatus:
    step: int = api_field("Last step reported by the training job.", default=0)
    total_steps: int = api_field("", default=0)
    summary: str = api_field("step/total, for `kubectl get`.", default="")
    loss: float | None = api_field("", default=None)
    tokens_per_second: float | None = api_field("", default=None)
    updated: str | None = api_field("When the training job last reported.", default=None)


@dataclass
class CheckpointStatus:
    step: int = api_field("", default=0)
    uri: str = api_field("", default="")
    time: str | None = api_field("", default=None)


@dataclass
class TrackingStatus:
    run_id: str = api_field("MLflow run id.", default="")
    url: str | None = api_field("MLflow run page.", default=None)


@dataclass
class QuantizedStatus:
    step: int = api_field("Checkpoint step of the quantized model.", default=0)
    uri: str = api_field("", default="")
    job: str | None = api_field("The quantization Job.", default=None)


@dataclass
class ServingStatus:
    endpoint: str = api_field("ws://host:port of the policy server.", default="")
    embodiments: list[str] = api_field("The robot kinds it serves (the training data's profiles with actions; "
                                       "synthetic for a model of procedural data): each connects at "
                                       "endpoint/<name>; the endpoint itself serves serving.embodiment, else the "
                                       "first.", default_factory=list)
    step: int = api_field("Checkpoint step being served.", default=0)
    ready_replicas: int = api_field("", default=0)


@dataclass
class FailureStatus:
    reason: str = api_field("", default="", enum=FAILURE_REASONS)
    message: str = api_field("", default="")
    time: str | None = api_field("", default=None)


@dataclass
class TrainJobStatus:
    phase: str = api_field("", default="Pending", enum=PHASES)
    conditions: list[Condition] = api_field("", default_factory=list, list_map_keys=("type",))
    observed_generation: int | None = api_field("", default=None)
    restarts: int = api_field("Restarts so far; never reset.", default=0)
    attempt: int = api_field("Index of the current training attempt (its JobSet or RayJob is <name>-<attempt>).",
                             default=0)
    jobset: str | None = api_field("The current attempt's JobSet.", default=None)
    ray_job: str | None = api_field("The current attempt's RayJob (spec.launcher: ray).", default=None)
    progress: ProgressStatus | None = api_field("", default=None)
    checkpoint: CheckpointStatus | None = api_field("Newest complete checkpoint.", default=None)
    mlflow: TrackingStatus | None = api_field("", default=None)
    quantized: QuantizedStatus | None = api_field("Newest quantized model.", default=None)
    serving: ServingStatus | None = api_field("", default=None)
    last_failure: FailureStatus | None = api_field("Why the last attempt failed.", default=None)
    start_time: str | None = api_field("", default=None)
    completion_time: str | None = api_field("", default=None)


# -- a whole object ---------------------------------------------------------------------------------------


@dataclass
class TrainJob:
    name: str
    namespace: str
    spec: TrainJobSpec
    uid: str = ""
    generation: int = 1
    status: TrainJobStatus = field(default_factory=TrainJobStatus)

    @property
    def run_name(self) -> str:
        """The job's name in MLflow and the training config: unique across namespaces."""
        return f"{self.namespace}.{self.name}"


def parse(obj: dict) -> TrainJob:
    """A TrainJob from its API object (a dict as the API server returns it); ConfigError names the bad field."""
    if obj.get("apiVersion") not in (None, API_VERSION) or obj.get("kind") not in (None, KIND):
        raise ConfigError(f"expected apiVersion {API_VERSION} kind {KIND}, got {obj.get('apiVersion')} {obj.get('kind')}")
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise ConfigError("metadata.name: required")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"metadata.name: {name!r} is longer than {MAX_NAME_LENGTH} characters (pod hostnames "
                          "derived from it must stay within 63)")
    if not re.match(DNS_LABEL, name):
        raise ConfigError(f"metadata.name: {name!r} is not a DNS label: lowercase letters, digits and '-', starting "
                          "and ending with a letter or digit (it names the job's pods and services)")
    if not isinstance(obj.get("spec"), dict):
        raise ConfigError(f"spec: required, a mapping (model, resources, ...); got {obj.get('spec')!r}")
    status = obj.get("status") or {}
    return TrainJob(name=name, namespace=meta.get("namespace") or "default", uid=meta.get("uid", ""),
                    generation=meta.get("generation", 1), spec=from_api(TrainJobSpec, obj.get("spec"), "spec"),
                    status=parse_status(status))


def parse_status(status: dict) -> TrainJobStatus:
    """Status as written by this operator; anything unreadable (an older version's field) is dropped."""
    try:
        return from_api(TrainJobStatus, status, "status")
    except ConfigError:
        known = {k: v for k, v in status.items() if k in ("restarts", "attempt", "conditions", "phase")}
        try:
            return from_api(TrainJobStatus, known, "status")
        except ConfigError:
            return TrainJobStatus()


# -- the training config of a job ---------------------------------------------------------------------------

# Config keys the spec owns -> the spec field to use instead.
OWNED_CONFIG_KEYS = {
    "name": "metadata.name",
    "output_dir": "(the pod's working directory)",
    "model.preset": "spec.model.preset",
    "checkpoint.uri": "spec.checkpoint.uri",
    "checkpoint.interval": "spec.checkpoint.interval",
    "checkpoint.keep": "spec.checkpoint.keep",
    "checkpoint.init_weights": "spec.model.initialWeights",
    "data.datasets": "spec.datasets",
    "training.nodes": "spec.resources.nodes",
    "training.processes": "spec.resources.gpusPerNode",
    "training.launcher": "spec.launcher",
    "tracking.uri": "(the platform's MLflow server)",
    "tracking.experiment": "spec.tracking.experiment",
}
RUN_DIR = "/workspace/runs"


@dataclass(frozen=True)
class Platform:
    """What the installation decides (Helm values): defaults a TrainJob may leave out."""

    accelerators: dict[str, Accelerator] = field(default_factory=lambda: dict(ACCELERATORS))
    checkpoint_base: str = "s3://wam-checkpoints"
    tracking_uri: str | None = None


def gpus_per_node(job: TrainJob, platform: Platform) -> int:
    return job.spec.resources.gpus_per_node or platform.accelerators[job.spec.resources.accelerator].devices_per_node


def checkpoint_uri(job: TrainJob, platform: Platform) -> str:
    return job.spec.checkpoint.uri or f"{platform.checkpoint_base.rstrip('/')}/{job.namespace}/{job.name}"


def training_config(job: TrainJob, platform: Platform) -> WamConfig:
    """The config the job's pods run: the spec's overrides plus the fields the spec owns, validated; and
    checked against the accelerator's memory. ConfigError says what to change."""
    spec = job.spec
    if spec.handoff.serving.replicas and spec.handoff.quantize == "never":
        raise ConfigError("spec.handoff: serving needs a quantized model: set handoff.quantize to every or final")
    overrides = OmegaConf.create(spec.config)  # once: building it is most of this function's own time
    for key, owner in OWNED_CONFIG_KEYS.items():
        if OmegaConf.select(overrides, key, default=None) is not None:
            raise ConfigError(f"spec.config.{key} is set by the platform; use {owner} instead")
    accelerator = platform.accelerators.get(spec.resources.accelerator)
    if accelerator is None:
        raise ConfigError(f"spec.resources.accelerator: this installation has no {spec.resources.accelerator!r} "
                          f"profile; it has {', '.join(platform.accelerators)}")
    per_node = gpus_per_node(job, platform)
    if per_node > accelerator.devices_per_node:
        raise ConfigError(f"spec.resources.gpusPerNode: a {accelerator.name} node has {accelerator.devices_per_node} "
                          f"GPUs, the job asks for {per_node}")
    if not spec.datasets and OmegaConf.select(overrides, "data.source") != "synthetic":
        raise ConfigError("spec.datasets is empty: list LeRobot datasets ([{uri: s3://..., profile: droid}]), or "
                          "set spec.config.data.source: synthetic for a smoke test on procedural data")
    owned = {
        "name": job.run_name,
        "output_dir": RUN_DIR,
        "model": {"preset": spec.model.preset},
        "checkpoint": {"uri": checkpoint_uri(job, platform), "interval": spec.checkpoint.interval,
                       "keep": spec.checkpoint.keep, "init_weights": spec.model.initial_weights},
        "training": {"nodes": spec.resources.nodes, "processes": per_node, "launcher": spec.launcher},
        "tracking": {"experiment": spec.tracking.experiment, "uri": platform.tracking_uri},
    }
    if spec.datasets:
        owned["data"] = {"source": "lerobot", "datasets": [dataclasses.asdict(d) for d in spec.datasets]}
    try:
        merged = OmegaConf.to_container(OmegaConf.merge(overrides, owned))
    except OmegaConfBaseException as err:
        raise ConfigError(f"spec.config: {str(err).splitlines()[0]}") from None
    cfg = config_from_dict(merged, source="spec.config")
    check_memory(cfg, accelerator.memory_gib, f"one {accelerator.name} GPU")
    return cfg
