"""What the training job itself reports: rank 0's MLflow run (step, loss, tokens/s) and the checkpoint
manifests it writes last, after every file of a checkpoint. Read over MLflow's REST API and fsspec, so the
operator image needs neither mlflow nor torch, and never execs into pods."""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import requests

from wam.platform import checkpoints
from wam.platform.tracking import JOB_TAG
from wam.platform.trainjob import CheckpointStatus

log = logging.getLogger("wam.operator")
_TIMEOUT = 10


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


def read_mlflow(tracking_uri: str, experiment: str, run_name: str) -> TrainingReport | None:
    """The job's run (found by its `wam.job` tag) and its newest metrics; None when there is none yet."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None  # a file or database store is not reachable from the operator
    api = tracking_uri.rstrip("/") + "/api/2.0/mlflow"
    got = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": experiment}, timeout=_TIMEOUT)
    if got.status_code == 404 or "RESOURCE_DOES_NOT_EXIST" in got.text:
        return None
    got.raise_for_status()
    experiment_id = got.json()["experiment"]["experiment_id"]
    found = requests.post(f"{api}/runs/search", timeout=_TIMEOUT, json={
        "experiment_ids": [experiment_id], "filter": f"tags.`{JOB_TAG}` = '{run_name}'", "max_results": 1})
    found.raise_for_status()
    runs = found.json().get("runs") or []
    if not runs:
        return None
    run = runs[0]
    metrics = {m["key"]: m for m in (run.get("data") or {}).get("metrics") or []}
    loss, tps = metrics.get("loss"), metrics.get("tokens_per_s")
    newest = max((m.get("timestamp", 0) for m in metrics.values()), default=0)
    return TrainingReport(
        run_id=run["info"]["run_id"], experiment_id=experiment_id,
        step=max((int(m.get("step", 0)) for m in metrics.values()), default=None),
        loss=float(loss["value"]) if loss else None, tokens_per_second=float(tps["value"]) if tps else None,
        updated=_iso(newest) if newest else None)


def run_url(external_url: str | None, report: TrainingReport) -> str | None:
    if not external_url:
        return None
    return f"{external_url.rstrip('/')}/#/experiments/{report.experiment_id}/runs/{report.run_id}"


def read_checkpoint(folder: str) -> CheckpointStatus | None:
    """The newest complete checkpoint (its manifest exists) under the job's checkpoint folder."""
    latest = checkpoints.latest_complete(folder)
    if latest is None:
        return None
    step, uri = latest
    written = checkpoints.read_manifest(uri)
    created = datetime.datetime.fromtimestamp(written.created, datetime.UTC).isoformat(timespec="seconds") \
        if written else None
    return CheckpointStatus(step=step, uri=uri, time=created)
