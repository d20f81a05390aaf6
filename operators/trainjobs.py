"""TrainJobs as a researcher uses them (`wam submit / status / logs`, `wam regress` in the cluster): submit a
manifest checked before the cluster sees it, read one, follow its training log."""

from __future__ import annotations

import os
from collections.abc import Iterator

import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from wam.operators import kube
from wam.operators.settings import SETTINGS_ENV, OperatorSettings, load_settings
from wam.operators.training_child import started, training_child
from wam.platform import trainjob
from wam.platform.data_contract import check_datasets
from wam.platform.errors import ConfigError, yaml_position


def read_manifest(text: str, namespace: str | None) -> dict:
    """A TrainJob manifest, checked as the operator checks it (`validate`): a clear error before the cluster sees
    it."""
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"not YAML: {str(err).splitlines()[0]} ({yaml_position(err, 'see the file')})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"expected one TrainJob manifest (a YAML mapping), got {type(obj).__name__}")
    obj.setdefault("apiVersion", trainjob.API_VERSION)
    obj.setdefault("kind", trainjob.KIND)
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise ConfigError(f"metadata: expected a mapping, got {meta!r}")
    if namespace:
        meta["namespace"] = namespace
    meta.setdefault("namespace", "default")
    validate(obj)
    return obj


def validate(obj: dict, settings: OperatorSettings | None = None) -> trainjob.TrainJob:
    """Everything the operator checks before it creates anything (else it marks the job InvalidSpec): the spec's
    types and ranges, the training config it renders, the accelerator's memory, and what the datasets hold
    (when their metadata can be read from here). `settings`: the installation's (default: $WAM_OPERATOR_SETTINGS,
    else the chart's defaults)."""
    job = trainjob.parse(obj)
    settings = settings or load_settings(os.environ.get(SETTINGS_ENV))
    check_datasets(trainjob.training_config(job, settings.platform()), skip_unreadable=True)
    return job


def submit(api: kube.Kube, obj: dict, generate_name: bool = False) -> str:
    """Create the TrainJob; with generate_name the API server appends a random suffix (nightly runs)."""
    meta = obj["metadata"]
    if generate_name:
        meta["generateName"] = meta.pop("name") + "-"
    try:
        created = api.post(obj)
    except ApiException as err:
        if err.status == 409:
            raise ConfigError(f"TrainJob {meta['namespace']}/{meta.get('name')} already exists; pick another "
                              "metadata.name or delete it first") from None
        raise
    return created.get("metadata", {}).get("name") or meta.get("name", "")


def get(api: kube.Kube, namespace: str, name: str) -> dict:
    obj = api.get(kube.TRAINJOB, namespace, name)
    if obj is None:
        raise ConfigError(f"no TrainJob {namespace}/{name}")
    return obj


def logs(api: kube.Kube, namespace: str, name: str, rank: int, follow: bool) -> Iterator[str]:
    """The training log of node `rank` of the current attempt, whatever launcher runs it."""
    job = trainjob.parse(get(api, namespace, name))
    attempt = started(job.status)
    if not attempt:
        raise ConfigError(f"TrainJob {namespace}/{name} has no pods yet (phase {job.status.phase})")
    child = training_child(job)
    selector, container = child.log_source(job, job.status.attempt, rank)
    pods = api.list(kube.POD, namespace, selector)
    if not pods:
        raise ConfigError(f"no pod of node {rank} in {child.kind.kind} {attempt} yet (is the job queued, or is "
                          "--rank beyond its nodes?)")
    response = client.CoreV1Api(api.api).read_namespaced_pod_log(
        pods[0]["metadata"]["name"], namespace, container=container, follow=follow, _preload_content=False)
    for line in response.stream():
        yield line.decode(errors="replace")
