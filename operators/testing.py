"""An emulated Kubernetes API for tests and benchmarks of the operator (needs the `local` extra: kmock).

kmock's KubernetesEmulator keeps objects in memory and serves create / get / list / watch / merge-patch /
delete over real HTTP, so the real kubernetes client and the real kopf run against it unchanged. This
module adds what the operator relies on and kmock leaves out: server-set metadata (uid, creationTimestamp,
generation bumped by spec changes, a resourceVersion set at creation) and garbage collection of owned
objects, pods' logs (the kubelet's part, set by the test), and a second, TLS listener that pods reach with
in-cluster credentials (a service account's token and the server's CA, as a kubelet mounts them). No
controller runs in it: a test plays JobSet, Job, Deployment and Kueue controllers by writing statuses (or
runs real pods with wam.operators.local_cluster).
Label selectors are filtered on the server for equality terms only. Not emulated: admission and CRD
schema validation, optimistic concurrency (resourceVersion never changes), field managers, scheduling.
Requests are counted by action and resource (`EmulatedCluster.api_calls`), and forgotten once served: kmock
keeps every request for assertions and matches each new one against all of them, which made a request's
cost grow with the number served before it (most of the CPU of a 100-TrainJob burst went there).
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import ipaddress
import itertools
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import aiohttp.test_utils
import aiohttp.web
import kmock
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kmock import action
from kubernetes import client, config

from wam.operators import kube
from wam.operators.sandbox import ServiceAccount

_DISCOVERY = {
    kube.TRAINJOB: {"shortnames": {"tj"}, "categories": {"wam"}, "subresources": {"status"}},
    kube.JOBSET: {"subresources": {"status"}},
    kube.RAYJOB: {"subresources": {"status"}},
    kube.JOB: {"subresources": {"status"}},
    kube.POD: {"subresources": {"status"}},
    kube.DEPLOYMENT: {"subresources": {"status", "scale"}},
    kube.WORKLOAD: {"subresources": {"status"}},
}
_VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


class _Emulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        self.created_at: dict[tuple[str, str, str], float] = {}  # (plural, namespace, name) -> perf_counter()
        self.pod_logs: dict[tuple[str, str, str], str] = {}  # (namespace, pod, container) -> what it printed
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()  # (action, plural[/sub]) -> n
        self.calls_lock = threading.Lock()  # read from the test's thread

    async def _handle(self, request):
        if request.resource is not None and request.resource.plural:  # not a discovery request
            resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
            with self.calls_lock:
                self.calls[(request.action.value.lower() if request.action else str(request.method), resource)] += 1
        try:
            return await self._serve(request)
        finally:
            self._forget(request)

    def _forget(self, request) -> None:
        """Drop a served request from kmock's history (the root's and its reaction's), by identity."""
        for history in (self._requests, *(payload._requests for payload in self._payloads)):
            for i, seen in enumerate(history):
                if seen is request:
                    del history[i]
                    break

    async def _serve(self, request):
        if request.resource is not None and request.resource.plural == "pods" and request.subresource == "log":
            return self._serve_log(request)
        deleted_uid = None
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == action.CREATE:
                self.created_at[(request.resource.plural, meta.get("namespace") or request.namespace,
                                 meta.get("name"))] = time.perf_counter()
                meta.update(uid=str(uuid.uuid4()), generation=1, resourceVersion=str(next(self._versions)),
                            creationTimestamp=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
            elif request.action == action.UPDATE and request.name:
                current = self._find(request)
                if "spec" in request.data and request.subresource is None and current is not None \
                        and request.data["spec"] != current.get("spec"):
                    meta["generation"] = current["metadata"].get("generation", 1) + 1
        if request.resource is not None and request.action == action.DELETE and request.name:
            current = self._find(request)
            deleted_uid = current["metadata"].get("uid") if current is not None and not current.deleted else None
        response = await super()._handle(request)
        if deleted_uid:
            await self._collect(deleted_uid)
        return response

    def _serve_log(self, request) -> aiohttp.web.Response:
        """A container's log, as the kubelet serves it through the API server (text; `follow` ends at its end)."""
        container = (request.params or {}).get("container", "")
        text = self.pod_logs.get((request.namespace, request.name, container))
        if text is None:
            return aiohttp.web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                              "reason": "NotFound", "message": f"no log of container {container!r} "
                                              f"in pod {request.namespace}/{request.name}"}, status=404)
        return aiohttp.web.Response(text=text, content_type="text/plain")

    async def _serve_list(self, request):
        """Equality label selectors (`a=b,c=d`), as the operator sends them, filtered on the server."""
        listed = await super()._serve_list(request)
        selector = (request.params or {}).get("labelSelector") or ""
        wanted = dict(term.split("=", 1) for term in selector.split(",") if "=" in term)
        if wanted:
            listed["items"] = [o for o in listed["items"]
                               if wanted.items() <= (o.get("metadata", {}).get("labels") or {}).items()]
        return listed

    def _find(self, request):
        key = (request.resource, request.namespace, request.name)
        return self.objects[key] if key in self.objects else None

    async def _collect(self, owner_uid: str) -> None:
        """The garbage collector: delete what the deleted object owned, recursively."""
        async with self._lock:
            owned = [(key, obj) for key, obj in self.objects.items() if not obj.deleted and any(
                ref.get("uid") == owner_uid for ref in obj.get("metadata", {}).get("ownerReferences", []))]
            for (resource, _, _), obj in owned:
                raw = obj.raw
                obj.delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})
        for _, obj in owned:
            await self._collect(obj.last.raw["metadata"]["uid"])


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for the API server at 127.0.0.1 (and its in-cluster names), its own CA: (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
             x509.DNSName("kubernetes.default.svc")]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "apiserver.crt", folder / "apiserver.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _tls_server(context: ssl.SSLContext) -> type[aiohttp.test_utils.RawTestServer]:
    class TLSServer(aiohttp.test_utils.RawTestServer):
        async def start_server(self, loop=None, **kwargs) -> None:
            await super().start_server(loop=loop, ssl=context, **kwargs)
    return TLSServer


