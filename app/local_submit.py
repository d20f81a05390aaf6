"""`wam submit --local FILE`: a TrainJob on this machine, with real pods and no cluster.

Everything a TrainJob meets in a cluster is started here, together and for as long as the command runs: a
local S3-compatible object store (moto) for checkpoints, an MLflow server whose store stays in the work
folder, the emulated Kubernetes API (wam.operators.testing), the real operator, and a local kubelet
(wam.operators.local_cluster) that runs every pod the operator causes — training ranks, the quantize Job, the
policy server — as real processes under their pods' rules (bubblewrap). When the job ends its checkpoints are
copied out of the object store into the work folder; while it serves, the policy answers on loopback.

Real: the processes, their commands and env, the filesystem rules, networking on loopback. Not real:
scheduling and gang admission, the kubelet's restarts, cgroup limits, images (this environment stands in).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import requests
import yaml

from wam.operators.status import true_condition
from wam.platform.errors import ConfigError
from wam.platform.launch import free_port

NAMESPACE = "default"
BUCKET = "wam-checkpoints"
STORE_SECRET = "object-store"
DOCKERFILES = Path(__file__).resolve().parents[1] / "dockerfiles"


def check_prerequisites() -> None:
    """What the local cluster needs beyond the trainer: bubblewrap, the `local` extra and the Dockerfiles."""
    if shutil.which("bwrap") is None:
        raise ConfigError("--local runs pods under bubblewrap, which is not installed: apt-get install bubblewrap")
    try:
        import dockerfile_parse  # noqa: F401
        import kmock  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"--local needs the `local` extra ({err.name} is missing): "
                          "pip install 'wam-platform[local]'") from None
    if not any(DOCKERFILES.glob("*.Dockerfile")):
        raise ConfigError(f"--local reads the images' entrypoints from {DOCKERFILES}, which has no Dockerfiles: "
                          "run it from a source checkout (pip install -e .)")


def _wait(what: Callable[[], bool], timeout_s: float, name: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start within {timeout_s:.0f} s")
        time.sleep(0.5)


class LocalPlatform:
    """The object store, MLflow, the emulated API, the operator and the local kubelet, under `workdir`."""

    def __init__(self, workdir: Path, serving_port: int):
        self.workdir, self.serving_port = workdir, serving_port
        self._stack = ExitStack()

    def __enter__(self) -> LocalPlatform:
        from wam.operators.local_cluster import LocalKubelet, dockerfile_images
        from wam.operators.testing import EmulatedCluster

        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.store_env = self._object_store()
            os.environ.update(self.store_env)  # this process copies the checkpoints out at the end
            self.tracking_uri = self._mlflow()
            self.cluster = self._stack.enter_context(EmulatedCluster())
            self.cluster.kube.create({"apiVersion": "v1", "kind": "Secret", "stringData": self.store_env,
                                      "metadata": {"name": STORE_SECRET, "namespace": NAMESPACE}})
            self.kubelet = self._stack.enter_context(LocalKubelet(
                self.cluster.kube, NAMESPACE, self.workdir / "pods", pod_log=self.cluster.set_pod_log,
                images=dockerfile_images(DOCKERFILES), service_account=self.cluster.service_account()))
            settings = self.workdir / "operator-settings.yaml"
            settings.write_text(yaml.safe_dump({
                "checkpointBase": f"s3://{BUCKET}", "secretRefs": [STORE_SECRET], "progressIntervalSeconds": 2,
                "serving": {"port": self.serving_port}, "mlflow": {"trackingUri": self.tracking_uri}}))
            operator = self.cluster.start_operator(settings, self.workdir / "operator.log", self.store_env)
            self._stack.callback(_terminate, operator)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _object_store(self) -> dict[str, str]:
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        self._stack.callback(server.stop)
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "local",
               "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="local",
                     aws_secret_access_key="local", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        return env

    def _mlflow(self) -> str:
        """An MLflow server whose runs outlive the command (`mlflow ui --backend-store-uri` on the same db)."""
        port = free_port()
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{self.workdir.resolve() / 'mlflow.db'}",
             "--artifacts-destination", str(self.workdir.resolve() / "mlflow-artifacts"), "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=(self.workdir / "mlflow.log").open("ab"), stderr=subprocess.STDOUT)
        self._stack.callback(_terminate, server)
        uri = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"the MLflow server exited; see {self.workdir / 'mlflow.log'}")
            try:
                return requests.get(f"{uri}/health", timeout=1).ok
            except requests.RequestException:
                return False
        _wait(up, 180, "the MLflow server")
        return uri

    def copy_checkpoints(self, status: dict) -> Path | None:
        """The job's checkpoints (and quantized folders) from the object store into the work folder."""
        import fsspec

        from wam.platform.checkpoints import series_of

        uri = (status.get("checkpoint") or {}).get("uri")
        if not uri:
            return None
        series = series_of(uri)
        target = self.workdir / "checkpoints"
        fsspec.filesystem("s3").get(series.removeprefix("s3://") + "/", str(target) + "/", recursive=True)
        return target


