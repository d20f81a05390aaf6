"""`wam regress SUITE`: a regression training compared with a stored baseline (CI, the nightly CronJob).

A suite (configs/regress/*.yaml) holds a TrainJob spec (what a cluster runs as is; `--local` renders the
same training config with the operator's own rules and trains here), an evaluation of the final
checkpoint (`wam eval`, its metrics logged on the training run), the metrics to compare with their
tolerances and directions, and where the baseline lives: the run of the model version that holds an
alias of the suite's registered model (every complete checkpoint becomes a version of it). Each metric's
history on the MLflow run is reduced to one number (e.g. the mean of the last 5 losses, the median step
time after warm-up) and compared with the same reduction on the baseline run. A report (markdown + JSON)
is written and logged on the run; a metric that moved past its tolerance in the worse direction, or is
missing, fails the suite (exit code 1). `--update-baseline` moves the alias to the new run.

Torch-free: training runs in its own processes (or pods), and the evaluation is imported only when run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wam.platform.apischema import api_field, from_api, to_api
from wam.platform.config import WamConfig, validate
from wam.platform.errors import ConfigError, UserError
from wam.platform.manifest import latest_complete
from wam.platform.tracking import find_job_run
from wam.platform.trainjob import API_VERSION, KIND, Platform, TrainJob, TrainJobSpec, parse, training_config

REDUCTIONS = ("last", "min", "max", "mean", "median")
SUITE_LABEL = "wam.dev/regress-suite"
SUITE_TAG, PASSED_TAG = "wam.regress.suite", "wam.regress.passed"
LOCAL_NAMESPACE = "local"  # the namespace part of a --local run's name (<namespace>.<job>, as in a cluster)
_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # a DNS label: runs are TrainJobs named <suite>-<time>


# -- the suite --------------------------------------------------------------------------------------------


@dataclass
class MetricRule:
    name: str = api_field("Name in the report.", default="???", max_length=63)
    key: str = api_field("MLflow metric of the training run: loss, step_time_s, tokens_per_s, host/peak_rss_gib "
                         "(memory/max_reserved_gib on known GPUs), eval/action_l1, eval/video_mse, ...", default="???")
    reduce: str = api_field("How the metric's history (by step) becomes one number.", default="last",
                            enum=REDUCTIONS)
    skip: int = api_field("Values dropped from the start of the history first (warm-up steps).", default=0, minimum=0)
    last: int | None = api_field("Then only the last N values are kept.", default=None, minimum=1)
    better: str = api_field("Which direction is an improvement.", default="lower", enum=("lower", "higher"))
    tolerance: float = api_field("How much worse than the baseline the run may be before it is a regression.",
                                 default="???", minimum=0)
    relative: bool = api_field("tolerance as a fraction of the baseline value (1.0: up to 2x for lower-is-better); "
                               "false: in the metric's own units.", default=True)


@dataclass
class EvalSpec:
    dataset: str | None = api_field("Held-out LeRobot dataset (path or URI); models trained on procedural latents "
                                    "are evaluated on held-out procedural episodes without one.", default=None)
    profile: str | None = api_field("Embodiment profile of the dataset (default: the training data's).", default=None)
    windows: int = api_field("Held-out windows.", default=8, minimum=1, maximum=100000)
    steps: int | None = api_field("Denoising steps per chunk (default: the config's sampler).", default=None,
                                  minimum=1)
    seed: int = api_field("Noise seed.", default=0)


@dataclass
class BaselineSpec:
    registered_model: str | None = api_field(
        "MLflow registered model the suite's checkpoints become versions of (default wam-regress-<suite>).",
        default=None, max_length=256)
    alias: str = api_field("Alias of the baseline version.", default="baseline", pattern=r"[A-Za-z_][A-Za-z0-9_-]*",
                           max_length=64)


@dataclass
class Suite:
    name: str = api_field("Suite name; runs are named <name>-<UTC time>.", default="???", pattern=_NAME, max_length=24)
    description: str = api_field("", default="")
    train_job: TrainJobSpec = api_field("The TrainJob spec trained.", default_factory=TrainJobSpec)
    eval: EvalSpec | None = api_field("Evaluate the final checkpoint (`wam eval`); its metrics are eval/*.",
                                      default=None)
    metrics: list[MetricRule] = api_field("What is compared with the baseline.", default_factory=list, max_items=64)
    baseline: BaselineSpec = api_field("Where the baseline lives.", default_factory=BaselineSpec)

    @property
    def registered_model(self) -> str:
        return self.baseline.registered_model or f"wam-regress-{self.name}"


def load_suite(path: Path) -> Suite:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read suite {path}: {err}") from None
    try:
        suite = from_api(Suite, data)
    except ConfigError as err:
        raise ConfigError(f"suite {path}: {err}") from None
    if not suite.metrics:
        raise ConfigError(f"suite {path}: metrics is empty; name what to compare with the baseline")
    names = [m.name for m in suite.metrics]
    if len(set(names)) != len(names):
        raise ConfigError(f"suite {path}: metric names repeat: {names}")
    if suite.eval is None and any(m.key.startswith("eval/") for m in suite.metrics):
        raise ConfigError(f"suite {path}: eval/* metrics need an `eval` section")
    return suite


def with_overrides(suite: Suite, overrides: list[str]) -> TrainJobSpec:
    """The suite's spec with `key=value` training-config overrides, and its checkpoints registered under the
    suite's model (so the baseline alias is found by every run of the suite)."""
    try:
        extra = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(OmegaConf.create(suite.train_job.config), extra,
                                 {"tracking": {"registered_model": suite.registered_model}})
    except OmegaConfBaseException as err:
        raise ConfigError(f"overrides {overrides}: {str(err).splitlines()[0]}") from None
    return dataclasses.replace(suite.train_job, config=OmegaConf.to_container(merged))


