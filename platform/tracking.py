"""MLflow tracking of a training job: one run per job, used by rank 0 only.

Every call is queued and executed by a background thread, so training never waits on the tracking
server. If the server is unreachable, the job warns once and keeps the calls, retrying them in order
until they go through; it never fails because of tracking. A job is found again by its tag
`wam.job=<name>`, so a restarted or resumed job logs into the same run.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("wam.tracking")

JOB_TAG = "wam.job"
CHECKPOINT_TAG = "wam.latest_checkpoint"
NEWEST_ALIAS = "newest"  # MLflow reserves "latest"
EVAL_TAG = "wam.eval_of"  # on an evaluation run of a job whose own run is unknown
_MAX_PARAMS_PER_CALL = 100
_MAX_METRICS_PER_CALL = 1000


def resolve_uri(configured: str | None, run_dir: Path) -> str:
    """Config first, then $MLFLOW_TRACKING_URI, else an embedded sqlite store in the run directory."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def create_sqlite_store(uri: str) -> None:
    """Create a new embedded sqlite store whole or not at all. MLflow builds one with tens of migrations that
    are not atomic together, and a process killed among them (a SIGKILLed rank 0) leaves a file no one can
    open again; so the store is built under a temporary name and linked into place when complete (a store
    another process completed meanwhile wins)."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if path.exists():
        return
    from mlflow.tracking import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    building = path.with_name(f".{path.name}.{os.getpid()}.building")
    building.unlink(missing_ok=True)
    try:
        MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments(max_results=1)  # runs the migrations
        try:
            os.link(building, path)
        except FileExistsError:
            pass
    finally:
        building.unlink(missing_ok=True)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'model.preset': 'tiny', ...} for MLflow params."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out


def _rejected(err: Exception) -> bool:
    """True for a definite refusal (a 4xx answer: bad value, missing resource), as opposed to a server
    that cannot be reached or failed (worth retrying)."""
    status = getattr(err, "get_http_status_code", None)
    return status is not None and 400 <= status() < 500


class Tracker:
    def __init__(self, uri: str, experiment: str, job: str, registered_model: str,
                 artifact_dir: Path | None = None, retry_seconds: float = 5.0, max_pending: int = 100_000):
        # A dead server must fail fast inside MLflow; retrying is this class's job.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        self.uri, self.experiment, self.job, self.registered_model = uri, experiment, job, registered_model
        self.artifact_dir = artifact_dir
        self.retry_seconds = retry_seconds
        self.run_id: str | None = None
        self._client = None
        self._queue: queue.Queue = queue.Queue()
        self._pending: deque[Callable[[], None]] = deque(maxlen=max_pending)
        self._warned = False
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._work, name="wam-tracking", daemon=True)
        self._thread.start()

    # -- public, non-blocking -------------------------------------------------------------------------

    def start(self, params: dict[str, str], tags: dict[str, str] | None = None) -> None:
        self._queue.put(lambda: self._start(params, tags or {}))

    def tag(self, key: str, value: str) -> None:
        self._queue.put(lambda: self._mlflow().set_tag(self.run_id, key, value[:5000]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        self._queue.put(lambda: self._log_metrics(metrics, step, stamp))

    def log_checkpoint(self, step: int, uri: str, manifest_json: str) -> None:
        """Record a complete checkpoint: its manifest as an artifact, and a new version of the registered
        model (source = the checkpoint folder) under the alias 'newest'."""
        self._queue.put(lambda: self._log_checkpoint(step, uri, manifest_json))

    def finish(self, status: str = "FINISHED") -> None:
        self._queue.put(lambda: self._mlflow().set_terminated(self.run_id, status))

    def close(self, timeout: float = 30.0) -> bool:
        """Flush what can be flushed within `timeout` (one more retry when the server is down); True when
        nothing was left behind."""
        done = threading.Event()
        self._queue.put(done.set)
        flushed = done.wait(min(timeout, 2 * self.retry_seconds) if self._warned else timeout)
        self._closed.set()
        if not flushed:
            log.warning("MLflow tracking at %s: %d calls could not be delivered", self.uri,
                        len(self._pending) + self._queue.qsize())
        return flushed

    # -- worker ----------------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._closed.is_set():
            try:
                self._pending.append(self._queue.get(timeout=0.5))
            except queue.Empty:
                pass
            while self._pending and not self._closed.is_set():
                try:
                    self._pending[0]()
                except Exception as err:  # noqa: BLE001 - tracking must never stop training
                    if _rejected(err):  # the server answered "no": retrying cannot help
                        log.error("MLflow rejected a tracking call: %s", err)
                        self._pending.popleft()
                        continue
                    if not self._warned:
                        log.warning("MLflow tracking at %s is unavailable (%s: %s); training continues and "
                                    "tracking calls are kept and retried", self.uri, type(err).__name__, err)
                        self._warned = True
                    self._closed.wait(self.retry_seconds)
                    break
                self._pending.popleft()

    def _mlflow(self):
        """The MLflow client (imported here: wam.platform does not need mlflow to import). Calls run in
        queue order, so every call after `start` sees the run id."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            create_sqlite_store(self.uri)
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def _start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        client = self._mlflow()
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            location = self.artifact_dir.resolve().as_uri() if self.artifact_dir else None
            experiment_id = client.create_experiment(self.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        found = client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{self.job}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = client.create_run(experiment_id, run_name=self.job, tags={JOB_TAG: self.job, **tags}).info.run_id
            items = sorted(params.items())
            from mlflow.entities import Param

            for i in range(0, len(items), _MAX_PARAMS_PER_CALL):
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + _MAX_PARAMS_PER_CALL]])

    def _log_metrics(self, metrics: dict[str, float], step: int, stamp: int) -> None:
        from mlflow.entities import Metric

        client = self._mlflow()
        entries = [Metric(k, float(v), stamp, step) for k, v in metrics.items() if v is not None]
        client.log_batch(self.run_id, metrics=entries)

    def _log_checkpoint(self, step: int, uri: str, manifest_json: str) -> None:
        from mlflow.exceptions import MlflowException

        client = self._mlflow()
        client.log_text(self.run_id, manifest_json, f"checkpoints/step-{step}/manifest.json")
        client.set_tag(self.run_id, CHECKPOINT_TAG, uri)
        try:
            client.create_registered_model(self.registered_model)
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        version = client.create_model_version(self.registered_model, source=uri, run_id=self.run_id,
                                              tags={"step": str(step)})
        client.set_registered_model_alias(self.registered_model, NEWEST_ALIAS, version.version)


