"""Run a pod's container as a real process under its pod's rules, without a node (tests and local use).

bubblewrap (`bwrap`, Debian's `bubblewrap`) gives the process what the kubelet would: the root filesystem
read-only (`readOnlyRootFilesystem`), the pod's user and group in a user namespace, no privilege escalation
(bwrap always sets no_new_privs), only the pod's volumes writable (emptyDir → a folder, memory-backed
emptyDir → a folder in /dev/shm, a PersistentVolumeClaim → a folder kept for the claim, ConfigMap and Secret
volumes → their keys as files at the mount path), its
env (`env` with values, downward-API fields and key references; `envFrom`), its working directory, a
termination-message file at `terminationMessagePath`, and /etc/hosts naming the pod's hostname and the
headless services' names on loopback, and the service account's token and CA where the pod mounts them (the
API server reached at KUBERNETES_SERVICE_HOST/PORT, as in a cluster). The project installed in this
virtualenv stands in for the image (its `bin/` first on PATH); the image's contract (ENTRYPOINT, CMD, USER,
WORKDIR, ENV) comes from its Dockerfile. What is not honoured: image contents, resource limits (no cgroups),
network isolation (the host's loopback is shared, so ports are too), scheduling and the kubelet's restarts.

`plan` is pure (manifests in, a command line out); `SandboxedContainer` runs one.
"""

from __future__ import annotations

import base64
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BWRAP = "bwrap"
FALLBACK_LOG_LINES = 80  # terminationMessagePolicy FallbackToLogsOnError: the kubelet's last 80 lines
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
STAND_IN_ENV = ("PATH", "VIRTUAL_ENV")  # the image's values name its own paths; the stand-in's apply here


class SandboxError(ValueError):
    """A pod this runner cannot honour (says which field, and why)."""


@dataclass(frozen=True)
class Image:
    """What a container takes from its image when the pod does not say: the Dockerfile's contract."""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user: tuple[int, int] | None = None  # USER uid:gid
    workdir: str = "/"
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ServiceAccount:
    """How a pod reaches the API server: the address the kubelet puts in KUBERNETES_SERVICE_HOST/PORT, and the
    token, CA and namespace it mounts at SERVICE_ACCOUNT_DIR."""
    host: str
    port: int
    token: str
    ca_pem: bytes


@dataclass(frozen=True)
class Plan:
    argv: list[str]  # bwrap ... -- command args
    env: dict[str, str]
    files: dict[Path, bytes]  # projected ConfigMap/Secret keys and /etc/hosts, written before the start
    folders: list[Path]  # emptyDir volumes, created before the start
    termination_log: Path | None  # the host file behind terminationMessagePath


def _data(obj: dict) -> dict[str, bytes]:
    """A ConfigMap's or Secret's keys as bytes (Secret `data` is base64, `stringData` plain)."""
    decode = base64.b64decode if obj.get("kind") == "Secret" else str.encode
    out = {k: decode(v) for k, v in (obj.get("data") or {}).items()}
    out.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
    return out


def _field(pod: dict, path: str) -> str:
    """A downward-API fieldRef of the pod: metadata.name/namespace/uid, labels['x'], annotations['x'], spec.*."""
    meta = pod.get("metadata", {})
    for prefix, table in (("metadata.labels", meta.get("labels") or {}),
                          ("metadata.annotations", meta.get("annotations") or {})):
        if path.startswith(prefix + "["):
            return str(table.get(path[len(prefix) + 2:-2], ""))
    value = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
             "metadata.uid": meta.get("uid"), "spec.nodeName": "localhost", "status.podIP": "127.0.0.1",
             "status.hostIP": "127.0.0.1", "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName")}
    if path not in value:
        raise SandboxError(f"env fieldRef {path!r} is not supported by the local runner")
    return str(value[path] or "")


