"""The few API calls the operator makes, for any kind, through the kubernetes client's REST layer.

Objects stay plain dicts (the builders' output goes out unchanged); creates tolerate "already exists"
(a restarted operator re-plans children it made before), deletes tolerate "not found", and updates are
JSON merge patches, so two writers touching different fields never overwrite each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from wam.platform import trainjob
from wam.platform.errors import ConfigError


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")


TRAINJOB = Kind(trainjob.API_VERSION, trainjob.KIND, trainjob.PLURAL)
CONFIGMAP = Kind("v1", "ConfigMap", "configmaps")
SERVICE = Kind("v1", "Service", "services")
POD = Kind("v1", "Pod", "pods")
SECRET = Kind("v1", "Secret", "secrets")
EVENT = Kind("v1", "Event", "events")
JOB = Kind("batch/v1", "Job", "jobs")
DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
JOBSET = Kind("jobset.x-k8s.io/v1alpha2", "JobSet", "jobsets")
RAYJOB = Kind("ray.io/v1", "RayJob", "rayjobs")
WORKLOAD = Kind("kueue.x-k8s.io/v1beta2", "Workload", "workloads")
COMPUTE_DOMAIN = Kind("resource.nvidia.com/v1beta1", "ComputeDomain", "computedomains")
VOLCANO_POD_GROUP = Kind("scheduling.volcano.sh/v1beta1", "PodGroup", "podgroups")
COSCHEDULING_POD_GROUP = Kind("scheduling.x-k8s.io/v1alpha1", "PodGroup", "podgroups")
KINDS = {(k.api_version, k.kind): k for k in (TRAINJOB, CONFIGMAP, SERVICE, POD, SECRET, EVENT, JOB, DEPLOYMENT, JOBSET,
                                               RAYJOB, WORKLOAD, COMPUTE_DOMAIN, VOLCANO_POD_GROUP, COSCHEDULING_POD_GROUP)}


def kind_of(obj: dict) -> Kind:
    return KINDS[(obj["apiVersion"], obj["kind"])]


def load_client_config() -> None:
    """In-cluster credentials in a pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as err:
            raise ConfigError(f"no cluster to talk to: {err} (set KUBECONFIG or run inside a pod)") from None


class Kube:
    def __init__(self, api: client.ApiClient | None = None):
        self.api = api or client.ApiClient()

    def _call(self, method: str, path: str, body: dict | None = None, query: list | None = None,
              content_type: str = "application/json") -> dict:
        method, url, headers, body, _ = self.api.param_serialize(
            method, path, query_params=query or [], body=body, auth_settings=["BearerToken"],
            header_params={"Accept": "application/json", "Content-Type": content_type})
        response = self.api.call_api(method, url, header_params=headers, body=body, _request_timeout=30)
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return json.loads(data) if data else {}

    def get(self, kind: Kind, namespace: str, name: str) -> dict | None:
        try:
            return self._call("GET", kind.path(namespace, name))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def list(self, kind: Kind, namespace: str, labels: dict[str, str]) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        try:
            return self._call("GET", kind.path(namespace), query=[("labelSelector", selector)]).get("items", [])
        except ApiException as err:
            if err.status == 404:  # the kind is not installed (e.g. no Kueue): nothing of it exists
                return []
            raise

    def post(self, obj: dict) -> dict:
        """Create; the object as the server stored it (ApiException 409 when the name is taken)."""
        return self._call("POST", kind_of(obj).path(obj["metadata"]["namespace"]), body=obj)

    def create(self, obj: dict) -> bool:
        """True when created, False when an object of that name already existed."""
        try:
            self.post(obj)
            return True
        except ApiException as err:
            if err.status == 409:
                return False
            raise

    def patch(self, kind: Kind, namespace: str, name: str, patch: dict, subresource: str | None = None) -> dict:
        return self._call("PATCH", kind.path(namespace, name, subresource), body=patch,
                          content_type="application/merge-patch+json")

    def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        """Deletes in the foreground (children first); False when it was already gone."""
        try:
            self._call("DELETE", kind.path(namespace, name), body={"propagationPolicy": "Foreground"})
            return True
        except ApiException as err:
            if err.status == 404:
                return False
            raise
