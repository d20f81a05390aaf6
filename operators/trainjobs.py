"""What `wam submit / status / logs` do on a cluster: the researcher's side of the TrainJob API."""

from __future__ import annotations

from collections.abc import Iterator

import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from wam.operators import kube
from wam.operators.controller import JOBSET_NAME_LABEL
from wam.platform import trainjob
from wam.platform.errors import ConfigError

POD_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def read_manifest(text: str, namespace: str | None) -> dict:
    """A TrainJob manifest, checked with the same rules as the CRD's types (a clear error before the
    cluster sees it)."""
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"not YAML: {err}") from None
    if not isinstance(obj, dict):
        raise ConfigError("expected one TrainJob manifest (a YAML mapping)")
    obj.setdefault("apiVersion", trainjob.API_VERSION)
    obj.setdefault("kind", trainjob.KIND)
    meta = obj.setdefault("metadata", {})
    if namespace:
        meta["namespace"] = namespace
    meta.setdefault("namespace", "default")
    trainjob.parse(obj)
    return obj


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
    """The training container's log of one node (rank) of the current attempt."""
    status = get(api, namespace, name).get("status") or {}
    jobset = status.get("jobset")
    if not jobset:
        raise ConfigError(f"TrainJob {namespace}/{name} has no pods yet (phase {status.get('phase', 'Pending')})")
    pods = api.list(kube.POD, namespace, {JOBSET_NAME_LABEL: jobset, POD_INDEX_LABEL: str(rank)})
    if not pods:
        raise ConfigError(f"no pod of node {rank} in JobSet {jobset} (is the job queued, or is --rank too big?)")
    response = client.CoreV1Api(api.api).read_namespaced_pod_log(
        pods[0]["metadata"]["name"], namespace, container="trainer", follow=follow, _preload_content=False)
    for line in response.stream():
        yield line.decode(errors="replace")
