"""`wam regress SUITE`: a regression training compared with a stored baseline (CI, the nightly CronJob).

The suite (wam.platform.suite) names a TrainJob spec: `--local` renders the same training config with the
operator's own rules and trains here, otherwise the TrainJob is submitted and waited for. The final
checkpoint is evaluated (`wam eval`, its metrics logged on the training run), each metric of the run is
compared with the baseline run's (the run of the model version holding the alias of the suite's registered
model: every complete checkpoint becomes a version of it), and a report (markdown + JSON) is written and
logged on the run. A metric that moved past its tolerance in the worse direction, or is missing, fails
the suite (exit code 1). `--update-baseline` moves the alias to the new run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from wam.app import local_training
from wam.app.console import console
from wam.platform.apischema import to_api
from wam.platform.checkpoints import latest_complete, series_of
from wam.platform.config import WamConfig, validate
from wam.platform.errors import ConfigError, UserError
from wam.platform.suite import (
    Comparison,
    Report,
    Suite,
    compare,
    load_suite,
    reduce_history,
    run_name,
    with_overrides,
)
from wam.platform.tracking import find_job_run
from wam.platform.trainjob import API_VERSION, KIND, Platform, TrainJob, TrainJobSpec, training_config

SUITE_LABEL = "wam.dev/regress-suite"
SUITE_TAG, PASSED_TAG = "wam.regress.suite", "wam.regress.passed"
LOCAL_NAMESPACE = "local"  # the namespace part of a --local run's name (<namespace>.<job>, as in a cluster)


# -- MLflow -----------------------------------------------------------------------------------------------


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def find_baseline(uri: str, suite: Suite) -> str | None:
    """The run id of the model version holding the suite's baseline alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(uri).get_model_version_by_alias(suite.registered_model, suite.baseline.alias).run_id
    except MlflowException as err:
        if err.get_http_status_code() in (400, 404):  # no such registered model, or no such alias
            return None
        raise


def require_baseline(uri: str, suite: Suite) -> str:
    found = find_baseline(uri, suite)
    if found is None:
        raise UserError(f"suite {suite.name} has no baseline: registered model {suite.registered_model!r} has no alias "
                        f"{suite.baseline.alias!r} in the MLflow store at {uri}. Create one with "
                        f"`wam regress SUITE --update-baseline` (it trains, evaluates and promotes that run)")
    return found


def histories(uri: str, run_id: str, keys: set[str]) -> dict[str, list[float]]:
    """Each metric's values by step (for a step logged twice, the later value)."""
    client = _client(uri)
    out = {}
    for key in keys:
        by_step = {}
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
            by_step[m.step] = m.value
        out[key] = [by_step[s] for s in sorted(by_step)]
    return out


def compare_runs(uri: str, suite: Suite, run_id: str, baseline_run_id: str | None) -> list[Comparison]:
    keys = {m.key for m in suite.metrics}
    ours = histories(uri, run_id, keys)
    theirs = histories(uri, baseline_run_id, keys) if baseline_run_id else None
    comparisons = []
    for rule in suite.metrics:
        value = reduce_history(ours[rule.key], rule)
        if theirs is None:
            comparisons.append(Comparison(rule.name, rule.key, None, value, rule.better, "", "", False, "no baseline yet"))
        else:
            comparisons.append(compare(rule, reduce_history(theirs[rule.key], rule), value))
    return comparisons


def promote(uri: str, suite: Suite, run_id: str) -> str:
    """Point the baseline alias at the newest model version (checkpoint) the run registered."""
    client = _client(uri)
    versions = client.search_model_versions(f"name='{suite.registered_model}' and run_id='{run_id}'")
    if not versions:
        raise UserError(f"run {run_id} registered no version of {suite.registered_model!r} (no complete checkpoint "
                        "was recorded), so it cannot become the baseline")
    newest = max(versions, key=lambda v: int(v.version))
    client.set_registered_model_alias(suite.registered_model, suite.baseline.alias, newest.version)
    return newest.version