def run_name(suite: Suite, now: datetime | None = None) -> str:
    return f"{suite.name}-{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}"


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


# -- comparing --------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    name: str
    key: str
    baseline: float | None
    value: float | None
    better: str
    change: str  # how far it moved, readable ("+12.5%", "+0.03")
    allowed: str  # the tolerance, readable
    regressed: bool
    note: str  # the verdict in words


def reduce_history(values: list[float], rule: MetricRule) -> float | None:
    values = values[rule.skip:]
    if rule.last:
        values = values[-rule.last:]
    if not values:
        return None
    return {"last": lambda v: v[-1], "min": min, "max": max, "mean": statistics.fmean,
            "median": statistics.median}[rule.reduce](values)


def compare(rule: MetricRule, baseline: float | None, value: float | None) -> Comparison:
    sign = 1.0 if rule.better == "lower" else -1.0
    allowed = f"{'+' if sign > 0 else '-'}{rule.tolerance:.0%}" if rule.relative \
        else f"{'+' if sign > 0 else '-'}{rule.tolerance:g}"
    result = Comparison(rule.name, rule.key, baseline, value, rule.better, "", allowed, True, "")
    if value is None:
        result.note = f"{rule.key} is missing on this run"
    elif baseline is None:
        result.note = f"{rule.key} is missing on the baseline run (re-baseline with --update-baseline)"
    elif not math.isfinite(value):
        result.note = f"{rule.key} is {value} on this run"
    else:
        if rule.relative and baseline != 0:
            moved = (value - baseline) / abs(baseline)
            result.change = f"{moved:+.1%}" if abs(moved) < 10 else f"{value / baseline:.3g}x"
        else:
            result.change = f"{value - baseline:+.4g}"
        worse = sign * (value - baseline)  # > 0: moved in the worse direction
        result.regressed = worse > rule.tolerance * (abs(baseline) if rule.relative else 1.0)
        result.note = f"{baseline:.4g} -> {value:.4g} ({result.change}; allowed {allowed}, {rule.better} is better)"
    return result


@dataclass
class Report:
    suite: str
    run: str  # the job's name
    run_id: str
    tracking_uri: str
    checkpoint: str
    baseline_run_id: str | None
    comparisons: list[Comparison] = field(default_factory=list)
    promoted: str | None = None  # the model version that became the baseline
    folder: str = ""  # where report.md and report.json are

    @property
    def passed(self) -> bool:
        return not any(c.regressed for c in self.comparisons)

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.regressed]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}

    def markdown(self) -> str:
        verdict = "PASSED" if self.passed else f"FAILED: {len(self.regressions)} regression(s)"
        lines = [f"# Regression suite `{self.suite}`: {verdict}", "",
                 f"- run: `{self.run}` (MLflow run `{self.run_id}` at `{self.tracking_uri}`)",
                 f"- checkpoint: `{self.checkpoint}`",
                 f"- baseline: MLflow run `{self.baseline_run_id}`" if self.baseline_run_id else "- baseline: none yet",
                 *([f"- promoted to baseline: model version {self.promoted}"] if self.promoted else []), "",
                 "| metric | baseline | this run | change | allowed | verdict |", "|---|---|---|---|---|---|"]
        for c in self.comparisons:
            lines.append(f"| {c.name} (`{c.key}`) | {fmt_value(c.baseline)} | {fmt_value(c.value)} | {c.change} | {c.allowed} | "
                         f"{'**REGRESSION**' if c.regressed else 'ok'} |")
        lines += ["", *(f"- **{c.name}** regressed: {c.note}" for c in self.regressions)]
        return "\n".join(lines).rstrip() + "\n"


