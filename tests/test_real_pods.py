"""The chart installed with real processes: the operator in its own pod (the chart's Deployment, in-cluster
credentials, the image's entrypoint) against the emulated API, and every pod it causes run for real under
its pod's rules (wam.operators.local_cluster, bubblewrap) — a 2-node torchrun training through the JobSet's
service name on the real S3 server and the real MLflow server, a rank killed mid-run and the attempt
restarted from the newest complete checkpoint, the quantize Job quantizing, the serving Deployment serving
the public openpi-client; an InvalidInput from a real process ending its job without a restart; the nightly
CronJob's `wam regress` and the chart's `helm test` pod."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from wam.operators import kube
from wam.operators.local_cluster import (
    JOB_NAME,
    JOBSET_NAME,
    LocalKubelet,
    dockerfile_images,
    job_from_cronjob,
)
from wam.operators.testing import EmulatedCluster
from wam.platform import trainjob

from conftest import REPO, free_port, render_chart, wait_for

NS = "default"


def chart_values(s3_secret: str, mlflow_port: int, serving_port: int) -> list[str]:
    """`helm install` arguments of this test: free loopback ports, the local object store, the chart's own
    MLflow server, the nightly suite (the smoke suite) run by `wam regress`, promoting its run to the baseline."""
    smoke = yaml.safe_load((REPO / "configs" / "regress" / "smoke.yaml").read_text())
    values = {"mlflow.port": mlflow_port, "settings.secretRefs": [s3_secret],
              "settings.checkpointBase": "s3://wam-checkpoints", "settings.progressIntervalSeconds": 0.5,
              "settings.serving.port": serving_port, "operator.metricsPort": free_port(),
              "operator.healthPort": free_port(), "operator.logFormat": "plain", "nightly.enabled": True,
              "nightly.updateBaseline": True, "nightly.pollSeconds": 1, "nightly.suite": smoke}
    return [arg for key, value in values.items() for arg in ("--set-json", f"{key}={json.dumps(value)}")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    tmp = tmp_path_factory.mktemp("real-pods")
    port, mlflow_port = free_port(), free_port()
    docs = render_chart(*chart_values("object-store", mlflow_port, port), namespace=NS)
    with EmulatedCluster() as c, LocalKubelet(c.kube, NS, tmp / "pods", pod_log=c.set_pod_log,
                                              images=dockerfile_images(REPO / "dockerfiles"),
                                              service_account=c.service_account()) as kubelet:
        c.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "object-store", "namespace": NS},
                       "stringData": s3})  # the pods reach the object store through settings.secretRefs
        installed = [d for d in docs if (d["apiVersion"], d["kind"]) in kube.KINDS
                     and "helm.sh/hook" not in (d["metadata"].get("annotations") or {})]
        for doc in installed:  # what `helm install` creates that runs here: the operator and MLflow, their data
            c.kube.create(doc)

        def mlflow_ready():
            """the chart's MLflow server ready"""
            dep = next(d for d in c.kube.list(kube.DEPLOYMENT, NS, {}) if d["metadata"]["name"].endswith("-mlflow"))
            return (dep.get("status") or {}).get("readyReplicas") == 1
        wait_for(mlflow_ready, timeout=180)
        c.tracking_uri = f"http://localhost:{mlflow_port}"  # a host its --allowed-hosts accepts
        c.chart = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        c.kubelet, c.serving_port, c.kubeconfig_env = kubelet, port, {"KUBECONFIG": str(c.kubeconfig)}
        try:
            yield c
        finally:
            for (namespace, pod, container), text in c.emulator.pod_logs.items():
                if container in ("operator", "mlflow"):
                    print(f"--- {namespace}/{pod}\n{text[-10000:]}")
            print("kubelet errors:", kubelet.errors)


def submit(c, name: str, config: dict, **spec) -> None:
    assert c.kube.create({"apiVersion": trainjob.API_VERSION, "kind": trainjob.KIND,
                          "metadata": {"name": name, "namespace": NS},
                          "spec": {"model": {"preset": "tiny"}, "config": config, "scheduling": {"gang": "none"},
                                   "resources": {"accelerator": "h100", "nodes": 2, "gpusPerNode": 1}, **spec}})


def status(c, name: str) -> dict:
    return (c.kube.get(kube.TRAINJOB, NS, name) or {}).get("status") or {}


def pods_of(c, jobset: str) -> list[dict]:
    return c.kube.list(kube.POD, NS, {JOBSET_NAME: jobset})


