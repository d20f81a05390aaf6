"""Pure builders of what every child of a TrainJob shares: names, labels, owner references, the config
ConfigMap, and the training pod's pieces (env, volumes, resources, security) that the training children
(wam.operators.jobset, wam.operators.rayjob) assemble. No I/O and no cluster: a TrainJob and the settings
in, plain manifests out.
"""

from __future__ import annotations

from wam.operators.settings import OperatorSettings
from wam.platform import termination
from wam.platform.config import WamConfig, to_yaml
from wam.platform.trainjob import API_VERSION, KIND, TrainJob, gpus_per_node

MANAGED_BY = "wam-operator"
JOB_LABEL = "wam.dev/trainjob"
ATTEMPT_LABEL = "wam.dev/attempt"
COMPONENT_LABEL = "app.kubernetes.io/component"
CONTAINER = "trainer"
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


def attempt_name(job: TrainJob, attempt: int) -> str:
    """The training child of an attempt (JobSet, or RayJob under spec.launcher: ray)."""
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


def scratch_env(root: str) -> list[dict]:
    """Where the programs write besides their outputs, all under `root` (a writable volume): the root
    filesystem is read-only, and each tool has its own idea of where to write (found by running every
    container under its pod's rules: wam.operators.sandbox). Dataset statistics of read-only or remote
    datasets, localized files: WAM_CACHE_DIR; Hugging Face tokenizers/encoders: HF_HOME; Triton's kernels
    and torch.compile's: TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR; matplotlib's font cache (eval plots):
    MPLCONFIGDIR; everything else that follows XDG or HOME (Ray, MLflow, pip)."""
    return [{"name": name, "value": f"{root}{suffix}"} for name, suffix in (
        ("HOME", ""), ("XDG_CACHE_HOME", "/.cache"), ("WAM_CACHE_DIR", "/.cache/wam"),
        ("HF_HOME", "/.cache/huggingface"), ("TRITON_CACHE_DIR", "/.cache/triton"),
        ("TORCHINDUCTOR_CACHE_DIR", "/.cache/torchinductor"), ("MPLCONFIGDIR", "/.config/matplotlib"))]


def trainer_env(job: TrainJob, settings: OperatorSettings) -> list[dict]:
    """What every training process reads, whoever starts it: its config, where to report, the spec's env."""
    env = [
        {"name": "WAM_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": termination.ENV, "value": TERMINATION_LOG},
        {"name": "WAM_TRAINJOB", "value": f"{job.namespace}/{job.name}"},
        *scratch_env(WORKSPACE),
    ]
    if settings.mlflow.tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": settings.mlflow.tracking_uri})
    return env + [{"name": e.name, "value": e.value} for e in job.spec.env]


def node_resources(job: TrainJob, settings: OperatorSettings) -> dict:
    """A training node's share: the accelerator profile's CPUs and memory, and its GPUs."""
    profile = settings.accelerators[job.spec.resources.accelerator]
    gpus = str(gpus_per_node(job, settings.platform()))
    memory = job.spec.resources.memory or profile.memory
    return {"requests": {"cpu": profile.cpu, "memory": memory, profile.gpu_resource: gpus},
            "limits": {"memory": memory, profile.gpu_resource: gpus}}


def trainer_container(job: TrainJob, settings: OperatorSettings, name: str, env: list[dict],
                      resources: dict) -> dict:
    """The trainer image with the run's config, scratch space and shared memory, locked down. No command:
    the JobSet runs torchrun in it, KubeRay `ray start`."""
    return {
        "name": name,
        "image": job.spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": env,
        "envFrom": env_from(secret_refs(job, settings)),
        "resources": resources,
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


def trainer_pod_spec(job: TrainJob, settings: OperatorSettings, container: dict) -> dict:
    profile = settings.accelerators[job.spec.resources.accelerator]
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


def attempt_template(job: TrainJob, attempt: int, component: str, spec: dict) -> dict:
    """A pod template of one attempt (labels say whose, and which attempt)."""
    return {"metadata": {"labels": {**labels(job, component), ATTEMPT_LABEL: str(attempt)}, "annotations": {}},
            "spec": spec}