def fmt_value(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


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


def train_local(cfg: WamConfig, train: Callable[[WamConfig], None]) -> Trained:
    train(cfg)
    info_path = cfg.run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    latest = latest_complete(cfg.checkpoint_uri)
    if not info.get("mlflow_run_id") or latest is None:
        raise UserError(f"training {cfg.name} left no MLflow run or no complete checkpoint (see {cfg.run_dir / 'train.log'})")
    return Trained(cfg.name, info["mlflow_run_id"], latest[1])


class TrainingFailed(Exception):
    """The regression training itself failed: a regression, reported as such."""


def train_in_cluster(suite: Suite, spec: TrainJobSpec, name: str, namespace: str, tracking_uri: str, poll: float,
                     timeout: float, echo: Callable[[str], None]) -> Trained:
    """Submit the TrainJob, wait for it to finish (its status carries the MLflow run and the checkpoint)."""
    from wam.operators import client, kube  # needs the operator extra's kubernetes client

    kube.load_client_config()
    api = kube.Kube()
    obj = {"apiVersion": API_VERSION, "kind": KIND,
           "metadata": {"name": name, "namespace": namespace, "labels": {SUITE_LABEL: suite.name}},
           "spec": to_api(spec)}
    job = parse(obj)  # refused here, before the cluster sees it
    client.submit(api, obj)
    echo(f"submitted TrainJob {namespace}/{name}")
    deadline, shown = time.monotonic() + timeout, None
    while True:
        status = (client.get(api, namespace, name).get("status") or {})
        phase = status.get("phase", "Pending")
        seen = (phase, (status.get("progress") or {}).get("summary"))
        if seen != shown:
            echo(f"TrainJob {namespace}/{name}: {phase}" + (f", step {seen[1]}" if seen[1] else ""))
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
    newest = latest_complete(checkpoint.rstrip("/").rsplit("/", 1)[0])  # the status may trail the final save
    run_id = (status.get("mlflow") or {}).get("runId") or find_job_run(_client(tracking_uri), spec.tracking.experiment,
                                                                       job.run_name)
    if not run_id:
        raise TrainingFailed(f"TrainJob {namespace}/{name} has no MLflow run in {tracking_uri}")
    return Trained(job.run_name, run_id, newest[1] if newest else checkpoint)


def evaluate(suite: Suite, trained: Trained, tracking_uri: str, out: Path) -> None:
    """`wam eval` on the final checkpoint, logged on the training run (needs the trainer extra)."""
    from wam.trainer.eval import run_eval

    e = suite.eval
    result = run_eval(trained.checkpoint, e.dataset, e.profile, e.windows, e.steps, e.seed, "auto", out,
                      tracking_uri=tracking_uri, run_id=trained.run_id)
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
              tracking_uri: str | None, namespace: str, processes: int | None, poll: float, timeout: float,
              train: Callable[[WamConfig], None], echo: Callable[[str], None]) -> Report:
    """Train (here, or a TrainJob in the cluster), evaluate, compare with the baseline, report. A missing
    baseline is an error before anything trains, unless this run is to become it."""
    suite = load_suite(path)
    spec = with_overrides(suite, overrides)
    uri = resolve_tracking_uri(tracking_uri, out, local)
    baseline = find_baseline(uri, suite) if update_baseline else require_baseline(uri, suite)
    name = run_name(suite)
    if local:
        trained = train_local(local_config(spec, name, out, uri, processes), train)
    else:
        trained = train_in_cluster(suite, spec, name, namespace, uri, poll, timeout, echo)
    if suite.eval is not None:
        echo(f"evaluating {trained.checkpoint}")
        evaluate(suite, trained, uri, out / "eval" / name)
    return finish(suite, trained, uri, baseline, update_baseline, out / "reports" / name)
