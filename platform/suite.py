"""Regression suites (configs/regress/*.yaml), torch-free: what `wam regress` runs and how it judges a run.

A suite holds a TrainJob spec (what a cluster runs as is), an evaluation of the final checkpoint, the
metrics to compare with their tolerances and directions, and where the baseline lives (an alias of the
suite's registered model). Each metric's history on a run is reduced to one number (e.g. the mean of the
last 5 losses, the median step time after warm-up) and compared with the same reduction on the baseline
run. The chart validates its nightly suite with these types; `wam regress` (wam.app.regress) runs them.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wam.platform.apischema import api_field, from_api
from wam.platform.errors import ConfigError
from wam.platform.trainjob import DNS_LABEL, TrainJobSpec

REDUCTIONS = ("last", "min", "max", "mean", "median")


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
class SimSpec:
    suite: str = api_field("Simulation suite.", default="metaworld", enum=("metaworld",))
    tasks: list[str] = api_field("Tasks, e.g. reach-v3.", default_factory=list, max_items=50)
    episodes: int = api_field("Seeded episodes per task.", default=10, minimum=1, maximum=10000)
    seed: int = api_field("Episode seed: the same seed replays the same positions.", default=0)
    max_steps: int | None = api_field("Control steps per episode (default: the task's limit, 500).", default=None,
                                      minimum=1)
    workers: int = api_field("Environment processes, one server session each.", default=2, minimum=1, maximum=64)
    asynchronous: bool = api_field("Compute chunk k+1 while chunk k executes.", default=False)
    size: int = api_field("Rendered view height and width (as the demonstrations were recorded).", default=128,
                          minimum=16, maximum=1024)
    references: bool = api_field("Also run the scripted experts and the untrained policy (sim/<suite>/expert/..., "
                                 "sim/<suite>/untrained/...).", default=False)


@dataclass
class EvalSpec:
    open_loop: bool = api_field("Evaluate open loop on held-out episodes (`wam eval`; metrics eval/*).", default=True)
    sim: SimSpec | None = api_field("Also evaluate closed loop in simulation (`wam eval --sim`, the checkpoint "
                                    "quantized and served); metrics sim/<suite>/success_rate, .../progress, "
                                    ".../<task>/success_rate, ...", default=None)
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
    name: str = api_field("Suite name; runs are named <name>-<UTC time>.", default="???", pattern=DNS_LABEL, max_length=24)
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
    if (suite.eval is None or not suite.eval.open_loop) and any(m.key.startswith("eval/") for m in suite.metrics):
        raise ConfigError(f"suite {path}: eval/* metrics need an `eval` section with openLoop: true")
    if suite.eval is not None and suite.eval.sim is not None and not suite.eval.sim.tasks:
        raise ConfigError(f"suite {path}: eval.sim.tasks is empty; name the tasks to evaluate, e.g. [reach-v3]")
    if (suite.eval is None or suite.eval.sim is None) and any(m.key.startswith("sim/") for m in suite.metrics):
        raise ConfigError(f"suite {path}: sim/* metrics need an `eval.sim` section (suite, tasks, episodes)")
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
