"""`wam regress` on the smoke suite (configs/regress/smoke.yaml): real trainings (torchrun, 2 CPU processes),
real evaluations, one real MLflow store shared by every run of the module, and the TrainJob path against the
emulated API server, with this test playing the operator and the training pod."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from wam.app import regress
from wam.operators import kube
from wam.operators.testing import EmulatedCluster
from wam.platform import suite as suites
from wam.platform import trainjob
from wam.platform.config import to_yaml
from wam.platform.errors import ConfigError

from conftest import REPO, wait_for, wam_cli

pytestmark = pytest.mark.slow

SUITE = REPO / "configs" / "regress" / "smoke.yaml"
MODEL = "wam-regress-smoke"
STEPS = 16  # the suite's training steps


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("regress")
    # one thread per process: the machine's two cores are shared with the training processes of other tests
    return out, {"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}


def run_local(store, *args: str) -> subprocess.CompletedProcess:
    out, env = store
    return wam_cli("regress", SUITE, "--local", "--output-dir", out, *args, env=env)


def newest_report(out: Path) -> dict:
    folder = max((out / "reports").iterdir(), key=lambda p: p.stat().st_mtime)
    return json.loads((folder / "report.json").read_text())


def words(text: str) -> str:
    return " ".join(text.split())


def test_a_missing_baseline_is_a_clear_error_before_anything_trains(store):
    done = run_local(store)
    assert done.returncode == 2, done.stdout + done.stderr
    text = words(done.stderr)
    assert f"suite smoke has no baseline: registered model '{MODEL}' has no alias 'baseline'" in text
    assert "--update-baseline" in text
    assert not (store[0] / "runs").exists(), "nothing may train without a baseline to compare with"


@pytest.fixture(scope="module")
def baseline(store) -> dict:
    done = run_local(store, "--update-baseline")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is the baseline now" in words(done.stdout)
    return newest_report(store[0])


def test_update_baseline_promotes_the_run(store, baseline):
    client = MlflowClient(store[1]["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias(MODEL, "baseline")
    assert version.run_id == baseline["run_id"] and version.tags["step"] == str(STEPS)
    assert baseline["promoted"] == version.version and baseline["baseline_run_id"] is None


def test_an_injected_regression_fails_naming_the_metrics(store, baseline):
    """A learning rate 100x too large (the loss diverges) and a data path slowed by data.delay_s (about 15x the
    step time of an idle machine). The suite allows 4x, since other jobs on the machine slow runs too; the
    delay stays above that even when the baseline itself ran on a loaded machine (up to 3x slower). Half the
    suite's steps are enough to show both (the delay is slept every step)."""
    done = run_local(store, "training.lr=0.3", "data.delay_s=2", f"training.steps={STEPS // 2}")
    assert done.returncode == 1, done.stdout + done.stderr
    text = words(done.stderr)
    assert "REGRESSION final_loss:" in text and "REGRESSION step_time:" in text
    assert "allowed +10%, lower is better" in text and "allowed +300%, lower is better" in text
    report = newest_report(store[0])
    assert not report["passed"] and report["promoted"] is None
    regressed = {c["name"] for c in report["comparisons"] if c["regressed"]}
    assert {"final_loss", "step_time"} <= regressed and "peak_memory" not in regressed
    client = MlflowClient(store[1]["MLFLOW_TRACKING_URI"])
    assert client.get_run(report["run_id"]).data.tags[regress.PASSED_TAG] == "false"
    assert client.get_model_version_by_alias(MODEL, "baseline").run_id == baseline["run_id"]
    folder = max((store[0] / "reports").iterdir(), key=lambda p: p.stat().st_mtime)
    assert "FAILED: " in (folder / "report.md").read_text() and "| final_loss (`loss`) |" in (folder / "report.md").read_text()


