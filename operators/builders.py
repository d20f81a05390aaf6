"""Pure builders of a TrainJob's training children: the config ConfigMap and the JobSet of one attempt.

No I/O and no cluster: a TrainJob, the settings and the attempt number in, plain manifests out. Gang
scheduling (wam.operators.gang) and accelerator placement (wam.operators.placement) are applied here
so that one call returns everything an attempt needs.
"""

from __future__ import annotations

from wam.operators import gang, placement
from wam.operators.settings import OperatorSettings
from wam.platform import termination
from wam.platform.config import WamConfig, to_yaml
from wam.platform.trainjob import API_VERSION, KIND, TrainJob, gpus_per_node

MANAGED_BY = "wam-operator"
JOB_LABEL = "wam.dev/trainjob"
ATTEMPT_LABEL = "wam.dev/attempt"
COMPONENT_LABEL = "app.kubernetes.io/component"
REPLICATED_JOB = "node"
CONTAINER = "trainer"
RENDEZVOUS_PORT = 29500
CONFIG_KEY = "config.yaml"
CONFIG_DIR = "/etc/wam"
WORKSPACE = "/workspace"
TERMINATION_LOG = "/dev/termination-log"
USER_ID = 1000  # the images' non-root user


def labels(job: TrainJob, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "wam", "app.kubernetes.io/managed-by": MANAGED_BY,
            COMPONENT_LABEL: component, JOB_LABEL: job.name}


def owner_reference(job: TrainJob) -> dict:
    """Children are garbage-collected with their TrainJob."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": job.name, "uid": job.uid, "controller": True,
            "blockOwnerDeletion": True}


def metadata(job: TrainJob, name: str, component: str, **extra_labels: str) -> dict:
    return {"name": name, "namespace": job.namespace, "labels": {**labels(job, component), **extra_labels},
            "ownerReferences": [owner_reference(job)]}


def config_map_name(job: TrainJob) -> str:
    return f"{job.name}-config"


def jobset_name(job: TrainJob, attempt: int) -> str:
    return f"{job.name}-{attempt}"


def config_map(job: TrainJob, cfg: WamConfig) -> dict:
    """The training config of every attempt, rendered once: restarts resume with the config they started with."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(job, config_map_name(job), "config"),
            "data": {CONFIG_KEY: to_yaml(cfg)}}


def security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def pod_security_context() -> dict:
    return {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def env_from(secret_refs: list[str]) -> list[dict]:
    return [{"secretRef": {"name": name}} for name in secret_refs]


def secret_refs(job: TrainJob, settings: OperatorSettings) -> list[str]:
    return list(dict.fromkeys([*settings.secret_refs, *job.spec.secret_refs]))


def _training_env(job: TrainJob, name: str, settings: OperatorSettings) -> list[dict]:
    spec = job.spec
    rank_field = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    env = [
        # torchrun reads PET_<ARG> as the default of --<arg>: static rendezvous on the first pod
        {"name": "PET_NNODES", "value": str(spec.resources.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(gpus_per_node(job, settings.platform()))},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": rank_field}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-{REPLICATED_JOB}-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "WAM_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": termination.ENV, "value": TERMINATION_LOG},
        {"name": "WAM_TRAINJOB", "value": f"{job.namespace}/{job.name}"},
        {"name": "HOME", "value": WORKSPACE},  # compiler and kernel caches; the root filesystem is read-only
    ]
    if settings.mlflow.tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": settings.mlflow.tracking_uri})
    return env + [{"name": e.name, "value": e.value} for e in spec.env]


def training_command() -> list[str]:
    return ["python", "-m", "torch.distributed.run", "-m", "wam.trainer.titan.train",
            "--module", "wam.trainer.titan", "--config", "from_yaml"]


def _pod_spec(job: TrainJob, name: str, settings: OperatorSettings) -> dict:
    profile = settings.accelerators[job.spec.resources.accelerator]
    gpus = gpus_per_node(job, settings.platform())
    memory = job.spec.resources.memory or profile.memory
    container = {
        "name": CONTAINER,
        "image": job.spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": training_command(),
        "env": _training_env(job, name, settings),
        "envFrom": env_from(secret_refs(job, settings)),
        "ports": [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}],
        "resources": {
            "requests": {"cpu": profile.cpu, "memory": memory, profile.gpu_resource: str(gpus)},
            "limits": {"memory": memory, profile.gpu_resource: str(gpus)},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "workspace", "mountPath": WORKSPACE},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": security_context(),
        "workingDir": WORKSPACE,
    }
    pod = {
        "restartPolicy": "Never",  # a failed process fails the attempt; the operator restarts the whole gang
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(job)}},
            {"name": "workspace", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": profile.shm_size}},
        ],
        "securityContext": pod_security_context(),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,  # time for an in-flight checkpoint manifest
    }
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    return pod


def jobset(job: TrainJob, attempt: int, settings: OperatorSettings) -> dict:
    """One training attempt: `nodes` indexed pods of one Job, reachable by DNS, gang-scheduled and placed."""
    name = jobset_name(job, attempt)
    nodes = job.spec.resources.nodes
    pod_labels = {**labels(job, "training"), ATTEMPT_LABEL: str(attempt)}
    js = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": metadata(job, name, "training", **{ATTEMPT_LABEL: str(attempt)}),
        "spec": {
            "suspend": job.spec.suspend,
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True, "subdomain": name},
            "successPolicy": {"operator": "All"},
            # No failurePolicy: a failed pod fails the JobSet, and the operator decides whether to restart
            # (new JobSet, restart count kept in the TrainJob's status where nothing can reset it).
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": 1,
                "template": {
                    "metadata": {"labels": dict(pod_labels)},
                    "spec": {
                        "parallelism": nodes,
                        "completions": nodes,
                        "completionMode": "Indexed",
                        "backoffLimit": 0,
                        "template": {
                            "metadata": {"labels": dict(pod_labels), "annotations": {}},
                            "spec": _pod_spec(job, name, settings),
                        },
                    },
                },
            }],
        },
    }
    placement.apply(js, job, settings)
    gang.apply(js, job, settings)
    return js
