"""MLflow tracking from rank 0: readable back from a real store; a dead server never blocks training."""

import socket
import time

from mlflow.tracking import MlflowClient

from wam.platform.tracking import Tracker, flatten, resolve_uri


def test_params_metrics_and_checkpoint_versions_are_readable_back(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exp", "job-1", "wam-job-1", artifact_dir=tmp_path / "artifacts")
    tracker.start(flatten({"model": {"preset": "tiny"}, "training": {"steps": 3}}))
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
    tracker.log_checkpoint(3, str(tmp_path / "step-3"), '{"step": 3}')
    tracker.finish()
    assert tracker.close()
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"model.preset": "tiny", "training.steps": "3"} and run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5, 1 / 3]
    version = client.get_model_version_by_alias("wam-job-1", "newest")
    assert version.source == str(tmp_path / "step-3") and version.run_id == run.info.run_id
    text = client.download_artifacts(run.info.run_id, "checkpoints/step-3/manifest.json", str(tmp_path))
    assert open(text).read() == '{"step": 3}'

    again = Tracker(uri, "exp", "job-1", "wam-job-1")  # a restarted job continues its run
    again.start({})
    assert again.close() and again.run_id == run.info.run_id


def test_unreachable_server_never_blocks_and_keeps_calls(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracker = Tracker(f"http://127.0.0.1:{port}", "exp", "job", "model", retry_seconds=0.2)
    start = time.monotonic()
    tracker.start({"a": "1"})
    for step in range(1000):
        tracker.log_metrics({"loss": 1.0}, step)
    assert time.monotonic() - start < 1.0  # the caller never waits for the server
    assert not tracker.close(timeout=2)
    assert tracker.run_id is None


def test_uri_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_uri(None, tmp_path) == "http://mlflow:5000"
    assert resolve_uri("http://other:5000", tmp_path) == "http://other:5000"


def test_embedded_store_appears_only_when_complete(tmp_path, monkeypatch):
    """A new sqlite store is built under a temporary name and linked into place once migrated: a rank 0
    killed while MLflow creates it leaves no half-made store behind."""
    from wam.platform.tracking import create_sqlite_store

    path = tmp_path / "runs" / "mlflow.db"
    seen_while_building = []
    original = MlflowClient.search_experiments

    def observe(self, *args, **kwargs):
        result = original(self, *args, **kwargs)  # the first use of a new store runs its migrations
        seen_while_building.append(path.exists())
        return result

    monkeypatch.setattr(MlflowClient, "search_experiments", observe)
    create_sqlite_store(f"sqlite:///{path}")
    assert seen_while_building == [False], "the store's path must appear only once its migrations are done"
    monkeypatch.undo()
    assert [p.name for p in path.parent.iterdir()] == ["mlflow.db"], "no temporary file is left"
    client = MlflowClient(f"sqlite:///{path}", registry_uri=f"sqlite:///{path}")
    client.create_experiment("complete")
    client.create_registered_model("wam-complete")
    create_sqlite_store(f"sqlite:///{path}")  # an existing store is left as it is
    assert client.get_experiment_by_name("complete") is not None