def _play_operator(cluster: EmulatedCluster, namespace: str, out: Path, tracking_uri: str, train: bool) -> str:
    """Wait for `wam regress` to submit its TrainJob, then do what the operator and the pod would: render the
    job's training config, train it (or fail), and write the status the operator writes."""
    def submitted():
        """wam regress to submit its TrainJob"""
        return cluster.objects(kube.TRAINJOB, namespace)

    jobs = wait_for(submitted, timeout=120, every=0.2)
    (obj,) = jobs.values()
    assert obj["metadata"]["labels"][regress.SUITE_LABEL] == "smoke"
    name = obj["metadata"]["name"]
    if not train:
        cluster.kube.patch(kube.TRAINJOB, namespace, name, {"status": {
            "phase": "Failed", "lastFailure": {"reason": "OOMKilled", "message": "node 0 ran out of memory"}}},
            subresource="status")
        return name
    job = trainjob.parse(obj)
    cfg = trainjob.training_config(job, trainjob.Platform(checkpoint_base=str(out / "bucket"), tracking_uri=tracking_uri))
    cfg.output_dir = str(out / "pod")  # the pod's working directory
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(to_yaml(cfg))
    cluster.kube.patch(kube.TRAINJOB, namespace, name, {"status": {"phase": "Running"}}, subresource="status")
    trained = wam_cli("train", cfg.run_dir / "config.yaml", env={"OMP_NUM_THREADS": "1"})
    assert trained.returncode == 0, trained.stdout + trained.stderr
    run_id = json.loads((cfg.run_dir / "run.json").read_text())["mlflow_run_id"]
    cluster.kube.patch(kube.TRAINJOB, namespace, name, {"status": {
        "phase": "Succeeded", "mlflow": {"runId": run_id}, "progress": {"summary": f"{STEPS}/{STEPS}"},
        "checkpoint": {"step": STEPS, "uri": f"{cfg.checkpoint_uri}/step-{STEPS}"}}}, subresource="status")
    return name


def test_the_same_config_run_again_through_a_trainjob_passes(store, baseline):
    """The second run of the suite's config: submitted as a TrainJob, waited for, evaluated, compared."""
    out, env = store
    with EmulatedCluster() as cluster:
        def regress_in_cluster(namespace: str) -> subprocess.Popen:
            return subprocess.Popen([str(Path(sys.executable).parent / "wam"), "regress", str(SUITE), "-n", namespace,
                                     "--output-dir", str(out / namespace), "--poll", "0.5"],
                                    env={**os.environ, **env, "KUBECONFIG": str(cluster.kubeconfig)},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        process = regress_in_cluster("ci")
        name = _play_operator(cluster, "ci", out, env["MLFLOW_TRACKING_URI"], train=True)
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stdout + stderr
        assert f"TrainJob ci/{name}: Succeeded" in words(stdout) and "passed" in stdout
        report = newest_report(out / "ci")
        assert report["passed"] and report["run"] == f"ci.{name}" and report["baseline_run_id"] == baseline["run_id"]
        by_name = {c["name"]: c for c in report["comparisons"]}
        assert set(by_name) == {"final_loss", "eval_action_l1", "eval_video_mse", "step_time", "peak_memory"}
        for metric in ("final_loss", "eval_action_l1", "eval_video_mse"):  # the config --local trained, same seed
            assert by_name[metric]["value"] == by_name[metric]["baseline"], by_name[metric]
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        run = client.get_run(report["run_id"])
        assert run.data.tags[regress.PASSED_TAG] == "true" and run.data.tags[regress.SUITE_TAG] == "smoke"
        assert {"eval/action_l1", "eval/video_mse", "host/peak_rss_gib", "step_time_s"} <= set(run.data.metrics)
        assert [m.step for m in client.get_metric_history(report["run_id"], "eval/action_l1")] == [STEPS]
        logged = {a.path for folder in ("regress/smoke", f"eval/step-{STEPS}")
                  for a in client.list_artifacts(report["run_id"], folder)}
        assert logged == {"regress/smoke/report.json", "regress/smoke/report.md", f"eval/step-{STEPS}/report.json",
                          f"eval/step-{STEPS}/actions.png"}

        failing = regress_in_cluster("ci-failing")
        _play_operator(cluster, "ci-failing", out, env["MLFLOW_TRACKING_URI"], train=False)
        stdout, stderr = failing.communicate(timeout=120)
        assert failing.returncode == 1, stdout + stderr
        assert "REGRESSION: TrainJob ci-failing/smoke-" in words(stderr) and "OOMKilled: node 0 ran out" in words(stderr)


def test_suite_mistakes_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE.read_text().replace("tolerance: 0.1}", "tolerance: 0.1, better: sideways}", 1))
    with pytest.raises(ConfigError, match=r"metrics\[0\].better: 'sideways' is not one of lower, higher"):
        suites.load_suite(bad)
    bad.write_text(SUITE.read_text().replace("eval: {windows: 8, seed: 0}", ""))
    with pytest.raises(ConfigError, match="eval/\\* metrics need an `eval` section"):
        suites.load_suite(bad)
    suite = suites.load_suite(SUITE)
    with pytest.raises(ConfigError, match="spec.config.model.preset is set by the platform"):
        regress.local_config(suites.with_overrides(suite, ["model.preset=dreamzero-14b"]), "smoke-x", tmp_path, "sqlite://")
