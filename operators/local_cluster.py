"""The controllers and the kubelet that the emulated API server (wam.operators.testing) lacks, so that the
operator's objects become real processes: JobSets, Jobs and Deployments are expanded into Pods as their
controllers would (indexes, hostnames, subdomain, completion-index annotations, owner references), and
every Pod's container runs under its pod's rules (wam.operators.sandbox). Pod, Job, JobSet and Deployment
statuses are written back from the processes, so the operator reads what real programs did.

Containers run the images' contracts read from the project's Dockerfiles (`dockerfile_images`), and pods
get the emulated API server's in-cluster credentials, so the operator and `wam regress` run in their pods
as they would in a cluster. `expand_*` and `job_from_cronjob` are pure; `LocalKubelet` polls the API in a
background thread.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from dockerfile_parse import DockerfileParser

from wam.operators import kube
from wam.operators.sandbox import Image, SandboxedContainer, SandboxError, ServiceAccount, plan

JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
JOB_NAME = "batch.kubernetes.io/job-name"


def _owner(obj: dict) -> dict:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"].get("uid", ""), "controller": True}


def _suffix(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:5]


def _pod(template: dict, name: str, namespace: str, owner: dict, labels: dict, annotations: dict,
         **spec_fields: str) -> dict:
    meta = template.get("metadata") or {}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {**(meta.get("labels") or {}), **labels},
                         "annotations": {**(meta.get("annotations") or {}), **annotations},
                         "ownerReferences": [owner]},
            "spec": {**template["spec"], **spec_fields}}


def expand_jobset(js: dict) -> list[dict]:
    """The pods of a JobSet: per replicated job, per replica, one Indexed Job's `completions` pods, each with
    hostname `<jobset>-<rjob>-<replica>-<index>` under the JobSet's subdomain (its headless service)."""
    name, namespace = js["metadata"]["name"], js["metadata"]["namespace"]
    subdomain = (js["spec"].get("network") or {}).get("subdomain") or name
    pods = []
    for rjob in js["spec"]["replicatedJobs"]:
        job_spec = rjob["template"]["spec"]
        for replica in range(rjob.get("replicas", 1)):
            for index in range(job_spec.get("completions", job_spec.get("parallelism", 1))):
                host = f"{name}-{rjob['name']}-{replica}-{index}"
                labels = {JOBSET_NAME: name, REPLICATED_JOB: rjob["name"], COMPLETION_INDEX: str(index),
                          JOB_NAME: f"{name}-{rjob['name']}-{replica}"}
                pods.append(_pod(job_spec["template"], f"{host}-{_suffix(js['metadata'].get('uid', ''), host)}",
                                 namespace, _owner(js), labels, {COMPLETION_INDEX: str(index)},
                                 hostname=host, subdomain=subdomain))
    return pods


def expand_job(job: dict) -> list[dict]:
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    return [_pod(job["spec"]["template"], f"{name}-{_suffix(job['metadata'].get('uid', ''), name)}", namespace,
                 _owner(job), {JOB_NAME: name}, {})]


def expand_deployment(dep: dict) -> list[dict]:
    name, namespace = dep["metadata"]["name"], dep["metadata"]["namespace"]
    revision = _suffix(repr(dep["spec"]["template"]))
    return [_pod(dep["spec"]["template"], f"{name}-{revision}-{i}", namespace, _owner(dep), {}, {})
            for i in range(dep["spec"].get("replicas", 1))]