def log_report(report: Report, folder: Path) -> None:
    client = _client(report.tracking_uri)
    client.log_artifacts(report.run_id, str(folder), f"regress/{report.suite}")
    client.set_tag(report.run_id, SUITE_TAG, report.suite)
    client.set_tag(report.run_id, PASSED_TAG, str(report.passed).lower())


def local_config(spec: TrainJobSpec, name: str, out: Path, tracking_uri: str,
                 processes: int | None = None) -> WamConfig:
    """The training config the cluster would give the job (the operator's rendering: as many processes as the
    spec's GPUs), run here with run folders and checkpoints under `out`; `processes` overrides the count."""
    job = TrainJob(name=name, namespace=LOCAL_NAMESPACE, spec=spec)
    cfg = training_config(job, Platform(checkpoint_base=str(out.resolve() / "checkpoints"), tracking_uri=tracking_uri))
    cfg.output_dir = str(out.resolve() / "runs")
    if processes:
        cfg.training.processes = processes
        validate(cfg)
    return cfg

# -- running a suite --------------------------------------------------------------------------------------


@dataclass
class Trained:
    job: str  # the job's run name (<namespace>.<name>), its wam.job tag in MLflow
    run_id: str
    checkpoint: str  # the newest complete checkpoint


def resolve_tracking_uri(option: str | None, out: Path, local: bool) -> str:
    uri = option or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if not local:
        raise ConfigError("a cluster run is compared in the platform's MLflow server: set MLFLOW_TRACKING_URI or "
                          "pass --tracking-uri")
    return f"sqlite:///{out.resolve() / 'mlflow.db'}"  # one store for every local run of the suites under `out`


def train_local(cfg: WamConfig) -> Trained:
    local_training.run(cfg)
    info = local_training.run_info(cfg)
    latest = latest_complete(cfg.checkpoint_uri)
    if not info.get("mlflow_run_id") or latest is None:
        raise UserError(f"training {cfg.name} left no MLflow run or no complete checkpoint (see {cfg.run_dir / 'train.log'})")
    return Trained(cfg.name, info["mlflow_run_id"], latest[1])


class TrainingFailed(Exception):
    """The regression training itself failed: a regression, reported as such."""


def train_in_cluster(suite: Suite, spec: TrainJobSpec, name: str, namespace: str, tracking_uri: str, poll: float,
                     timeout: float) -> Trained:
    """Submit the TrainJob, wait for it to finish (its status carries the MLflow run and the checkpoint)."""
    from wam.operators import kube, trainjobs  # needs the operator extra's kubernetes client

    kube.load_client_config()
    api = kube.Kube()
    obj = {"apiVersion": API_VERSION, "kind": KIND,
           "metadata": {"name": name, "namespace": namespace, "labels": {SUITE_LABEL: suite.name}},
           "spec": to_api(spec)}
    job = trainjobs.validate(obj)  # refused here, as the operator would, before the cluster sees it
    trainjobs.submit(api, obj)
    console.print(f"submitted TrainJob {namespace}/{name}")
    deadline, shown = time.monotonic() + timeout, None
    while True:
        status = (trainjobs.get(api, namespace, name).get("status") or {})
        phase = status.get("phase", "Pending")
        seen = (phase, (status.get("progress") or {}).get("summary"))
        if seen != shown:
            console.print(f"TrainJob {namespace}/{name}: {phase}" + (f", step {seen[1]}" if seen[1] else ""))
            shown = seen
        if phase == "Succeeded":
            break
        if phase == "Failed":
            failure = status.get("lastFailure") or {}
            raise TrainingFailed(f"TrainJob {namespace}/{name} failed: {failure.get('reason', '?')}: "
                                 f"{failure.get('message', 'see `wam status`')}")
        if time.monotonic() > deadline:
            raise TrainingFailed(f"TrainJob {namespace}/{name} did not finish within {timeout:.0f} s (phase {phase})")
        time.sleep(poll)
    checkpoint = (status.get("checkpoint") or {}).get("uri")
    if not checkpoint:
        raise TrainingFailed(f"TrainJob {namespace}/{name} succeeded without a complete checkpoint in its status")
    newest = latest_complete(series_of(checkpoint))  # the status may trail the final save
    run_id = (status.get("mlflow") or {}).get("runId") or find_job_run(_client(tracking_uri), spec.tracking.experiment,
                                                                       job.run_name)
    if not run_id:
        raise TrainingFailed(f"TrainJob {namespace}/{name} has no MLflow run in {tracking_uri}")
    return Trained(job.run_name, run_id, newest[1] if newest else checkpoint)