def find_job_run(client, experiment: str, job: str) -> str | None:
    """The id of a training job's run (by its `wam.job` tag), or None."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job}'",
                              max_results=1) if found else []
    return runs[0].info.run_id if runs else None


def log_evaluation(uri: str, experiment: str, job: str, step: int, metrics: dict[str, float], artifacts: Path,
                   run_id: str | None = None, artifact_dir: str = "eval") -> str:
    """Record an evaluation of a job's checkpoint: metrics at the checkpoint's step and the files of the folder
    `artifacts` under <artifact_dir>/step-N, on the job's run (`run_id`, else found by its job tag), else on a new run
    tagged `wam.eval_of=<job>`. Returns the run id. Raises when the server cannot be reached."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = run_id or find_job_run(client, experiment, job)
    if run_id is None:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run_id = client.create_run(experiment_id, run_name=f"eval-{job}", tags={EVAL_TAG: job}).info.run_id
        client.set_terminated(run_id)
    stamp = int(time.time() * 1000)
    entries = [Metric(k, float(v), stamp, step) for k, v in sorted(metrics.items())]
    for i in range(0, len(entries), _MAX_METRICS_PER_CALL):
        client.log_batch(run_id, metrics=entries[i:i + _MAX_METRICS_PER_CALL])
    client.log_artifacts(run_id, str(artifacts), f"{artifact_dir}/step-{step}")
    return run_id


def quantized_model_name(registered_model: str) -> str:
    return f"{registered_model}-nvfp4"


def log_quantized_model(uri: str, experiment: str, job: str, registered_model: str, step: int, model_uri: str,
                        report_json: str, summary: dict[str, float]) -> str:
    """Record a quantized checkpoint on its training job's run (the report as an artifact, its summary as
    metrics at the checkpoint's step) and register it as a new version of `<registered_model>-nvfp4` under
    the alias 'newest'. Returns the version. Raises when the server cannot be reached: the caller decides."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # an outage must not hold the handoff long
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = find_job_run(client, experiment, job)
    if run_id is not None:
        client.log_text(run_id, report_json, f"quantized/step-{step}/report.json")
        stamp = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"nvfp4/{k}", float(v), stamp, step) for k, v in summary.items()])
    name = quantized_model_name(registered_model)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    version = client.create_model_version(name, source=model_uri, run_id=run_id,
                                          tags={"step": str(step), "format": "nvfp4"})
    client.set_registered_model_alias(name, NEWEST_ALIAS, version.version)
    return version.version
