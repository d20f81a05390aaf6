"""How an evaluation is reported: MLflow metric names, the predicted-vs-recorded action plot, and the MLflow run
of the training that wrote the checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from wam.platform.checkpoints import run_dir_of, series_of, step_of
from wam.platform.config import WamConfig
from wam.platform.storage import is_remote
from wam.platform.tracking import log_evaluation
from wam.trainer.checkpoint_reader import StoredModel
from wam.trainer.eval.rollouts import Rollouts


def mlflow_metrics(summary: dict, dim_names: list[str]) -> dict[str, float]:
    """The summary as flat MLflow metric names under eval/ (names as MLflow allows them)."""
    metrics = {f"eval/{k}": v for k, v in summary.items() if isinstance(v, float)}
    for i, d in enumerate(summary["per_dim"]):
        name = "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in dim_names[i])
        metrics[f"eval/action_l1/{name}"], metrics[f"eval/action_mse/{name}"] = d["l1"], d["mse"]
    for c, d in enumerate(summary["per_chunk"]):
        metrics[f"eval/action_l1/chunk_{c}"], metrics[f"eval/video_mse/chunk_{c}"] = d["action_l1"], d["video_mse"]
    return metrics


def plot_actions(r: Rollouts, dim_names: list[str], units: str, out: Path, episodes: int = 3) -> Path:
    """Predicted vs recorded actions per dim for the first evaluated window of up to `episodes` episodes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    first = {}
    for i, episode in enumerate(r.episodes):
        first.setdefault(episode, i)
    shown = list(first.values())[:episodes]
    dims = len(dim_names)
    fig, axes = plt.subplots(len(shown), dims, figsize=(2.4 * dims, 2.0 * len(shown) + 0.6), squeeze=False,
                             sharex=True)
    for row, i in enumerate(shown):
        k, a, _ = r.recorded[i].shape
        steps = np.arange(k * a)
        for d in range(dims):
            ax = axes[row][d]
            ax.plot(steps, r.recorded[i][:, :, d].reshape(-1), color="black", lw=1.2, label="recorded")
            ax.plot(steps, r.predicted[i][:, :, d].reshape(-1), color="tab:orange", lw=1.2, ls="--", label="predicted")
            for c in range(1, k):
                ax.axvline(c * a, color="grey", lw=0.5, ls=":")
            if row == 0:
                ax.set_title(dim_names[d], fontsize=9)
            if d == 0:
                ax.set_ylabel(r.labels[i], fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"predicted vs recorded actions ({units} units); dotted lines: chunk boundaries", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def training_run(stored: StoredModel) -> tuple[str | None, str | None, Path | None]:
    """(tracking URI, MLflow run id, run dir) of the run that wrote the checkpoint: from run.json beside its
    checkpoints (where `wam train` puts them), else the config's tracking URI (the run is then found by its job
    tag), else nothing known."""
    folder = stored.trained_from
    run_dir = run_dir_of(series_of(folder)) if folder and not is_remote(folder) and step_of(folder) is not None \
        else None
    if run_dir is not None and (run_dir / "run.json").is_file():
        info = json.loads((run_dir / "run.json").read_text())
        if Path(info.get("run_dir", "")) == run_dir:
            return info.get("tracking_uri"), info.get("mlflow_run_id"), run_dir
    return stored.config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"), None, None


def log_to_training_run(stored: StoredModel, step: int, metrics: dict[str, float], out: Path, *,
                        tracking_uri: str | None, enabled: bool, run_id: str | None = None,
                        artifact_dir: str = "eval") -> tuple[str | None, str | None, str]:
    """Log an evaluation's metrics and the files of `out` to the run that trained `stored` (or `run_id`, or a new
    evaluation run). Returns (run id, tracking URI, why nothing was logged): the report on disk stands either way."""
    cfg: WamConfig = stored.config
    known_uri, known_run, _ = training_run(stored)
    uri = tracking_uri or known_uri
    if not enabled:
        return None, None, "MLflow logging off (--no-mlflow)"
    if uri is None:
        return None, None, ("no MLflow store known for this checkpoint (no run.json beside its checkpoints, no "
                            "tracking.uri, no MLFLOW_TRACKING_URI): pass --tracking-uri to log the evaluation")
    try:
        logged = log_evaluation(uri, cfg.tracking.experiment, cfg.name, step, metrics, out,
                                run_id or (known_run if uri == known_uri else None), artifact_dir)
    except Exception as err:  # noqa: BLE001 - the caller says what was not logged
        return None, None, f"MLflow at {uri} did not take the evaluation ({type(err).__name__}: {err})"
    return logged, uri, ""