def evaluate(suite: Suite, trained: Trained, tracking_uri: str, out: Path) -> None:
    """`wam eval` (and `wam eval --sim`) on the final checkpoint, logged on the training run (needs the trainer
    extra)."""
    e = suite.eval
    results = []
    if e.open_loop:
        from wam.trainer.eval.evaluate import run_eval

        results.append(run_eval(trained.checkpoint, dataset=e.dataset, profile=e.profile, windows=e.windows,
                                steps=e.steps, seed=e.seed, out=out, tracking_uri=tracking_uri,
                                run_id=trained.run_id))
    if e.sim is not None:
        from wam.trainer.sim.closed_loop import SimOptions
        from wam.trainer.sim.evaluation import run_sim_eval

        s = e.sim
        options = SimOptions(tasks=list(s.tasks), episodes=s.episodes, suite=s.suite, seed=s.seed,
                             asynchronous=s.asynchronous, workers=s.workers, max_steps=s.max_steps, height=s.size,
                             width=s.size)
        console.print(f"closed loop in {s.suite}: {', '.join(s.tasks)}, {s.episodes} episodes each")
        results.append(run_sim_eval(trained.checkpoint, options, out=out / "sim", references=s.references,
                                    tracking_uri=tracking_uri, run_id=trained.run_id))
    for result in results:
        if result.mlflow_run_id is None:
            raise UserError(f"the evaluation could not be logged: {result.tracking_note}")


def finish(suite: Suite, trained: Trained, tracking_uri: str, baseline_run_id: str | None, update_baseline: bool,
           out: Path) -> Report:
    """Compare, promote if asked, write and log the report."""
    report = Report(suite.name, trained.job, trained.run_id, tracking_uri, trained.checkpoint, baseline_run_id,
                    compare_runs(tracking_uri, suite, trained.run_id, baseline_run_id))
    if update_baseline:
        report.promoted = promote(tracking_uri, suite, trained.run_id)
    report.folder = str(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    (out / "report.md").write_text(report.markdown())
    log_report(report, out)
    return report


def run_suite(path: Path, overrides: list[str], *, local: bool, update_baseline: bool, out: Path,
              tracking_uri: str | None, namespace: str, processes: int | None, poll: float,
              timeout: float) -> Report:
    """Train (here, or a TrainJob in the cluster), evaluate, compare with the baseline, report. A missing
    baseline is an error before anything trains, unless this run is to become it."""
    suite = load_suite(path)
    spec = with_overrides(suite, overrides)
    uri = resolve_tracking_uri(tracking_uri, out, local)
    baseline = find_baseline(uri, suite) if update_baseline else require_baseline(uri, suite)
    name = run_name(suite)
    if local:
        trained = train_local(local_config(spec, name, out, uri, processes))
    else:
        trained = train_in_cluster(suite, spec, name, namespace, uri, poll, timeout)
    if suite.eval is not None:
        console.print(f"evaluating {trained.checkpoint}")
        evaluate(suite, trained, uri, out / "eval" / name)
    return finish(suite, trained, uri, baseline, update_baseline, out / "reports" / name)
