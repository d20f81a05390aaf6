"""Gang scheduling: all pods of an attempt start together or not at all.

- kueue: the JobSet carries the LocalQueue (and WorkloadPriorityClass) labels and is created suspended;
  from then on Kueue alone flips `spec.suspend` (admission, preemption). The operator never touches it:
  suspending such a job deactivates its Kueue Workload instead.
- volcano / coscheduling: one PodGroup for the whole JobSet (minMember = every pod) and the scheduler's
  name and group marker on the pods; without it each child Job would be its own gang of one. A RayJob is
  labelled for KubeRay instead, which makes the PodGroup of its cluster (head and workers) itself.
- none: the default scheduler, no gang.
"""

from __future__ import annotations

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


def apply(obj: dict, job: TrainJob, settings: OperatorSettings, templates: list[dict]) -> None:
    """Mark a JobSet or a RayJob (and its pod templates) for its gang scheduler. A JobSet's PodGroup, if any,
    comes from `pod_group`; KubeRay makes a RayJob's itself (its operator runs with the matching
    batch scheduler)."""
    kind = backend(job, settings)
    priority = job.spec.scheduling.priority_class
    if kind == "kueue":
        obj["metadata"]["labels"][KUEUE_QUEUE_LABEL] = queue(job, settings)
        if priority:
            obj["metadata"]["labels"][KUEUE_PRIORITY_LABEL] = priority  # a WorkloadPriorityClass
        obj["spec"]["suspend"] = True  # Kueue resumes it on admission
        return
    if priority:
        for template in templates:
            template["spec"]["priorityClassName"] = priority
    if obj["kind"] == "RayJob":
        if kind == "volcano":
            obj["metadata"]["labels"][KUBERAY_VOLCANO_QUEUE_LABEL] = queue(job, settings)
            if priority:
                obj["metadata"]["labels"][KUBERAY_PRIORITY_LABEL] = priority
        elif kind == "coscheduling":
            obj["metadata"]["labels"][KUBERAY_GANG_LABEL] = "true"
        return
    for template in templates:
        if kind == "volcano":
            template["spec"]["schedulerName"] = SCHEDULERS[kind]
            template["metadata"]["annotations"][VOLCANO_GROUP_ANNOTATION] = obj["metadata"]["name"]
        elif kind == "coscheduling":
            template["spec"]["schedulerName"] = SCHEDULERS[kind]
            template["metadata"]["labels"][COSCHEDULING_GROUP_LABEL] = obj["metadata"]["name"]


def pod_group(js: dict, job: TrainJob, settings: OperatorSettings) -> dict | None:
    """The PodGroup of a JobSet under volcano or coscheduling (same name as the JobSet), else None."""
    kind = backend(job, settings)
    if kind not in ("volcano", "coscheduling") or js["kind"] != "JobSet":
        return None
    nodes = job.spec.resources.nodes
    resources = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    gpu_resource = settings.accelerators[job.spec.resources.accelerator].gpu_resource
    min_resources = {gpu_resource: str(nodes * gpus_per_node(job, settings.platform()))}
    if "cpu" in resources["requests"]:
        min_resources["cpu"] = _times(resources["requests"]["cpu"], nodes)
    meta = {k: v for k, v in js["metadata"].items() if k != "annotations"}
    meta["labels"] = {k: v for k, v in meta["labels"].items() if not k.startswith("kueue.x-k8s.io/")}
    if kind == "volcano":
        spec = {"minMember": nodes, "minResources": min_resources, "queue": queue(job, settings)}
        if job.spec.scheduling.priority_class:
            spec["priorityClassName"] = job.spec.scheduling.priority_class
        return {"apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "PodGroup", "metadata": meta, "spec": spec}
    spec = {"minMember": nodes, "minResources": min_resources,
            "scheduleTimeoutSeconds": job.spec.scheduling.schedule_timeout_seconds}
    return {"apiVersion": "scheduling.x-k8s.io/v1alpha1", "kind": "PodGroup", "metadata": meta, "spec": spec}


def _times(quantity: str, n: int) -> str:
    """A CPU quantity times n ("96" -> "384", "500m" -> "2000m")."""
    if quantity.endswith("m"):
        return f"{int(quantity[:-1]) * n}m"
    return str(int(float(quantity) * n)) if float(quantity) * n == int(float(quantity) * n) else f"{float(quantity) * n:g}"