class EmulatedCluster:
    """The emulated API server on a local port, in a background thread, with a kubeconfig that points at
    it; `kube` is a client for tests to create objects and to play the cluster's controllers."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="emulated-kube-api", daemon=True)
        self._dir = tempfile.TemporaryDirectory(prefix="wam-kube-")
        self.url = ""
        self.tls_port = 0
        self.emulator: _Emulator | None = None
        self._cert, key = _self_signed(Path(self._dir.name))
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(self._cert, key)

    def __enter__(self) -> EmulatedCluster:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the emulated API server did not start")
        self.kubeconfig = Path(self._dir.name) / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulated",
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulated"}}],
            "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": "tester"}}]}))
        api_config = client.Configuration()
        config.load_kube_config(str(self.kubeconfig), client_configuration=api_config)
        self.kube = kube.Kube(client.ApiClient(api_config))
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._dir.cleanup()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with _Emulator() as emulator, kmock.Server(emulator) as server, \
                kmock.Server(emulator, server_cls=_tls_server(self._tls)) as tls_server:
            for kind in kube.KINDS.values():
                emulator.resources[f"{kind.api_version}/{kind.plural}"] = kmock.ResourceInfo(kind=kind.kind, namespaced=True, verbs=_VERBS,
                                                             **_DISCOVERY.get(kind, {}))
            for cluster_scoped in ("v1/namespaces", "apiextensions.k8s.io/v1/customresourcedefinitions"):
                emulator.resources[cluster_scoped] = kmock.ResourceInfo(namespaced=False, verbs=_VERBS)  # kopf waits on these
            self.emulator, self.url = emulator, str(server.url).rstrip("/")
            self.tls_port = tls_server.port
            self._ready.set()
            await self._stop.wait()

    def start_operator(self, settings: Path, log: Path, env: dict[str, str] | None = None,
                       metrics_port: int = 0) -> subprocess.Popen:
        """The real operator (`python -m wam.operators`) against this server, its output appended to `log`
        (`metrics_port`: where it serves Prometheus metrics; 0: nowhere)."""
        return subprocess.Popen(
            [sys.executable, "-m", "wam.operators", "--settings", str(settings), "--metrics-port", str(metrics_port),
             "--health-port", "0", "--log-format", "plain"],
            env={**os.environ, **(env or {}), "KUBECONFIG": str(self.kubeconfig)}, stdout=log.open("a"),
            stderr=subprocess.STDOUT)

    def service_account(self) -> ServiceAccount:
        """What a kubelet gives a pod to reach this server: its TLS address, a token and the CA (any token is
        accepted: the emulator has no authentication or RBAC)."""
        return ServiceAccount(host="127.0.0.1", port=self.tls_port, token="emulated-service-account",
                              ca_pem=self._cert.read_bytes())

    def set_pod_log(self, namespace: str, pod: str, container: str, text: str) -> None:
        """What a container printed (the emulated kubelet's part): `wam logs` reads it back."""
        self.emulator.pod_logs[(namespace, pod, container)] = text

    def created_at(self, kind: kube.Kind, namespace: str, name: str) -> float | None:
        """When the server received the object's creation (time.perf_counter() of this process)."""
        return self.emulator.created_at.get((kind.plural, namespace, name))

    def api_calls(self) -> dict[tuple[str, str], int]:
        """Requests served so far by (action, resource): ('create', 'jobsets'), ('update', 'trainjobs/status')…
        (kmock's actions: list, watch, fetch, create, update = patch, delete)."""
        with self.emulator.calls_lock:
            return dict(self.emulator.calls)

    def objects(self, kind: kube.Kind, namespace: str = "default") -> dict[str, dict]:
        """Live objects of a kind by name (read over HTTP, as any client would)."""
        return {o["metadata"]["name"]: o for o in self.kube.list(kind, namespace, {})}
