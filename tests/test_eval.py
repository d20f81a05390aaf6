"""A policy trained on robot video, evaluated: the robot-data path end to end (a synthesized LeRobot dataset,
torchrun, 2 CPU processes), its chunk-by-chunk rollout (`wam demo`) and open-loop evaluation (`wam eval`) on
held-out episodes of another synthesized dataset, with a real MLflow store."""

from __future__ import annotations

import json
import re
import shutil
import statistics

import pytest
from mlflow.tracking import MlflowClient

from wam.platform.checkpoints import latest_complete
from wam.platform.errors import ConfigError

from conftest import progress, wam_cli, write_checkpoint, write_run_config

pytestmark = pytest.mark.slow

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the 2 cores are shared with other tests' training processes


@pytest.fixture
def one_thread():
    """In-process evaluations on one thread too (restored after the test)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROBOT_STEPS = 60


@pytest.fixture(scope="module")
def robot_run(tmp_path_factory):
    """The robot-data path end to end, trained once for this module: the tiny preset, 60 steps on a
    synthesized LeRobot dataset of 9 episodes (one episode's video damaged: skipped by the loader), decoded
    by a worker and encoded by the frozen VAE/CLIP on the fly, 2 processes (FSDP2). Also: 3 held-out
    episodes of another dataset, and an untrained checkpoint of the same config (the initial weights, DCP
    folder + manifest)."""
    from wam.platform.config import load_config, resolve_preset
    from wam.trainer.data.synth_dataset import CAMERAS, SynthOptions, synthesize
    from wam.trainer.model import build_model, model_config

    directory = tmp_path_factory.mktemp("robot")
    train = synthesize(directory / "train", SynthOptions(episodes=9, episodes_per_file=1, seed=0))
    damaged = train / f"videos/{CAMERAS[1]}/chunk-000/file-008.mp4"
    damaged.write_bytes(damaged.read_bytes()[:500])
    heldout = synthesize(directory / "heldout", SynthOptions(episodes=3, seed=1))
    config = write_run_config(
        directory, "robot", sample={"num_chunks": 2, "actions_per_chunk": 24},
        data={"source": "lerobot", "datasets": [{"uri": str(train), "profile": "droid"}], "bad_samples": "skip",
              "workers": 1},
        training={"steps": ROBOT_STEPS, "batch_size": 2, "warmup_steps": 5}, checkpoint={"interval": 30, "keep": 0})
    result = wam_cli("train", config)
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = load_config(config)
    preset = resolve_preset(cfg)
    untrained = write_checkpoint(directory / "untrained", cfg,
                                 build_model(model_config(preset.arch, preset.sample), seed=cfg.seed), step=0)
    return cfg, str(heldout), untrained


def test_training_on_robot_video_skips_bad_samples_and_the_policy_rolls_out(robot_run, tmp_path):
    """The run skipped the damaged episode and learned; its exported policy rolls out chunk by chunk on
    held-out episodes (`wam demo`) better than an untrained one."""
    cfg, heldout, _ = robot_run
    records = progress(cfg.run_dir)
    assert sum(r["data/skipped"] for r in records.values()) > 0
    assert "bad samples skipped" in (cfg.run_dir / "train.log").read_text()
    losses = [records[s]["video_loss"] for s in sorted(records)]
    assert statistics.mean(losses[-10:]) < 0.5 * statistics.mean(losses[:10])
    out = tmp_path / "robot.safetensors"
    assert wam_cli("export", cfg.checkpoint_uri, out, "--dtype", "float32").returncode == 0
    demo = wam_cli("demo", "--weights", out, "--dataset", heldout, "--episodes", "3")
    assert demo.returncode == 0, demo.stderr
    trained, untrained = map(float, re.search(r"video error over held-out windows: trained ([0-9.]+) vs "
                                              r"untrained ([0-9.]+)", " ".join(demo.stdout.split())).groups())
    assert trained < 0.5 * untrained, (trained, untrained)
    assert float(re.search(r"max abs difference ([0-9.e+-]+)", demo.stdout).group(1)) < 1e-4


def test_a_trained_checkpoint_beats_an_untrained_one_on_held_out_actions(robot_run, tmp_path, one_thread):
    cfg, heldout, untrained = robot_run
    done = wam_cli("eval", cfg.checkpoint_uri, "--data", heldout, "--windows", "8", env=ONE_THREAD)  # the newest
    assert done.returncode == 0, done.stdout + done.stderr
    text = " ".join(done.stdout.split())
    assert "action dim" in text and "gripper" in text and "mean" in text  # the table, with the dataset's names
    report_path = cfg.run_dir / "eval" / f"step-{ROBOT_STEPS}" / "report.json"
    report = json.loads(report_path.read_text())
    assert report["step"] == ROBOT_STEPS and report["units"] == "robot" and len(report["windows"]) == 8
    assert [d["dim"] for d in report["per_dim"]] == [f"joint_{i}" for i in range(7)] + ["gripper"]
    png = (report_path.parent / "actions.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    from wam.trainer.eval.evaluate import run_eval

    untrained_eval = run_eval(untrained, dataset=heldout, windows=8, out=tmp_path / "untrained", log_mlflow=False)
    assert untrained_eval.mlflow_run_id is None and "logging off" in untrained_eval.tracking_note
    before = untrained_eval.report
    assert before["windows"] == report["windows"] and before["step"] == 0
    # measured: L1 0.083 vs 0.098 and MSE 0.048 vs 0.070 (robot units), mostly from the gripper
    assert report["action_l1"] < 0.92 * before["action_l1"], (report["action_l1"], before["action_l1"])
    assert report["action_mse"] < 0.85 * before["action_mse"], (report["action_mse"], before["action_mse"])
    assert report["video_mse"] < 0.5 * before["video_mse"]

    info = json.loads((cfg.run_dir / "run.json").read_text())  # logged on the run that trained the checkpoint
    client = MlflowClient(info["tracking_uri"])
    history = client.get_metric_history(info["mlflow_run_id"], "eval/action_l1")
    assert [(m.step, m.value) for m in history] == [(ROBOT_STEPS, pytest.approx(report["action_l1"]))]
    assert "eval/action_l1/gripper" in client.get_run(info["mlflow_run_id"]).data.metrics
    assert {a.path for a in client.list_artifacts(info["mlflow_run_id"], f"eval/step-{ROBOT_STEPS}")} == {
        f"eval/step-{ROBOT_STEPS}/report.json", f"eval/step-{ROBOT_STEPS}/actions.png"}


def test_the_same_seed_gives_the_same_report_from_a_folder_or_an_export(robot_run, tmp_path, one_thread):
    from wam.trainer.eval.evaluate import run_eval
    from wam.trainer.export import export_checkpoint

    cfg, heldout, _ = robot_run
    step, folder = latest_complete(cfg.checkpoint_uri)
    exported = tmp_path / "model.safetensors"
    export_checkpoint(folder, exported, "float32")

    def numbers(report: dict) -> dict:
        timing = ("seconds", "denoise_ms", "checkpoint", "device")
        return {k: v for k, v in report.items() if k not in timing and k != "per_chunk"} | {
            "per_chunk": [{k: v for k, v in c.items() if k != "denoise_ms"} for c in report["per_chunk"]]}

    runs = [run_eval(uri, dataset=heldout, windows=1, seed=seed, out=tmp_path / f"{i}", log_mlflow=False).report
            for i, (uri, seed) in enumerate([(folder, 0), (str(exported), 0), (folder, 1)])]
    assert runs[0]["step"] == runs[1]["step"] == step
    assert numbers(runs[0]) == numbers(runs[1])
    assert numbers(runs[0]) != numbers(runs[2]), "another seed draws other noise"


def test_the_sampler_sweep_runs_on_the_same_windows_and_noise(robot_run, tmp_path):
    cfg, heldout, _ = robot_run
    done = wam_cli("eval", cfg.checkpoint_uri, "--data", heldout, "--windows", "1", "--sweep", "--no-mlflow", "--out",
                   tmp_path, env=ONE_THREAD)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "samplers on the same windows and noise" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {(r["solver"], r["steps"], r["dit_cache"]): r for r in report["sweep"]}
    assert len(report["sweep"]) == len(rows) == 12 and {r["guidance"] for r in report["sweep"]} == {1.0}  # no dropout
    assert all(r["dit_steps"] == steps // (2 if cache == "static" else 1) for (_, steps, cache), r in rows.items())
    same = rows[("euler", cfg.sampler.steps, "none")]  # the config's own sampler: the main result, number for number
    assert (same["action_l1"], same["video_mse"]) == (report["action_l1"], report["video_mse"])


def test_incomplete_and_mismatched_checkpoints_are_refused(robot_run, tmp_path, one_thread):
    cfg, heldout, _ = robot_run
    _, folder = latest_complete(cfg.checkpoint_uri)
    unfinished = tmp_path / "step-7"
    shutil.copytree(folder, unfinished)
    (unfinished / "manifest.json").unlink()
    done = wam_cli("eval", unfinished, "--data", heldout)
    assert done.returncode == 2 and "is not a complete checkpoint (no manifest.json)" in " ".join(done.stderr.split())

    from wam.platform.errors import CheckpointError
    from wam.trainer.eval.evaluate import run_eval

    corrupted = tmp_path / "step-9"
    shutil.copytree(folder, corrupted)
    (corrupted / ".metadata").write_bytes(b"x" * (corrupted / ".metadata").stat().st_size)
    with pytest.raises(CheckpointError, match="does not match its manifest: .metadata: sha256"):
        run_eval(str(corrupted), dataset=heldout, log_mlflow=False)
    with pytest.raises(ConfigError, match="name the held-out LeRobot dataset with --data"):
        run_eval(str(folder), log_mlflow=False)
