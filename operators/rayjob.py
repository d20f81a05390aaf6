"""The training child of `spec.launcher: ray`: one KubeRay RayJob per attempt (wam.operators.training_child).

The RayJob's cluster is a head (Ray's control plane and the Ray Train driver, no GPUs) and one worker group
of `nodes` GPU pods placed as a JobSet's pods would be (wam.operators.placement), gang-scheduled through
Kueue or KubeRay's batch-scheduler integration (wam.operators.gang). Its entrypoint is the same driver
`wam train --launcher ray` runs locally; Ray Train restarts failed workers inside the attempt
(training.max_failures), and a failed RayJob is a failed attempt to the operator, restarted as a new
RayJob under the TrainJob's failure policy like a JobSet. KubeRay's submitter pod (`ray job submit`, then
`ray job logs --follow`) holds the driver's output, every rank's lines included: that is the job's log.
"""

from __future__ import annotations

import shlex

from wam.operators import builders, gang, kube, placement
from wam.operators.settings import OperatorSettings
from wam.operators.status import classify_failure
from wam.platform import termination
from wam.platform.errors import ConfigError
from wam.platform.launch import RAY_DRIVER_ENV, RAY_VERSION, training_command
from wam.platform.trainjob import FailureStatus, TrainJob

WORKER_GROUP = "node"
HEAD_COMPONENT = "ray-head"
SUBMITTER_COMPONENT = "ray-submitter"
SUBMITTER_CONTAINER = "submitter"


def entrypoint() -> str:
    return shlex.join(training_command("ray"))


def _ray_env(job: TrainJob, settings: OperatorSettings) -> list[dict]:
    driver = [{"name": key, "value": value} for key, value in RAY_DRIVER_ENV.items()]
    return builders.trainer_env(job, settings) + driver


def _submitter(job: TrainJob, attempt: int, settings: OperatorSettings) -> dict:
    """KubeRay's submitter pod (`ray job submit`, command set by KubeRay), as locked down as the others."""
    container = {
        "name": SUBMITTER_CONTAINER,
        "image": job.spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": builders.scratch_env("/tmp"),
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": builders.security_context(),
    }
    spec = {"restartPolicy": "Never", "containers": [container], "volumes": [{"name": "tmp", "emptyDir": {}}],
            "securityContext": builders.pod_security_context(), "enableServiceLinks": False}
    return builders.attempt_template(job, attempt, SUBMITTER_COMPONENT, spec)


def _place_workers(template: dict, job: TrainJob, settings: OperatorSettings) -> None:
    """The workers' nodes and GPUs; without Kueue, pod affinity to each other keeps them in one NVLink clique
    (the first lands anywhere, the others where it did)."""
    if placement.place_pod(template, job, settings):
        template["spec"]["affinity"]["podAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": dict(template["metadata"]["labels"])},
            "topologyKey": placement.profile(job, settings).clique_label}]}


class RayJobChild:
    kind = kube.RAYJOB
    status_field = "ray_job"

    def build(self, job: TrainJob, attempt: int, settings: OperatorSettings) -> dict:
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
        _place_workers(worker, job, settings)
        submitter = _submitter(job, attempt, settings)
        rj = {
            "apiVersion": self.kind.api_version,
            "kind": self.kind.kind,
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
        if not gang.queue_in_kueue(rj, job, settings):
            gang.set_priority([head, worker, submitter], job)
            gang.kuberay_gang_labels(rj, job, settings)
        return rj

    def pod_group(self, rj: dict, job: TrainJob, settings: OperatorSettings) -> dict | None:
        return None  # KubeRay makes its cluster's PodGroup itself

    def pod_group_kind(self, job: TrainJob, settings: OperatorSettings) -> kube.Kind | None:
        return None  # ... and deletes it with the cluster

    def state(self, rj: dict) -> tuple[str, str]:
        """(state, message) in a JobSet's terms, from jobDeploymentStatus (the cluster and the submission) and
        jobStatus (the Ray job): completed only when the Ray job SUCCEEDED."""
        st = rj.get("status") or {}
        deployment, ray_job = st.get("jobDeploymentStatus", ""), st.get("jobStatus", "")
        message = st.get("message", "")
        if deployment == "Complete":
            if ray_job == "SUCCEEDED":
                return "completed", message
            return "failed", message or f"the Ray job ended {ray_job or 'without a status'}"
        if deployment in ("Failed", "ValidationFailed"):
            return "failed", f"{st.get('reason') or deployment}: {message}".rstrip(": ")
        if (rj.get("spec") or {}).get("suspend") or deployment in ("Suspending", "Suspended"):
            return "suspended", ""
        if deployment == "Running":
            return "running", ""
        return "starting", ""  # new, Initializing, Waiting (for the cluster), Retrying

    def classify_failure(self, rj: dict, pods: list[dict]) -> FailureStatus:
        """Its Ray containers outlive the training processes, so the driver's last words (the log tail KubeRay
        copies into the status) tell a user error; the pods still tell disruptions and OOM kills; a spec KubeRay
        refused is not worth a restart."""
        st = rj.get("status") or {}
        if st.get("jobDeploymentStatus") == "ValidationFailed":
            return FailureStatus(reason="InvalidSpec", message=f"KubeRay refused the RayJob: {st.get('message', '')}")
        reported = termination.from_log_tail(st.get("message"))
        if reported and reported[0] == termination.INVALID_INPUT:
            return FailureStatus(reason="InvalidInput", message=reported[1])
        said = reported[1] if reported else self.state(rj)[1]
        return classify_failure(pods, said[-2000:])  # the end of a traceback says most

    def pod_selector(self, job: TrainJob, attempt: int) -> dict[str, str]:
        """KubeRay names the pods; the attempt's template labels find them."""
        return {builders.JOB_LABEL: job.name, builders.ATTEMPT_LABEL: str(attempt)}

    def log_source(self, job: TrainJob, attempt: int, rank: int) -> tuple[dict[str, str], str]:
        """The submitter pod: it follows the driver's output, which holds every rank's lines."""
        if rank != 0:
            raise ConfigError(f"TrainJob {job.namespace}/{job.name} runs on Ray: its log (the Ray Train driver's "
                              "output) holds every rank's lines, so --rank does not apply; leave it out")
        return {**self.pod_selector(job, attempt), builders.COMPONENT_LABEL: SUBMITTER_COMPONENT}, SUBMITTER_CONTAINER