def kuberay_pods(rj: dict, gcs_port: int = 6379, dashboard_port: int = 8265) -> list[dict]:
    """The pods KubeRay makes of a RayJob, with the commands it generates from `rayStartParams`: the head
    (`ray start --head --block`), each worker group's replicas (`ray start --address=<head service>:6379
    --block`) and the submitter (`ray job submit` of the entrypoint to the head's dashboard). KubeRay's fixed
    ports (metrics 8080, dashboard agent 52365) are left to Ray here, and GCS and dashboard ports can be
    moved: the pods share this machine's ports."""
    name, namespace = rj["metadata"]["name"], rj["metadata"]["namespace"]
    cluster = rj["spec"]["rayClusterSpec"]
    head_service = f"{name}-head-svc"

    def params(group: dict) -> list[str]:
        return [f"--{key}={value}" for key, value in (group.get("rayStartParams") or {}).items()]

    def with_command(template: dict, pod_name: str, command: list[str]) -> dict:
        container = {**template["spec"]["containers"][0], "command": command, "args": []}
        return _pod({**template, "spec": {**template["spec"], "containers": [container]}}, pod_name, namespace,
                    _owner(rj), {"ray.io/cluster": name}, {})

    head = cluster["headGroupSpec"]
    pods = [with_command(head["template"], f"{name}-head", [
        "ray", "start", "--head", "--block", f"--port={gcs_port}", "--dashboard-host=0.0.0.0",
        f"--dashboard-port={dashboard_port}", *params(head)])]
    for group in cluster.get("workerGroupSpecs") or []:
        for index in range(group.get("replicas", 1)):
            pods.append(with_command(group["template"], f"{name}-{group['groupName']}-{index}", [
                "ray", "start", f"--address={head_service}:{gcs_port}", "--block", *params(group)]))
    pods.append(with_command(rj["spec"]["submitterPodTemplate"], f"{name}-submitter", [
        "ray", "job", "submit", f"--address=http://{head_service}:{dashboard_port}", f"--submission-id={name}",
        "--", "/bin/sh", "-c", rj["spec"]["entrypoint"]]))
    return pods


def job_from_cronjob(cronjob: dict, name: str) -> dict:
    """The Job a CronJob's schedule would create now (what `kubectl create job --from=cronjob/...` does)."""
    template = cronjob["spec"]["jobTemplate"]
    meta = template.get("metadata") or {}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": cronjob["metadata"]["namespace"],
                         "labels": meta.get("labels") or {},
                         "annotations": {**(meta.get("annotations") or {}),
                                         "cronjob.kubernetes.io/instantiate": "manual"}},
            "spec": template["spec"]}


def dockerfile_images(folder: Path) -> dict[str, Image]:
    """The images' contracts from `folder/<name>.Dockerfile`, by repository name (`<registry>/.../<name>`):
    the final stage's ENTRYPOINT, CMD, USER, WORKDIR and ENV."""
    images = {}
    for path in sorted(folder.glob("*.Dockerfile")):
        parsed = DockerfileParser(str(path))
        final: dict[str, str] = {}
        for instruction in parsed.structure:  # the last of each in the final stage wins
            if instruction["instruction"] == "FROM":
                final = {}
            final[instruction["instruction"]] = instruction["value"]
        user = final.get("USER")
        uid, _, gid = (user or "").partition(":")
        images[path.name.removesuffix(".Dockerfile")] = Image(
            entrypoint=tuple(_exec_form(final.get("ENTRYPOINT"))), cmd=tuple(_exec_form(final.get("CMD"))),
            user=(int(uid), int(gid or uid)) if uid.isdigit() else None, workdir=final.get("WORKDIR", "/"),
            env=tuple(parsed.envs.items()))
    return images


def _exec_form(value: str | None) -> list[str]:
    if not value:
        return []
    if not value.lstrip().startswith("["):  # shell form
        return ["/bin/sh", "-c", value]
    return json.loads(value)


def _repository(image: str) -> str:
    """`ghcr.io/wam-platform/trainer:0.1.0` (or @sha256:...) -> `trainer`."""
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]