def test_two_node_trainjob_restarts_after_a_killed_rank_and_serves_a_real_client(cluster):
    c, steps = cluster, 50
    submit(c, "real", {"data": {"source": "synthetic"}, "training": {"steps": steps, "log_every": 5}},
           checkpoint={"interval": 10},
           handoff={"quantize": "final", "serving": {"replicas": 1, "accelerator": "h100"}})

    # Both ranks train; once a checkpoint is complete, rank 1's process is killed (SIGKILL).
    def checkpointed():
        """a complete checkpoint of attempt 0"""
        st = status(c, "real")
        return (st.get("checkpoint") or {}).get("step", 0) >= 10 and st.get("attempt") == 0 and st
    wait_for(checkpointed, timeout=240)
    rank1 = next(p for p in pods_of(c, "real-0") if p["spec"]["hostname"].endswith("-1"))
    c.kubelet.kill(rank1["metadata"]["name"])

    # The pod fails, the operator restarts the attempt, and training resumes from the newest checkpoint.
    def served():
        """the TrainJob Serving"""
        st = status(c, "real")
        return any(x["type"] == "Serving" and x["status"] == "True" for x in st.get("conditions", [])) and st
    st = wait_for(served, timeout=420)
    assert st["restarts"] == 1 and st["attempt"] == 1 and st["progress"]["step"] == steps
    killed = c.kube.get(kube.POD, NS, rank1["metadata"]["name"])
    assert killed is None or killed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    resumed = "".join(c.emulator.pod_logs.get((NS, p["metadata"]["name"], "trainer"), "")
                      for p in pods_of(c, "real-1"))
    started = [int(m) for m in re.findall(r"Training starts at step (\d+)", resumed)]
    assert started and 10 < started[0] <= steps - 9 and (started[0] - 1) % 10 == 0, resumed[-3000:]  # from a checkpoint
    assert st["quantized"]["step"] == steps and st["checkpoint"]["step"] == steps

    # The serving Deployment's process answers the public openpi client on the Service's port.
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    client = WebsocketClientPolicy(f"ws://127.0.0.1:{c.serving_port}")
    meta = client.get_server_metadata()
    assert meta["step"] == steps and meta["preset"] == "tiny"
    assert st["serving"]["embodiments"] == meta["embodiments"] == [meta["embodiment"]]  # the status names what runs
    rng = np.random.default_rng(0)
    low, high = np.array(meta["safety"]["state_low"]), np.array(meta["safety"]["state_high"])
    obs = {**{cam: rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for cam in meta["cameras"]},
           "observation.state": rng.uniform(low, high).astype(np.float32), "prompt": "push the block"}
    reply = client.infer(obs)
    assert reply["actions"].shape == (meta["actions_per_chunk"], meta["action_dims"])
    assert np.isfinite(reply["actions"]).all()


def test_invalid_input_from_a_real_process_ends_the_job_without_restart(cluster, s3):
    """A TrainJob whose name already holds checkpoints of another model: only the training process can find
    that out (it reads the newest manifest when it starts); it exits with code 2 and InvalidInput in its
    termination log, the TrainJob fails at once without a restart, and `wam status` shows the message."""
    import fsspec

    from wam.platform import checkpoints

    c = cluster
    os.environ.update(s3)  # this process writes to the same object store
    step = checkpoints.step_dir("s3://wam-checkpoints/default/clash", 5)
    with fsspec.open(f"{step}/__0_0.distcp", "wb") as f:
        f.write(b"shard")
    checkpoints.write_manifest(step, 5, config={"model": {"preset": "tiny", "dim": 999}}, metrics={})
    submit(c, "clash", {"data": {"source": "synthetic"}, "training": {"steps": 5}})

    def failed():
        """the TrainJob Failed"""
        st = status(c, "clash")
        return st.get("phase") == "Failed" and st
    st = wait_for(failed, timeout=240)
    assert st["restarts"] == 0 and st["lastFailure"]["reason"] == "InvalidInput", st
    assert "model.dim was 999" in st["lastFailure"]["message"]
    shown = subprocess.run([str(Path(sys.executable).parent / "wam"), "status", "clash", "-n", NS],
                           capture_output=True, text=True, env={**os.environ, **c.kubeconfig_env,
                                                                "COLUMNS": "400"}, timeout=120)
    assert shown.returncode == 0 and "model.dim was 999" in shown.stdout, shown.stdout + shown.stderr


def test_the_nightly_cronjob_runs_wam_regress_in_its_pod(cluster):
    """The CronJob's Job (as its schedule would create it): `wam regress` in the trainer image submits the suite's
    TrainJob through its service account, follows it to the end, evaluates the final checkpoint from the
    object store, logs the report to MLflow and promotes the run to the suite's baseline."""
    c = cluster
    cronjob = next(d for (kind, _), d in c.chart.items() if kind == "CronJob")
    c.kube.create(job_from_cronjob(cronjob, "nightly-manual"))

    def finished():
        """the nightly Job finished"""
        job = c.kube.get(kube.JOB, NS, "nightly-manual") or {}
        return [x["type"] for x in (job.get("status") or {}).get("conditions") or [] if x["status"] == "True"]
    done = wait_for(finished, timeout=600)
    pod = c.kube.list(kube.POD, NS, {JOB_NAME: "nightly-manual"})[0]["metadata"]["name"]
    log = c.emulator.pod_logs.get((NS, pod, "regress"), "")
    assert done == ["Complete"], log[-5000:]
    assert "final_loss" in log and "baseline" in log, log[-5000:]
    import mlflow

    versions = mlflow.MlflowClient(c.tracking_uri).get_model_version_by_alias("wam-regress-smoke", "baseline")
    assert versions.run_id


def test_the_charts_helm_test_pod_passes(cluster):
    """`helm test`: the chart's check pod reaches the operator's metrics through its Service's name."""
    c = cluster
    check = next(d for (kind, _), d in c.chart.items() if kind == "Pod")
    c.kube.create(check)

    def ended():
        """the helm test pod ended"""
        pod = c.kube.get(kube.POD, NS, check["metadata"]["name"]) or {}
        return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") and pod
    pod = wait_for(ended, timeout=120)
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
