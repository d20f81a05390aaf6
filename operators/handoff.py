"""Pure builders of the handoff children: the quantization Job of one checkpoint, and the policy server
(Deployment + Service) of the newest quantized model."""

from __future__ import annotations

import math

from wam.operators import placement
from wam.operators.builders import (
    COMPONENT_LABEL,
    JOB_LABEL,
    env_from,
    metadata,
    pod_security_context,
    scratch_env,
    secret_refs,
    security_context,
)
from wam.operators.settings import OperatorSettings
from wam.platform import termination
from wam.platform.config import WamConfig
from wam.platform.launch import quantize_command, serve_command
from wam.platform.policy_client import API_KEY_ENV
from wam.platform.trainjob import TrainJob

STEP_LABEL = "wam.dev/step"
QUANTIZE_COMPONENT = "quantize"
SERVING_COMPONENT = "serving"
API_KEY_SECRET_KEY = "api-key"  # the key of handoff.serving.apiKeySecret's Secret that holds the policy's API key


def quantize_job_name(job: TrainJob, step: int) -> str:
    return f"{job.name}-quantize-{step}"


def serving_name(job: TrainJob) -> str:
    return f"{job.name}-policy"


def _container(job: TrainJob, settings: OperatorSettings, name: str, command: list[str], gpus: int,
               resources: dict) -> dict:
    gpu_resource = settings.accelerators[job.spec.handoff.serving.accelerator].gpu_resource
    return {
        "name": name,
        "image": job.spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": [*scratch_env("/tmp"), {"name": termination.ENV, "value": "/dev/termination-log"},
                *({"name": e.name, "value": e.value} for e in job.spec.env)],
        "envFrom": env_from(secret_refs(job, settings)),
        "resources": {"requests": {**resources, gpu_resource: str(gpus)},
                      "limits": {"memory": resources["memory"], gpu_resource: str(gpus)}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "workingDir": "/tmp",  # the only writable folder under the read-only root (and HOME)
        "securityContext": security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _pod_spec(job: TrainJob, settings: OperatorSettings, container: dict, restart: str) -> dict:
    profile = settings.accelerators[job.spec.handoff.serving.accelerator]
    return {"restartPolicy": restart, "containers": [container], "volumes": [{"name": "tmp", "emptyDir": {}}],
            "nodeSelector": placement.node_selector(profile), "tolerations": list(profile.tolerations),
            "securityContext": pod_security_context(), "enableServiceLinks": False}


def quantize_job(job: TrainJob, step: int, checkpoint: str, out: str, settings: OperatorSettings) -> dict:
    """NVFP4 quantization of one complete checkpoint (one GPU: the reference quantizer reads every layer once)."""
    meta = metadata(job, quantize_job_name(job, step), QUANTIZE_COMPONENT, **{STEP_LABEL: str(step)})
    container = _container(job, settings, "quantize", quantize_command(checkpoint, out), 1,
                           {"cpu": "8", "memory": "128Gi"})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": 2, "ttlSecondsAfterFinished": 7 * 24 * 3600,
                     "template": {"metadata": {"labels": dict(meta["labels"])},
                                  "spec": _pod_spec(job, settings, container, "Never")}}}


def _serving_selector(job: TrainJob) -> dict[str, str]:
    return {COMPONENT_LABEL: SERVING_COMPONENT, JOB_LABEL: job.name}


def serving_deployment(job: TrainJob, cfg: WamConfig, step: int, model: str, settings: OperatorSettings) -> dict:
    """The policy server of a quantized model, with serving.devices GPUs (2: guidance in parallel, the
    unconditional pass on the pod's second GPU); a newer model changes the pod template, which rolls it."""
    serving = job.spec.handoff.serving
    name = serving_name(job)
    meta = metadata(job, name, SERVING_COMPONENT)
    port = settings.serving.port
    container = _container(job, settings, "policy", serve_command(model, port), cfg.serving.devices,
                           {"cpu": settings.serving.cpu, "memory": settings.serving.memory})
    container["ports"] = [{"name": "policy", "containerPort": port}]
    if serving.api_key_secret:  # the server then refuses robots that do not send it
        container["env"].append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": serving.api_key_secret, "key": API_KEY_SECRET_KEY}}})
    # Ready only once /readyz says so: the model loaded, the engine compiled and warmed up, a session free, not
    # draining (the port opens before the warm-up; a replica it routed robots to then would keep them waiting).
    container["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": "policy"}, "periodSeconds": 5}
    # Alive while /healthz answers, checked only once it has answered: loading a 14B model takes minutes.
    health = {"httpGet": {"path": "/healthz", "port": "policy"}, "periodSeconds": 10, "timeoutSeconds": 5}
    container["startupProbe"] = {**health, "failureThreshold": 180}
    container["livenessProbe"] = {**health, "failureThreshold": 6}
    selector = _serving_selector(job)
    template_labels = {**meta["labels"], STEP_LABEL: str(step)}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {"replicas": serving.replicas, "selector": {"matchLabels": selector},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                     # the conventional scrape annotations, for a Prometheus without the Prometheus Operator (the
                     # chart's PodMonitor selects these pods by their labels)
                     "template": {"metadata": {"labels": template_labels, "annotations": {
                         "prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                         "prometheus.io/path": "/metrics"}},
                                  "spec": {**_pod_spec(job, settings, container, "Always"),
                                           # SIGTERM drains the sessions (wam serve): time for that and the exit
                                           "terminationGracePeriodSeconds": math.ceil(cfg.serving.drain_timeout_s)
                                           + 15}}}}


def serving_service(job: TrainJob, settings: OperatorSettings) -> dict:
    name = serving_name(job)
    selector = _serving_selector(job)
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(job, name, SERVING_COMPONENT),
            "spec": {"selector": selector, "ports": [{"name": "policy", "port": settings.serving.port,
                                                      "targetPort": "policy"}]}}


def endpoint(job: TrainJob, settings: OperatorSettings) -> str:
    return f"ws://{serving_name(job)}.{job.namespace}.svc:{settings.serving.port}"
