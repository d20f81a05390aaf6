"""One abstraction per kind of training child (as Kubeflow Trainer's plugins): what an attempt of a TrainJob
is in the cluster, chosen by `spec.launcher`. The reconciler, the controller and `wam logs` talk to this
interface only; no launcher is named anywhere else.

    torchrun  JobSet   wam.operators.jobset
    ray       RayJob   wam.operators.rayjob (KubeRay)
"""

from __future__ import annotations

from typing import Protocol

from wam.operators.jobset import JobSetChild
from wam.operators.kube import Kind
from wam.operators.rayjob import RayJobChild
from wam.operators.settings import OperatorSettings
from wam.platform.trainjob import FailureStatus, TrainJob, TrainJobStatus


class TrainingChild(Protocol):
    kind: Kind
    status_field: str  # the TrainJobStatus field that names the current attempt's child

    def build(self, job: TrainJob, attempt: int, settings: OperatorSettings) -> dict:
        """The child of attempt `attempt`, placed and marked for its gang scheduler."""

    def pod_group(self, child: dict, job: TrainJob, settings: OperatorSettings) -> dict | None:
        """The PodGroup the operator creates beside the child, if its gang scheduler needs one."""

    def pod_group_kind(self, job: TrainJob, settings: OperatorSettings) -> Kind | None:
        """The kind of that PodGroup (deleted with a failed attempt), if any."""

    def state(self, child: dict) -> tuple[str, str]:
        """(completed | failed | suspended | running | starting, message)."""

    def classify_failure(self, child: dict, pods: list[dict]) -> FailureStatus:
        """Why a failed attempt failed, from the child and its pods."""

    def pod_selector(self, job: TrainJob, attempt: int) -> dict[str, str]:
        """Labels of the attempt's pods."""

    def log_source(self, job: TrainJob, attempt: int, rank: int) -> tuple[dict[str, str], str]:
        """Labels of the pod whose log is node `rank`'s training log, and its container."""


CHILDREN: dict[str, TrainingChild] = {"torchrun": JobSetChild(), "ray": RayJobChild()}


def training_child(job: TrainJob) -> TrainingChild:
    return CHILDREN[job.spec.launcher]


def started(status: TrainJobStatus) -> str | None:
    """The training child the status records as created, whatever its kind (None: nothing ran yet)."""
    return next((name for child in CHILDREN.values() if (name := getattr(status, child.status_field))), None)
