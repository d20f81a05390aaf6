"""`wam submit / status / logs` against the emulated API server (no operator runs here)."""

from __future__ import annotations

import pytest

from wam.operators import builders, jobset, kube, rayjob
from wam.operators.testing import EmulatedCluster
from wam.platform import trainjob

from conftest import REPO, wam_cli


@pytest.fixture(scope="module")
def cluster():
    with EmulatedCluster() as c:
        yield c


def test_submit_status_and_logs(cluster, tmp_path):
    env = {"KUBECONFIG": str(cluster.kubeconfig)}
    example = str(REPO / "examples" / "tiny-smoke.yaml")
    done = wam_cli("submit", example, "-n", "team-a", env=env)
    assert done.returncode == 0, done.stderr
    job = cluster.kube.get(kube.TRAINJOB, "team-a", "tiny-smoke")
    assert job["spec"]["resources"]["accelerator"] == "h100"

    again = wam_cli("submit", example, "-n", "team-a", env=env)
    assert again.returncode == 2 and "already exists" in again.stderr

    cluster.kube.patch(kube.TRAINJOB, "team-a", "tiny-smoke", {"status": {
        "phase": "Running", "restarts": 1, "progress": {"step": 40, "totalSteps": 100, "summary": "40/100", "loss": 0.5},
        "conditions": [{"type": "Running", "status": "True", "reason": "AllNodesReady", "message": "1 node(s) ready"}]}},
        subresource="status")
    shown = wam_cli("status", "tiny-smoke", "-n", "team-a", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "Running" in shown.stdout and "40/100" in shown.stdout and "AllNodesReady" in shown.stdout

    no_pods = wam_cli("logs", "tiny-smoke", "-n", "team-a", env=env)
    assert no_pods.returncode == 2 and "no JobSet" not in no_pods.stderr and "tiny-smoke" in no_pods.stderr
    missing = wam_cli("status", "nope", "-n", "team-a", env=env)
    assert missing.returncode == 2 and "no TrainJob team-a/nope" in missing.stderr


def test_submit_refuses_a_bad_manifest_before_the_cluster_sees_it(cluster, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: {name: bad}\nspec: {resources: {accelerator: h100, nodes: 0}}\n")
    done = wam_cli("submit", str(bad), env={"KUBECONFIG": str(cluster.kubeconfig)})
    assert done.returncode == 2 and "spec.resources.nodes" in " ".join(done.stderr.split())
    assert cluster.kube.get(kube.TRAINJOB, "default", "bad") is None


def _running(cluster, name: str, launcher: str, child_status: dict) -> None:
    """A TrainJob as the operator leaves it once its first attempt runs (no operator runs in this module)."""
    cluster.kube.create({"apiVersion": trainjob.API_VERSION, "kind": trainjob.KIND,
                         "metadata": {"name": name, "namespace": "team-b"},
                         "spec": {"model": {"preset": "tiny"}, "launcher": launcher,
                                  "config": {"data": {"source": "synthetic"}}}})
    cluster.kube.patch(kube.TRAINJOB, "team-b", name, {"status": {"phase": "Running", "attempt": 0, **child_status}},
                       subresource="status")


def _pod(cluster, name: str, labels: dict[str, str]) -> None:
    cluster.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "team-b",
                                                                          "labels": labels}})


def test_logs_of_a_torchrun_job_come_from_the_node_pod_of_its_jobset(cluster):
    env = {"KUBECONFIG": str(cluster.kubeconfig)}
    _running(cluster, "js", "torchrun", {"jobset": "js-0"})
    for rank in (0, 1):
        pod = f"js-0-node-0-{rank}-x"
        _pod(cluster, pod, {jobset.NAME_LABEL: "js-0", jobset.POD_INDEX_LABEL: str(rank)})
        cluster.set_pod_log("team-b", pod, "trainer", f"step 3 loss 0.5 on node {rank}\n")
    shown = wam_cli("logs", "js", "-n", "team-b", "--rank", "1", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "step 3 loss 0.5 on node 1\n"
    beyond = wam_cli("logs", "js", "-n", "team-b", "--rank", "2", env=env)
    assert beyond.returncode == 2 and "no pod of node 2 in JobSet js-0" in beyond.stderr


def test_logs_of_a_ray_job_come_from_its_submitter_pod(cluster):
    env = {"KUBECONFIG": str(cluster.kubeconfig)}
    _running(cluster, "rj", "ray", {"rayJob": "rj-0"})
    labels = {builders.JOB_LABEL: "rj", builders.ATTEMPT_LABEL: "0"}
    _pod(cluster, "rj-0-head-abcde", {**labels, builders.COMPONENT_LABEL: rayjob.HEAD_COMPONENT})
    _pod(cluster, "rj-0-submitter-fghij", {**labels, builders.COMPONENT_LABEL: rayjob.SUBMITTER_COMPONENT})
    cluster.set_pod_log("team-b", "rj-0-head-abcde", "ray-head", "ray start --head ...\n")
    cluster.set_pod_log("team-b", "rj-0-submitter-fghij", rayjob.SUBMITTER_CONTAINER,
                        "(RayTrainWorker pid=42) step 3 loss 0.5\n")
    shown = wam_cli("logs", "rj", "-n", "team-b", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "(RayTrainWorker pid=42) step 3 loss 0.5\n"
    ranked = wam_cli("logs", "rj", "-n", "team-b", "--rank", "1", env=env)
    assert ranked.returncode == 2 and "--rank does not apply" in " ".join(ranked.stderr.split())
