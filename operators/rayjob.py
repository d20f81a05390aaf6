"""Pure builder of a training attempt under Ray (TrainJob spec.launcher: ray): a KubeRay RayJob.

The RayJob's cluster is a head (Ray's control plane and the Ray Train driver, no GPUs) and one worker group
of `nodes` GPU pods placed as a JobSet's pods would be (wam.operators.placement), gang-scheduled through
Kueue or KubeRay's batch-scheduler integration (wam.operators.gang). Its entrypoint is the same driver
`wam train --launcher ray` runs locally; Ray Train restarts failed workers inside the attempt
(training.max_failures), and a failed RayJob is a failed attempt to the operator, restarted as a new
RayJob under the TrainJob's failure policy like a JobSet.
"""

from __future__ import annotations

import shlex

from wam.operators import builders, gang, placement
from wam.operators.settings import OperatorSettings
from wam.platform.launch import RAY_DRIVER_ENV, RAY_VERSION, training_command
from wam.platform.trainjob import TrainJob

API_VERSION = "ray.io/v1"
WORKER_GROUP = builders.REPLICATED_JOB
HEAD_COMPONENT = "ray-head"
SUBMITTER_COMPONENT = "ray-submitter"


def entrypoint() -> str:
    return shlex.join(training_command("ray"))


def _ray_env(job: TrainJob, settings: OperatorSettings) -> list[dict]:
    driver = [{"name": key, "value": value} for key, value in RAY_DRIVER_ENV.items()]
    return builders.trainer_env(job, settings) + driver


def _submitter(job: TrainJob, attempt: int, settings: OperatorSettings) -> dict:
    """KubeRay's submitter pod (`ray job submit`, command set by KubeRay), as locked down as the others."""
    container = {
        "name": "submitter",
        "image": job.spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": builders.security_context(),
    }
    spec = {"restartPolicy": "Never", "containers": [container], "volumes": [{"name": "tmp", "emptyDir": {}}],
            "securityContext": builders.pod_security_context(), "enableServiceLinks": False}
    return builders.attempt_template(job, attempt, SUBMITTER_COMPONENT, spec)


def rayjob(job: TrainJob, attempt: int, settings: OperatorSettings) -> dict:
    """One training attempt on Ray: a RayJob whose cluster lives exactly as long as the job."""
    name = builders.attempt_name(job, attempt)
    nodes = job.spec.resources.nodes
    env = _ray_env(job, settings)
    head_resources = {"requests": {"cpu": settings.ray.head_cpu, "memory": settings.ray.head_memory},
                      "limits": {"memory": settings.ray.head_memory}}
    head = builders.attempt_template(job, attempt, HEAD_COMPONENT, builders.trainer_pod_spec(
        job, settings, builders.trainer_container(job, settings, HEAD_COMPONENT, env, head_resources)))
    worker = builders.attempt_template(job, attempt, "training", builders.trainer_pod_spec(
        job, settings, builders.trainer_container(job, settings, builders.CONTAINER, env,
                                                  builders.node_resources(job, settings))))
    placement.apply_ray_workers(worker, job, settings)
    submitter = _submitter(job, attempt, settings)
    rj = {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": builders.metadata(job, name, "training", **{builders.ATTEMPT_LABEL: str(attempt)}),
        "spec": {
            "entrypoint": entrypoint(),
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": submitter,
            "shutdownAfterJobFinishes": True,  # the cluster goes with the job (Kueue also requires it)
            "backoffLimit": 0,  # a failed attempt is the operator's to restart, counted in the TrainJob
            "suspend": job.spec.suspend,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": False,  # a gang of fixed size
                # No CPUs for Ray tasks on the head: training workers need GPUs, the rest stays off the driver.
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": head},
                "workerGroupSpecs": [{"groupName": WORKER_GROUP, "replicas": nodes, "minReplicas": nodes,
                                      "maxReplicas": nodes, "rayStartParams": {}, "template": worker}],
            },
        },
    }
    gang.apply(rj, job, settings, [head, worker, submitter])
    return rj