def _line(st: dict) -> str:
    """One line of what changed: phase, step, loss, restarts, handoff."""
    progress = st.get("progress") or {}
    parts = [st.get("phase", "Pending"), progress.get("summary"),
             f"loss {progress['loss']:.4g}" if isinstance(progress.get("loss"), int | float) else None,
             f"restarts {st['restarts']}" if st.get("restarts") else None,
             f"checkpoint step {st['checkpoint']['step']}" if st.get("checkpoint") else None,
             "quantized" if st.get("quantized") else None, "serving" if is_serving(st) else None]
    return " · ".join(str(p) for p in parts if p)


def is_serving(st: dict) -> bool:
    return true_condition({"status": st}, "Serving") is not None


def _settled(st: dict, handoff) -> bool:
    """Failed; or succeeded with its handoff done (quantized, and serving if asked) or its quantization failed."""
    if st.get("phase") != "Succeeded":
        return st.get("phase") == "Failed"
    if handoff.quantize == "never":
        return True
    quantized = next((c for c in st.get("conditions") or [] if c["type"] == "Quantized"), None)
    if quantized is None or quantized["reason"] == "Quantizing":
        return False
    return quantized["status"] != "True" or not handoff.serving.replicas or is_serving(st)


def run(obj: dict, workdir: Path, serving_port: int, say: Callable[[str], None],
        show: Callable[[dict], None]) -> int:
    """Apply the TrainJob `obj` to a fresh local platform and follow it: `say` gets progress lines, `show` the
    final status. Returns 0 when it succeeded (it then keeps serving until Ctrl-C, if it serves), else 1."""
    from wam.operators import kube
    from wam.platform import trainjob

    check_prerequisites()
    handoff = trainjob.parse(obj).spec.handoff
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", serving_port))
        except OSError:
            raise ConfigError(f"--serving-port {serving_port} is in use on this machine: pass a free one") from None
    name = obj["metadata"]["name"]
    say(f"starting the local cluster in {workdir}: object store, MLflow, API server, operator, kubelet")
    with LocalPlatform(workdir, serving_port) as platform:
        platform.cluster.kube.create(obj)
        say(f"trainjob {NAMESPACE}/{name} created; MLflow at {platform.tracking_uri}; pod logs in {workdir / 'pods'}")
        last, st = "", {}
        try:
            while not _settled(st, handoff):
                time.sleep(1)
                st = (platform.cluster.kube.get(kube.TRAINJOB, NAMESPACE, name) or {}).get("status") or {}
                if (line := _line(st)) != last:
                    say(line)
                    last = line
        except KeyboardInterrupt:
            say(f"interrupted: stopping the local cluster (logs stay in {workdir})")
            return 130
        copied = platform.copy_checkpoints(st)
        show(st)
        if copied:
            say(f"checkpoints copied to {copied}")
        if st.get("phase") != "Succeeded" or (handoff.quantize != "never" and not st.get("quantized")):
            return 1
        if is_serving(st):
            say(f"the policy answers at ws://127.0.0.1:{serving_port} (e.g. `wam client ws://127.0.0.1:{serving_port}"
                " ...`); Ctrl-C stops everything")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def _terminate(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