class LocalKubelet:
    """Runs the pods of the objects in `namespace` until `stop()`. `pod_log(namespace, pod, container, text)`
    publishes what a container printed (the emulated API server serves it as the pod's log)."""

    KINDS = ((kube.JOBSET, expand_jobset), (kube.JOB, expand_job), (kube.DEPLOYMENT, expand_deployment))

    def __init__(self, api: kube.Kube, namespace: str, workdir: Path, *, interval_s: float = 0.3,
                 pod_log: Callable[[str, str, str, str], None] | None = None,
                 images: dict[str, Image] | None = None, service_account: ServiceAccount | None = None):
        self.api, self.namespace, self.workdir, self.interval_s = api, namespace, workdir, interval_s
        self.pod_log, self.images, self.service_account = pod_log, images or {}, service_account
        self.running: dict[str, SandboxedContainer] = {}  # pod name -> its (single) container's process
        self._published: dict[str, int] = {}  # pod name -> log size last published
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="local-kubelet", daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> LocalKubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for run in self.running.values():
            run.stop(5)

    def kill(self, pod_name: str) -> None:
        """SIGKILL a pod's process (a crashed rank, a lost node)."""
        self.running[pod_name].kill()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as err:  # noqa: BLE001 - keep serving; the test reads the errors
                self.errors.append(repr(err))
            self._stop.wait(self.interval_s)

    def _sync(self) -> None:
        owners = {}
        pods = self.api.list(kube.POD, self.namespace, {})
        for kind, expand in self.KINDS:
            for obj in self.api.list(kind, self.namespace, {}):
                owners[obj["metadata"]["uid"]] = (kind, obj)
                if kind is not kube.DEPLOYMENT and (obj["spec"].get("suspend") or _finished(obj)):
                    continue
                wanted = expand(obj)
                if kind is kube.DEPLOYMENT:  # a new template: the old revision's pods go first (Recreate)
                    names = {p["metadata"]["name"] for p in wanted}
                    for pod in _owned(pods, obj):
                        if pod["metadata"]["name"] not in names:
                            self.api.delete(kube.POD, self.namespace, pod["metadata"]["name"])
                for pod in wanted:
                    self.api.create(pod)  # idempotent: an existing pod stays as it is
        pods = self.api.list(kube.POD, self.namespace, {})
        alive = {p["metadata"]["name"] for p in pods}
        for name in [n for n in self.running if n not in alive]:  # deleted with its owner: stop it
            self.running.pop(name).stop(5)
        hosts = {}  # every Service's and every pod's DNS names (a JobSet's headless service), on loopback
        names = [s["metadata"]["name"] for s in self.api.list(kube.SERVICE, self.namespace, {})]
        names += [f"{p['spec']['hostname']}.{p['spec']['subdomain']}" for p in pods
                  if p["spec"].get("hostname") and p["spec"].get("subdomain")]
        for name in names:  # ports are shared: a Service's port is its pods' port
            for suffix in ("", f".{self.namespace}", f".{self.namespace}.svc", f".{self.namespace}.svc.cluster.local"):
                hosts[name + suffix] = "127.0.0.1"
        for pod in pods:
            self._tend(pod, hosts)
        for kind, obj in owners.values():
            self._owner_status(kind, obj, _owned(pods, obj))

    def _tend(self, pod: dict, hosts: dict[str, str]) -> None:
        name = pod["metadata"]["name"]
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            return
        if name not in self.running:
            container = pod["spec"]["containers"][0]
            try:
                planned = plan(pod, container, self._objects(), self.workdir / name, hosts=hosts,
                               image=self.images.get(_repository(container.get("image", ""))),
                               service_account=self.service_account)
                self.running[name] = SandboxedContainer(container, planned, self.workdir / f"{name}.log")
            except SandboxError as err:
                self._set_pod(pod, "Failed", {"terminated": {"exitCode": 1, "reason": "CreateContainerError",
                                                             "message": str(err)}}, ready=False)
                return
            self._set_pod(pod, "Running", {"running": {}}, ready=False)
            return
        run = self.running[name]
        finished = run.poll()
        if finished is None:
            ready = _probe(run.container)
            statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
            if statuses[0].get("ready") != ready:
                self._set_pod(pod, "Running", {"running": {}}, ready=ready)
        size = run.log.stat().st_size if run.log.exists() else 0
        if self.pod_log and size != self._published.get(name):  # re-read a log only when it grew
            self._published[name] = size
            self.pod_log(self.namespace, name, run.container["name"], run.log.read_text(errors="replace"))
        if finished is not None:
            state = {"terminated": {"exitCode": finished.exit_code, "reason": finished.reason,
                                    "message": finished.message}}
            self._set_pod(pod, "Succeeded" if finished.exit_code == 0 else "Failed", state, ready=False)

    def _set_pod(self, pod: dict, phase: str, state: dict, ready: bool) -> None:
        container = pod["spec"]["containers"][0]["name"]
        self.api.patch(kube.POD, self.namespace, pod["metadata"]["name"], {"status": {
            "phase": phase, "podIP": "127.0.0.1",
            "containerStatuses": [{"name": container, "ready": ready, "state": state, "restartCount": 0}]}},
            subresource="status")

    def _objects(self) -> dict[tuple[str, str], dict]:
        found = {}
        for kind in (kube.CONFIGMAP, kube.SECRET):
            for obj in self.api.list(kind, self.namespace, {}):
                found[(kind.kind, obj["metadata"]["name"])] = {**obj, "kind": kind.kind}
        return found

    def _owner_status(self, kind: kube.Kind, obj: dict, pods: list[dict]) -> None:
        phases = [(p.get("status") or {}).get("phase") for p in pods]
        ready = sum(1 for p in pods if ((p.get("status") or {}).get("containerStatuses") or [{}])[0].get("ready"))
        succeeded, failed = phases.count("Succeeded"), phases.count("Failed")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if kind is kube.DEPLOYMENT:
            status = {"replicas": len(pods), "readyReplicas": ready, "availableReplicas": ready}
        elif kind is kube.JOB:
            status = {"active": ready, "succeeded": succeeded, "failed": failed}
            if failed:
                status["conditions"] = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                         "lastTransitionTime": now}]
            elif pods and succeeded == len(pods):
                status["conditions"] = [{"type": "Complete", "status": "True", "lastTransitionTime": now}]
        else:
            rjob = obj["spec"]["replicatedJobs"][0]["name"]
            status = {"replicatedJobsStatus": [{"name": rjob, "ready": int(bool(pods) and ready == len(pods)),
                                                "succeeded": int(bool(pods) and succeeded == len(pods)),
                                                "failed": int(failed > 0), "active": int(ready > 0),
                                                "suspended": 0}]}
            if failed:  # a failed pod fails the JobSet (no failurePolicy) and the rest of its pods stop
                status["conditions"] = [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                                         "message": "jobset failed due to a failed job", "lastTransitionTime": now}]
                for pod in pods:
                    if pod["metadata"]["name"] in self.running and (pod.get("status") or {}).get("phase") == "Running":
                        self.running[pod["metadata"]["name"]].kill()
            elif pods and succeeded == len(pods):
                status["conditions"] = [{"type": "Completed", "status": "True", "reason": "AllJobsCompleted",
                                         "lastTransitionTime": now}]
        if (obj.get("status") or {}) != {**(obj.get("status") or {}), **status}:
            self.api.patch(kind, self.namespace, obj["metadata"]["name"], {"status": status}, subresource="status")


def _owned(pods: list[dict], owner: dict) -> list[dict]:
    return [p for p in pods if any(r.get("uid") == owner["metadata"]["uid"]
                                   for r in p["metadata"].get("ownerReferences") or [])]


def _probe(container: dict) -> bool:
    """The container's readiness probe, run on loopback (tcpSocket or httpGet); no probe: ready once started."""
    probe = container.get("readinessProbe")
    if not probe:
        return True
    action = probe.get("tcpSocket") or probe.get("httpGet") or {}
    port = action.get("port")
    if isinstance(port, str):  # a named container port
        port = next((p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port), None)
    if port is None:
        return False
    try:
        if "httpGet" in probe:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{action.get('path', '/')}", timeout=2) as reply:
                return 200 <= reply.status < 400
        with socket.create_connection(("127.0.0.1", int(port)), timeout=2):
            return True
    except OSError:
        return False


def _finished(obj: dict) -> bool:
    return any(c.get("status") == "True" and c.get("type") in ("Completed", "Complete", "Failed")
               for c in (obj.get("status") or {}).get("conditions") or [])
