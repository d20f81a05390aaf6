"""Gang scheduling: all pods of an attempt start together or not at all.

- kueue: the JobSet carries the LocalQueue (and WorkloadPriorityClass) labels and is created suspended;
  from then on Kueue alone flips `spec.suspend` (admission, preemption). The operator never touches it:
  suspending such a job deactivates its Kueue Workload instead.
- volcano / coscheduling: one PodGroup for the whole gang (minMember = every pod) and the scheduler's name and
  group marker on the pods; or, for KubeRay, labels from which it makes its cluster's PodGroup itself.
- none: the default scheduler, no gang.

Which of these pieces a training child uses is its own business (wam.operators.jobset, wam.operators.rayjob).
"""

from __future__ import annotations

from wam.operators import kube
from wam.operators.settings import OperatorSettings
from wam.platform.trainjob import TrainJob, gpus_per_node

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
COSCHEDULING_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"
SCHEDULERS = {"volcano": "volcano", "coscheduling": "scheduler-plugins-scheduler"}
# KubeRay's batch-scheduler integration reads these from a RayJob (copied to its RayCluster).
KUBERAY_VOLCANO_QUEUE_LABEL = "volcano.sh/queue-name"
KUBERAY_PRIORITY_LABEL = "ray.io/priority-class-name"
KUBERAY_GANG_LABEL = "ray.io/gang-scheduling-enabled"


def backend(job: TrainJob, settings: OperatorSettings) -> str:
    return job.spec.scheduling.gang or settings.gang


def queue(job: TrainJob, settings: OperatorSettings) -> str:
    return job.spec.scheduling.queue or settings.queue


def kueue_owns_suspend(job: TrainJob, settings: OperatorSettings) -> bool:
    return backend(job, settings) == "kueue"


def queue_in_kueue(obj: dict, job: TrainJob, settings: OperatorSettings) -> bool:
    """Under Kueue: the LocalQueue (and WorkloadPriorityClass) labels, and created suspended (Kueue resumes it on
    admission). False for the other backends."""
    if backend(job, settings) != "kueue":
        return False
    obj["metadata"]["labels"][KUEUE_QUEUE_LABEL] = queue(job, settings)
    if job.spec.scheduling.priority_class:
        obj["metadata"]["labels"][KUEUE_PRIORITY_LABEL] = job.spec.scheduling.priority_class
    obj["spec"]["suspend"] = True
    return True


def set_priority(templates: list[dict], job: TrainJob) -> None:
    if job.spec.scheduling.priority_class:
        for template in templates:
            template["spec"]["priorityClassName"] = job.spec.scheduling.priority_class


def join_pod_group(templates: list[dict], group: str, job: TrainJob, settings: OperatorSettings) -> None:
    """Volcano / coscheduling: the gang scheduler's name and the PodGroup `group` on each pod template."""
    kind = backend(job, settings)
    for template in templates:
        if kind == "volcano":
            template["spec"]["schedulerName"] = SCHEDULERS[kind]
            template["metadata"]["annotations"][VOLCANO_GROUP_ANNOTATION] = group
        elif kind == "coscheduling":
            template["spec"]["schedulerName"] = SCHEDULERS[kind]
            template["metadata"]["labels"][COSCHEDULING_GROUP_LABEL] = group


def kuberay_gang_labels(obj: dict, job: TrainJob, settings: OperatorSettings) -> None:
    """What KubeRay's batch-scheduler integration reads from a RayJob to make its cluster's PodGroup itself."""
    kind, priority = backend(job, settings), job.spec.scheduling.priority_class
    if kind == "volcano":
        obj["metadata"]["labels"][KUBERAY_VOLCANO_QUEUE_LABEL] = queue(job, settings)
        if priority:
            obj["metadata"]["labels"][KUBERAY_PRIORITY_LABEL] = priority
    elif kind == "coscheduling":
        obj["metadata"]["labels"][KUBERAY_GANG_LABEL] = "true"


def pod_group_kind(job: TrainJob, settings: OperatorSettings) -> kube.Kind | None:
    return {"volcano": kube.VOLCANO_POD_GROUP, "coscheduling": kube.COSCHEDULING_POD_GROUP}.get(backend(job, settings))


def pod_group(meta: dict, pod_resources: dict, job: TrainJob, settings: OperatorSettings) -> dict | None:
    """Under volcano or coscheduling, the PodGroup of a gang of `nodes` pods of `pod_resources` each, named and
    labelled as the object whose metadata is `meta`; else None."""
    kind = backend(job, settings)
    if kind not in ("volcano", "coscheduling"):
        return None
    nodes = job.spec.resources.nodes
    gpu_resource = settings.accelerators[job.spec.resources.accelerator].gpu_resource
    min_resources = {gpu_resource: str(nodes * gpus_per_node(job, settings.platform()))}
    if "cpu" in pod_resources["requests"]:
        min_resources["cpu"] = _times(pod_resources["requests"]["cpu"], nodes)
    meta = {k: v for k, v in meta.items() if k != "annotations"}
    meta["labels"] = {k: v for k, v in meta["labels"].items() if not k.startswith("kueue.x-k8s.io/")}
    if kind == "volcano":
        spec = {"minMember": nodes, "minResources": min_resources, "queue": queue(job, settings)}
        if job.spec.scheduling.priority_class:
            spec["priorityClassName"] = job.spec.scheduling.priority_class
        return {"apiVersion": kube.VOLCANO_POD_GROUP.api_version, "kind": "PodGroup", "metadata": meta, "spec": spec}
    spec = {"minMember": nodes, "minResources": min_resources,
            "scheduleTimeoutSeconds": job.spec.scheduling.schedule_timeout_seconds}
    return {"apiVersion": kube.COSCHEDULING_POD_GROUP.api_version, "kind": "PodGroup", "metadata": meta, "spec": spec}


def _times(quantity: str, n: int) -> str:
    """A CPU quantity times n ("96" -> "384", "500m" -> "2000m")."""
    if quantity.endswith("m"):
        return f"{int(quantity[:-1]) * n}m"
    return str(int(float(quantity) * n)) if float(quantity) * n == int(float(quantity) * n) else f"{float(quantity) * n:g}"
