"""Gang scheduling: all pods of an attempt start together or not at all.

- kueue: the JobSet carries the LocalQueue (and WorkloadPriorityClass) labels and is created suspended;
  from then on Kueue alone flips `spec.suspend` (admission, preemption). The operator never touches it:
  suspending such a job deactivates its Kueue Workload instead.
- volcano / coscheduling: one PodGroup for the whole JobSet (minMember = every pod) and the scheduler's
  name and group marker on the pods; without it each child Job would be its own gang of one.
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


def backend(job: TrainJob, settings: OperatorSettings) -> str:
    return job.spec.scheduling.gang or settings.gang


def queue(job: TrainJob, settings: OperatorSettings) -> str:
    return job.spec.scheduling.queue or settings.queue


def kueue_owns_suspend(job: TrainJob, settings: OperatorSettings) -> bool:
    return backend(job, settings) == "kueue"


def apply(js: dict, job: TrainJob, settings: OperatorSettings) -> None:
    """Mark a JobSet for its gang scheduler (its PodGroup, if any, comes from `pod_group`)."""
    kind = backend(job, settings)
    pod_template = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    priority = job.spec.scheduling.priority_class
    if kind == "kueue":
        js["metadata"]["labels"][KUEUE_QUEUE_LABEL] = queue(job, settings)
        if priority:
            js["metadata"]["labels"][KUEUE_PRIORITY_LABEL] = priority  # a WorkloadPriorityClass
        js["spec"]["suspend"] = True  # Kueue resumes it on admission
        return
    if priority:
        pod_template["spec"]["priorityClassName"] = priority
    if kind == "volcano":
        pod_template["spec"]["schedulerName"] = SCHEDULERS[kind]
        pod_template["metadata"]["annotations"][VOLCANO_GROUP_ANNOTATION] = js["metadata"]["name"]
    elif kind == "coscheduling":
        pod_template["spec"]["schedulerName"] = SCHEDULERS[kind]
        pod_template["metadata"]["labels"][COSCHEDULING_GROUP_LABEL] = js["metadata"]["name"]


def pod_group(js: dict, job: TrainJob, settings: OperatorSettings) -> dict | None:
    """The PodGroup of a JobSet under volcano or coscheduling (same name as the JobSet), else None."""
    kind = backend(job, settings)
    if kind not in ("volcano", "coscheduling"):
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
