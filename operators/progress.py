"""What the training job itself reports: rank 0's MLflow run (step, loss, tokens/s) and the checkpoint
manifests it writes last, after every file of a checkpoint. Read over MLflow's REST API and fsspec, so the
operator image needs neither mlflow nor torch, and never execs into pods.

Polling is batched so that it does not grow into a load on the tracking server as jobs are added
(`ProgressReader`): one runs/search per experiment and interval answers every running job in it, and a job's
checkpoints cost one listing of its folder per interval, its newest manifest read once."""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import requests

from wam.platform import checkpoints
from wam.platform.errors import CheckpointError
from wam.platform.storage import filesystem
from wam.platform.tracking import JOB_TAG
from wam.platform.trainjob import CheckpointStatus

log = logging.getLogger("wam.operator")
_TIMEOUT = 10
_PAGE = 1000  # runs per runs/search page (MLflow's own limit is 50000)


@dataclass(frozen=True)
class TrainingReport:
    run_id: str
    experiment_id: str
    step: int | None
    loss: float | None
    tokens_per_second: float | None
    updated: str | None


def _iso(millis: int) -> str:
    return datetime.datetime.fromtimestamp(millis / 1000, datetime.UTC).isoformat(timespec="seconds")


def _api(tracking_uri: str) -> str | None:
    if not tracking_uri.startswith(("http://", "https://")):
        return None  # a file or database store is not reachable from the operator
    return tracking_uri.rstrip("/") + "/api/2.0/mlflow"


def experiment_id(api: str, experiment: str) -> str | None:
    """The experiment's id; None when it does not exist (yet)."""
    got = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": experiment}, timeout=_TIMEOUT)
    if got.status_code == 404 or "RESOURCE_DOES_NOT_EXIST" in got.text:
        return None
    got.raise_for_status()
    return got.json()["experiment"]["experiment_id"]


def search_runs(api: str, experiment_id: str, where: str) -> list[dict]:
    """Every run of the experiment matching the filter `where`, page by page."""
    found, token = [], None
    while True:
        page = requests.post(f"{api}/runs/search", timeout=_TIMEOUT, json={
            "experiment_ids": [experiment_id], "filter": where, "max_results": _PAGE,
            **({"page_token": token} if token else {})})
        page.raise_for_status()
        body = page.json()
        found += body.get("runs") or []
        token = body.get("next_page_token")
        if not token:
            return found


def report_of(run: dict) -> TrainingReport:
    """A run's newest step, loss and throughput, as runs/search returns it."""
    metrics = {m["key"]: m for m in (run.get("data") or {}).get("metrics") or []}
    loss, tps = metrics.get("loss"), metrics.get("tokens_per_s")
    newest = max((m.get("timestamp", 0) for m in metrics.values()), default=0)
    return TrainingReport(
        run_id=run["info"]["run_id"], experiment_id=run["info"]["experiment_id"],
        step=max((int(m.get("step", 0)) for m in metrics.values()), default=None),
        loss=float(loss["value"]) if loss else None, tokens_per_second=float(tps["value"]) if tps else None,
        updated=_iso(newest) if newest else None)


def _job_of(run: dict) -> str | None:
    return next((t["value"] for t in (run.get("data") or {}).get("tags") or [] if t["key"] == JOB_TAG), None)


def run_url(external_url: str | None, report: TrainingReport) -> str | None:
    if not external_url:
        return None
    return f"{external_url.rstrip('/')}/#/experiments/{report.experiment_id}/runs/{report.run_id}"


def complete_steps(folder: str) -> list[int]:
    """Steps under `folder` whose manifest exists, newest first, from one recursive listing (an object store
    lists 1000 keys a request) instead of one request per step folder and file."""
    fs, root = filesystem(folder)
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # other processes write here (s3fs keeps listings until invalidated)
    try:
        files = fs.find(root)
    except FileNotFoundError:
        return []
    steps = set()
    for path in files:
        step_folder, _, name = path[len(root) + 1:].partition("/")
        if name == checkpoints.MANIFEST_NAME and (step := checkpoints.step_of(step_folder)) is not None:
            steps.add(step)
    return sorted(steps, reverse=True)


class ProgressReader:
    """Progress of every running job, read in batches: per experiment, one runs/search of its RUNNING runs at
    most every `interval` seconds answers all the jobs that ask within it (the experiment's id is looked up
    once per operator process); `final` reads one job's run by itself, for the numbers it finished with.
    Checkpoints: one listing of the job's folder, and a manifest only when a newer checkpoint appears.
    Thread-safe: reconciliations call it concurrently; one refreshes an experiment while the others wait."""

    def __init__(self, tracking_uri: str | None, interval: float):
        self.api, self.interval = _api(tracking_uri) if tracking_uri else None, interval
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._experiments: dict[str, str] = {}  # name -> id
        self._runs: dict[str, tuple[float, dict[str, TrainingReport]]] = {}  # experiment -> (read at, job -> report)
        self._checkpoints: dict[str, CheckpointStatus] = {}  # folder -> its newest complete checkpoint

    def report(self, experiment: str, run_name: str, final: bool = False) -> TrainingReport | None:
        """The job's run (found by its `wam.job` tag) and its newest metrics; None when there is none yet. An
        unreachable server raises (once per experiment and interval; the others asking get None)."""
        if self.api is None:
            return None
        with self._locks[experiment]:
            if final:
                exp = self._experiment(experiment)
                runs = search_runs(self.api, exp, f"tags.`{JOB_TAG}` = '{run_name}'") if exp else []
                return report_of(runs[0]) if runs else None
            read_at, reports = self._runs.get(experiment, (float("-inf"), {}))
            if time.monotonic() - read_at >= self.interval:
                self._runs[experiment] = (time.monotonic(), {})
                exp = self._experiment(experiment)
                runs = search_runs(self.api, exp, "attributes.status = 'RUNNING'") if exp else []
                reports = {job: report_of(run) for run in runs if (job := _job_of(run))}
                self._runs[experiment] = (time.monotonic(), reports)
        return reports.get(run_name)

    def _experiment(self, name: str) -> str | None:
        if name not in self._experiments and (found := experiment_id(self.api, name)) is not None:
            self._experiments[name] = found
        return self._experiments.get(name)

    def checkpoint(self, folder: str) -> CheckpointStatus | None:
        """The newest complete checkpoint (its manifest exists and reads) under the job's checkpoint folder; a
        corrupt manifest is passed over, with a warning."""
        for step in complete_steps(folder):
            uri = checkpoints.step_dir(folder, step)
            known = self._checkpoints.get(folder)
            if known is not None and known.uri == uri:
                return known
            try:
                written = checkpoints.read_manifest(uri)
            except CheckpointError as err:
                log.warning("passing over %s: %s", uri, err)
                continue
            created = datetime.datetime.fromtimestamp(written.created, datetime.UTC).isoformat(timespec="seconds") \
                if written else None
            self._checkpoints[folder] = CheckpointStatus(step=step, uri=uri, time=created)
            return self._checkpoints[folder]
        return None

    def forget(self, folder: str) -> None:
        self._checkpoints.pop(folder, None)
