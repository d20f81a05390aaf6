"""`wam eval`: open-loop evaluation of a checkpoint on held-out episodes, as DreamZero evaluates offline.

Each held-out window (wam.trainer.eval.heldout) is rolled out from its real context (.rollouts); actions are
compared with the recorded ones in robot units (q01/q99 normalisation inverted, relative dims made absolute
from the chunk's starting state), per action dim (MSE, L1), and predicted video latents with the real ones
(MSE); the report, a plot and MLflow metrics follow (.reporting). Windows, noise and results are a function
of the seed: the same checkpoint, data and seed give the same report.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from wam.platform.accounting import count_params
from wam.platform.config import SamplerSection, WamConfig, negative_prompt, resolve_preset
from wam.platform.errors import ConfigError
from wam.trainer.checkpoint_reader import open_for_eval
from wam.trainer.eval.heldout import held_out
from wam.trainer.eval.reporting import log_to_training_run, mlflow_metrics, plot_actions, training_run
from wam.trainer.eval.rollouts import config_sampler, roll_out_variants, summarize
from wam.trainer.model.encoders import FrozenEncoders

SWEEP_SOLVERS = ("euler", "unipc")
SWEEP_STEPS = (4, 8, 16)
SMALL_PRESET_PARAMS = 100_000_000  # `--device auto` evaluates presets below this on the CPU, others on a GPU


def choose_device(requested: str, cfg: WamConfig) -> torch.device:
    """auto: small presets on the CPU (fast enough, reproducible anywhere), the others on a GPU."""
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: this machine has no CUDA GPU")
        return device
    params = count_params(resolve_preset(cfg).arch).total
    if params < SMALL_PRESET_PARAMS:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"preset {cfg.model.preset} ({params / 1e9:.1f} B parameters) is evaluated on a GPU and "
                          "this machine has none; pass --device cpu to run it on the CPU anyway (slow)")
    return torch.device("cuda")


@dataclass
class EvalReport:
    report: dict  # what report.json holds
    out: Path  # the folder holding report.json and actions.png
    metrics: dict[str, float]  # flat, as logged to MLflow
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    tracking_note: str = ""  # why nothing was logged, when nothing was


def sweep_samplers(cfg: WamConfig, guidance: float) -> dict[str, SamplerSection]:
    """The sampler comparison of `wam eval --sweep`: Euler and UniPC at 4, 8 and 16 steps, each without and
    with guidance at `guidance` (when the model has an unconditional prompt), without and with the static DiT
    step cache on half the steps (DreamZero's 8 of 16)."""
    if guidance < 1:
        raise ConfigError(f"--sweep-guidance must be >= 1, got {guidance}")
    base = dataclasses.replace(cfg.sampler, guidance=1.0, action_guidance=1.0, dit_cache="none", dit_steps=[])
    scales = (1.0, guidance) if guidance > 1 and negative_prompt(cfg.sampler, cfg.flow) is not None else (1.0,)
    return {f"{solver} {steps} steps, guidance {scale:g}, DiT cache {cache}":
            dataclasses.replace(base, solver=solver, steps=steps, guidance=scale, dit_cache=cache, dit_passes=steps // 2)
            for solver, steps, scale, cache in itertools.product(SWEEP_SOLVERS, SWEEP_STEPS, scales, ("none", "static"))}


def run_eval(checkpoint: str, *, dataset: str | None = None, profile: str | None = None, windows: int = 8,
             steps: int | None = None, seed: int = 0, device: str = "auto", out: Path | None = None,
             plot_episodes: int = 3, tracking_uri: str | None = None, log_mlflow: bool = True,
             run_id: str | None = None, sweep_guidance: float | None = None) -> EvalReport:
    """Evaluate a checkpoint (folder, series or export); write report.json and actions.png; log them and the
    metrics to MLflow (on `run_id`, else the run that trained it, else a new evaluation run). With
    `sweep_guidance`, the report also compares the samplers of `sweep_samplers` on the same windows and noise."""
    if windows < 1:
        raise ConfigError(f"--windows must be >= 1, got {windows}")
    stored = open_for_eval(checkpoint)
    cfg = stored.config
    sweep = {} if sweep_guidance is None else sweep_samplers(cfg, sweep_guidance)
    chosen = choose_device(device, cfg)
    encoders = FrozenEncoders.of_config(cfg, chosen, vision=cfg.data.source == "lerobot")
    heldout = held_out(cfg, dataset, profile, windows, encoders)
    indices = heldout.select(windows)
    started = time.perf_counter()
    model, sampler = stored.load(chosen), config_sampler(cfg, steps)
    variants = roll_out_variants({"model": (model, sampler), **{name: (model, s) for name, s in sweep.items()}}, cfg,
                                 heldout, indices, seed)
    rollouts = variants["model"]
    summary = summarize(rollouts)
    run_dir = training_run(stored)[2]
    out = out or ((run_dir / "eval" if run_dir else Path("eval") / cfg.name) / f"step-{stored.step}")
    report = {
        "checkpoint": stored.uri, "step": stored.step, "preset": cfg.model.preset, "run": cfg.name,
        "data": heldout.description,
        "windows": [{"window": w, "prompt": p} for w, p in zip(rollouts.labels, rollouts.prompts, strict=True)],
        "seed": seed, "denoising_steps": sampler.steps, "sampler": dataclasses.asdict(sampler), "device": str(chosen),
        "units": heldout.units,
        "seconds": round(time.perf_counter() - started, 2),
        **{k: v for k, v in summary.items() if k != "per_dim"},
        "per_dim": [{"dim": name, **d} for name, d in zip(heldout.dim_names, summary["per_dim"], strict=True)],
    }
    if sweep:
        report["sweep"] = [{"solver": s.solver, "steps": s.steps, "guidance": s.guidance, "dit_cache": s.dit_cache,
                            **{k: v for k, v in summarize(variants[name]).items() if k not in ("per_dim", "per_chunk")}}
                           for name, s in sweep.items()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_actions(rollouts, heldout.dim_names, heldout.units, out / "actions.png", plot_episodes)
    metrics = mlflow_metrics(summary, heldout.dim_names)
    result = EvalReport(report, out, metrics)
    result.mlflow_run_id, result.tracking_uri, result.tracking_note = log_to_training_run(
        stored, stored.step, metrics, out, tracking_uri=tracking_uri, enabled=log_mlflow, run_id=run_id)
    return result