def container_env(pod: dict, container: dict, objects: dict[tuple[str, str], dict]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env (later wins); `$(VAR)`
    references to earlier variables expanded. `objects`: (kind, name) -> ConfigMap/Secret."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                obj = objects.get((kind, source[key]["name"]))
                if obj is None:
                    if source[key].get("optional"):
                        continue
                    raise SandboxError(f"envFrom: {kind} {source[key]['name']!r} does not exist")
                env.update({source.get("prefix", "") + k: v.decode() for k, v in _data(obj).items()})
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = _expand(str(item["value"]), env)
            continue
        ref = item.get("valueFrom") or {}
        if "fieldRef" in ref:
            env[item["name"]] = _field(pod, ref["fieldRef"]["fieldPath"])
        elif "configMapKeyRef" in ref or "secretKeyRef" in ref:
            kind, key = ("ConfigMap", "configMapKeyRef") if "configMapKeyRef" in ref else ("Secret", "secretKeyRef")
            obj = objects.get((kind, ref[key]["name"]))
            data = _data(obj) if obj else {}
            if ref[key]["key"] not in data:
                if ref[key].get("optional"):
                    continue
                raise SandboxError(f"env {item['name']}: {kind} {ref[key]['name']!r} has no key {ref[key]['key']!r}")
            env[item["name"]] = data[ref[key]["key"]].decode()
        else:
            env[item["name"]] = ""
    return env


def _expand(value: str, env: dict[str, str]) -> str:
    for name, known in env.items():
        value = value.replace(f"$({name})", known)
    return value


def _read_only_root(targets: list[str], directory: Path = Path("/")) -> list[str]:
    """bwrap arguments that show this machine's filesystem read-only on a fresh root, leaving room for mount
    points that do not exist here (/workspace, /etc/wam): a directory holding such a point is rebuilt from
    its entries, one read-only bind each, instead of being bound whole (a read-only bind cannot gain one)."""
    args: list[str] = []
    for entry in sorted(directory.iterdir()):
        if entry in (Path("/proc"), Path("/dev")):
            continue
        if entry.is_symlink():
            args += ["--symlink", os.readlink(entry), str(entry)]
        elif entry.is_dir() and any(_missing_under(entry, t) for t in targets):
            args += ["--dir", str(entry), *_read_only_root(targets, entry)]
        else:
            args += ["--ro-bind", str(entry), str(entry)]
    return args


def _missing_under(directory: Path, target: str) -> bool:
    path = Path(target)
    return path.is_relative_to(directory) and path != directory and not path.exists()


def _identity(pod: dict, container: dict, image: Image) -> tuple[int, int]:
    pod_ctx = pod.get("spec", {}).get("securityContext") or {}
    ctx = container.get("securityContext") or {}
    uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    gid = ctx.get("runAsGroup", pod_ctx.get("runAsGroup", uid))
    if uid is None:
        uid, gid = image.user or (0, 0)
        if uid == 0 and ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            raise SandboxError(f"container {container['name']!r}: runAsNonRoot, but neither the pod nor the "
                               "image's USER names a non-root user (CreateContainerConfigError)")
    if ctx.get("privileged"):
        raise SandboxError(f"container {container['name']!r} is privileged: not run locally")
    return int(uid), int(gid if gid is not None else uid)


def _command(container: dict, image: Image) -> list[str]:
    """Kubernetes' rule: `command` replaces the ENTRYPOINT (and drops the CMD); `args` replaces the CMD."""
    if container.get("command"):
        return [*container["command"], *(container.get("args") or [])]
    return [*image.entrypoint, *(container.get("args") or image.cmd)]


def plan(pod: dict, container: dict, objects: dict[tuple[str, str], dict], scratch: Path, *,
         hosts: dict[str, str] | None = None, prefix: Path | None = None, image: Image | None = None,
         service_account: ServiceAccount | None = None) -> Plan:
    """The bwrap command line that runs `container` of `pod` under the pod's rules. `scratch`: the pod's own
    folder on the host (volumes, termination log); `hosts`: extra name -> IP entries for /etc/hosts;
    `prefix`: the environment whose bin/ stands in for the image (default: this interpreter's); `image`: the
    image's contract; `service_account`: the API server's address and credentials, mounted unless the pod
    opts out (automountServiceAccountToken: false)."""
    spec = pod.get("spec", {})
    name = container["name"]
    image = image or Image()
    command = _command(container, image)
    if not command:
        raise SandboxError(f"container {name!r} has no command, and its image {container.get('image')!r} no "
                           "known ENTRYPOINT or CMD")
    uid, gid = _identity(pod, container, image)
    ctx = container.get("securityContext") or {}
    if not ctx.get("readOnlyRootFilesystem"):
        raise SandboxError(f"container {name!r}: only readOnlyRootFilesystem: true is run locally (a writable "
                           "root would write into this machine's)")
    mounts = list(container.get("volumeMounts") or [])
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    if service_account and spec.get("automountServiceAccountToken", True):
        volumes["kube-api-access"] = {"name": "kube-api-access", "serviceAccount": service_account}
        mounts.append({"name": "kube-api-access", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True})
    workdir = container.get("workingDir") or image.workdir
    # Mount points (and the working directory) as the real paths: /var/run is a link to /run on Debian.
    targets = [str(Path(m["mountPath"]).resolve()) for m in mounts]
    # Its own PID namespace, as a container has: when the sandbox ends (killed, or its parent gone), every
    # process in it ends too; no orphan keeps training after its pod is gone.
    argv = [BWRAP, *_read_only_root([*targets, str(Path(workdir).resolve())]), "--dev", "/dev",
            "--unshare-pid", "--proc", "/proc", "--unshare-user", "--unshare-ipc", "--unshare-uts",
            "--uid", str(uid), "--gid", str(gid), "--die-with-parent", "--new-session",
            "--hostname", pod["metadata"]["name"][:63]]
    files: dict[Path, bytes] = {}
    folders: list[Path] = []
    for mount, target in zip(mounts, targets, strict=True):
        volume = volumes.get(mount["name"])
        if volume is None:
            raise SandboxError(f"container {name!r} mounts volume {mount['name']!r}, which the pod does not define")
        read_only = bool(mount.get("readOnly"))
        if "emptyDir" in volume:
            memory = (volume["emptyDir"] or {}).get("medium") == "Memory"
            source = (Path("/dev/shm") / f"wam-{scratch.name}" if memory else scratch / "volumes") / volume["name"]
            folders.append(source)
        elif "persistentVolumeClaim" in volume:  # a folder that outlives the pod, shared by the claim's pods
            source = scratch.parent / "persistent-volumes" / volume["persistentVolumeClaim"]["claimName"]
            folders.append(source)
        elif "serviceAccount" in volume:  # the kubelet's projected token, CA and namespace
            access: ServiceAccount = volume["serviceAccount"]
            source = scratch / "volumes" / volume["name"]
            folders.append(source)
            files.update({source / "token": access.token.encode(), source / "ca.crt": access.ca_pem,
                          source / "namespace": pod["metadata"]["namespace"].encode()})
            read_only = True
        elif "configMap" in volume or "secret" in volume:
            kind, ref = ("ConfigMap", volume["configMap"]) if "configMap" in volume else ("Secret", volume["secret"])
            obj_name = ref.get("name") or ref.get("secretName")
            obj = objects.get((kind, obj_name))
            if obj is None:
                raise SandboxError(f"volume {volume['name']!r}: {kind} {obj_name!r} does not exist")
            source = scratch / "volumes" / volume["name"]
            data = _data(obj)
            items = ref.get("items") or [{"key": k, "path": k} for k in data]
            folders.append(source)
            for item in items:
                files[source / item["path"]] = data[item["key"]]
            read_only = True
        else:
            raise SandboxError(f"volume {volume['name']!r}: only emptyDir, persistentVolumeClaim, configMap and secret "
                               "volumes run locally")
        if mount.get("subPath"):
            source = source / mount["subPath"]
        argv += ["--ro-bind" if read_only else "--bind", str(source), target]
    # The "image" (this environment, and the project where it is installed from source) stays visible where a
    # volume would hide it: a checkout or virtualenv under /tmp, say, which the pods mount an emptyDir over.
    stand_in = {(prefix or Path(sys.prefix)).resolve(), Path(sys.base_prefix).resolve(),
                Path(__file__).resolve().parents[1]}
    for path in sorted(stand_in):
        if any(path.is_relative_to(target) for target in targets):
            argv += ["--ro-bind", str(path), str(path)]
    etc_hosts = scratch / "etc-hosts"
    entries = {"localhost": "127.0.0.1", pod["metadata"]["name"]: "127.0.0.1", **(hosts or {})}
    hostname, subdomain = spec.get("hostname"), spec.get("subdomain")
    if hostname:
        entries[hostname] = "127.0.0.1"
        if subdomain:
            entries[f"{hostname}.{subdomain}"] = "127.0.0.1"
    files[etc_hosts] = "".join(f"{ip}\t{host}\n" for host, ip in entries.items()).encode()
    argv += ["--ro-bind", str(etc_hosts), "/etc/hosts"]
    termination_log = None
    if container.get("terminationMessagePath", "/dev/termination-log"):
        termination_log = scratch / f"termination-{name}"
        files[termination_log] = b""
        argv += ["--bind", str(termination_log), container.get("terminationMessagePath", "/dev/termination-log")]
    if not Path(workdir).exists() and not any(m["mountPath"] == workdir for m in mounts):
        argv += ["--dir", workdir]  # the image's WORKDIR (it exists in the image; read-only like the rest)
    argv += ["--chdir", workdir]
    argv += ["--remount-ro", "/"]  # the mount points made on the way, too
    bin_dir = (prefix or Path(sys.prefix)) / "bin"
    env = {**{k: v for k, v in image.env if k not in STAND_IN_ENV},
           "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOSTNAME": pod["metadata"]["name"]}
    if "kube-api-access" in volumes:
        env.update(KUBERNETES_SERVICE_HOST=service_account.host, KUBERNETES_SERVICE_PORT=str(service_account.port))
    env.update(container_env(pod, container, objects))
    return Plan(argv=[*argv, "--", *command], env=env, files=files, folders=folders, termination_log=termination_log)


@dataclass
class Finished:
    exit_code: int
    message: str  # the termination message (or, per FallbackToLogsOnError, the end of the log)
    reason: str  # Completed | Error | OOMKilled-like reasons are not emulated


class SandboxedContainer:
    """One container's process: started from a Plan, its output in `log`, stopped like a kubelet would."""

    def __init__(self, container: dict, planned: Plan, log: Path):
        if shutil.which(BWRAP) is None:
            raise SandboxError("bubblewrap (`bwrap`) is not installed: apt-get install bubblewrap")
        self.container, self.plan, self.log = container, planned, log
        for folder in planned.folders:
            folder.mkdir(parents=True, exist_ok=True)
        for path, content in planned.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = log.open("ab")
        self.process = subprocess.Popen(planned.argv, env=planned.env, stdout=self._out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def command_line(self) -> str:
        return shlex.join(self.plan.argv)

    def poll(self) -> Finished | None:
        code = self.process.poll()
        return None if code is None else self._finished(code)

    def wait(self, timeout: float | None = None) -> Finished:
        return self._finished(self.process.wait(timeout))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The container's whole process tree (a node failure, or a test's SIGKILL of a rank)."""
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 10.0) -> Finished:
        """SIGTERM, then SIGKILL after the grace period (terminationGracePeriodSeconds). bubblewrap does not pass
        SIGTERM on: the sandbox ends at once, and its PID namespace with it (no graceful shutdown here)."""
        self.kill(signal.SIGTERM)
        try:
            return self.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.wait()

    def _finished(self, code: int) -> Finished:
        self._out.close()
        for folder in self.plan.folders:  # memory-backed emptyDirs go with the pod (it never restarts here)
            if folder.is_relative_to("/dev/shm"):
                shutil.rmtree(folder.parent, ignore_errors=True)
        exit_code = 128 - code if code < 0 else code  # killed by a signal: 137 for SIGKILL, as the kubelet says
        path = self.plan.termination_log
        message = path.read_text(errors="replace").strip() if path and path.exists() else ""
        if not message and exit_code and self.container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = self.log.read_text(errors="replace").splitlines()
            message = "\n".join(lines[-FALLBACK_LOG_LINES:])
        return Finished(exit_code=exit_code, message=message, reason="Completed" if exit_code == 0 else "Error")
