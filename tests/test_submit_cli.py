"""`wam submit / status / logs` against the emulated API server (no operator runs here)."""

from __future__ import annotations

import pytest

from wam.operators import kube
from wam.operators.testing import EmulatedCluster

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
