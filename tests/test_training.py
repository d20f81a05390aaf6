"""Training through torchtitan's own Trainer: 2 CPU processes, FSDP2 over gloo, real checkpoints and a real
MLflow store. Every run here is a real `wam train` / torchrun launch."""

import json
import os
import signal
import statistics
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from wam.app import local_training
from wam.platform import termination
from wam.platform.checkpoints import latest_complete, list_checkpoints, read_manifest
from wam.platform.config import load_config, to_yaml

from conftest import INTERRUPTED_RUN, free_port, progress, step_losses, wam_cli, write_run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory):
    """80 steps of the tiny preset, as `make demo` trains it."""
    directory = tmp_path_factory.mktemp("learning")
    config = write_run_config(directory, "learn", training={"steps": 80, "batch_size": 4, "warmup_steps": 5},
                              checkpoint={"interval": 20, "keep": 2})
    result = wam_cli("train", config)
    assert result.returncode == 0, result.stdout + result.stderr
    return load_config(config), result


def test_two_process_fsdp_training_learns(learning_run):
    cfg, result = learning_run
    losses = [r["loss"] for _, r in sorted(progress(cfg.run_dir).items())]
    assert len(losses) == 80
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    assert last < 0.75 * first, (first, last)
    assert "newest complete: step 80" in " ".join(result.stdout.split())


def test_checkpoints_are_complete_kept_and_exportable(learning_run, tmp_path):
    cfg, _ = learning_run
    found = list_checkpoints(cfg.checkpoint_uri)
    assert [(step, complete) for step, _, complete in found] == [(60, True), (80, True)]  # keep=2
    manifest = read_manifest(found[-1][1])
    assert manifest.step == 80 and manifest.config["model"]["preset"] == "tiny"
    assert {f.path for f in manifest.files} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert manifest.metrics["loss"] > 0
    out = tmp_path / "model.safetensors"
    exported = wam_cli("export", cfg.checkpoint_uri, out)
    assert exported.returncode == 0, exported.stderr
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["step"] == "80" and "blocks.1.ffn.2.weight" in f.keys()
    refused = wam_cli("demo", "--weights", out)  # the demo rolls out on robot video, not on latents
    assert refused.returncode == 2 and "trained on data.source=synthetic" in " ".join(refused.stderr.split())


def test_mlflow_run_has_params_metrics_and_checkpoint_versions(learning_run):
    cfg, _ = learning_run
    info = json.loads((cfg.run_dir / "run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.preset"] == "tiny" and run.data.params["training.steps"] == "80"
    for metric in ("loss", "video_loss", "action_loss", "grad_norm", "lr", "tokens_per_s"):
        assert metric in run.data.metrics, metric
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 80
    newest = client.get_model_version_by_alias("wam-learn", "newest")
    assert newest.source == latest_complete(cfg.checkpoint_uri)[1] and newest.tags["step"] == "80"
    manifests = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert manifests == ["checkpoints/step-20", "checkpoints/step-40", "checkpoints/step-60", "checkpoints/step-80"]


def _workers(parent: int) -> list[int]:
    """PIDs of the processes torchrun started (children of its agent)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def test_sigkill_mid_run_resumes_from_the_last_complete_checkpoint_with_identical_losses(
        tmp_path, uninterrupted_losses):
    expected = uninterrupted_losses
    cfg = load_config(write_run_config(tmp_path, "killed", **INTERRUPTED_RUN))
    process = local_training.start(cfg, local_training.prepare(cfg).config_path)
    deadline = time.time() + 300

    def completed() -> list[int]:
        """The steps of the complete checkpoints (their manifests are written off the training's path)"""
        return [step for step, _, ok in list_checkpoints(cfg.checkpoint_uri) if ok]
    while ((max(step_losses(cfg.run_dir), default=0) < 10 or not completed()) and time.time() < deadline
           and process.poll() is None):
        time.sleep(0.05)
    workers = _workers(process.pid)
    assert len(workers) == 2 and process.poll() is None, "the run ended before it could be interrupted"
    os.kill(max(workers), signal.SIGKILL)  # one rank dies without warning
    assert process.wait(120) != 0
    before = step_losses(cfg.run_dir)
    assert before and all(before[s] == expected[s] for s in before)
    complete = completed()
    assert complete and max(complete) < 16

    # A newer save that never finished: DCP metadata written, no manifest. It must never be picked.
    debris = Path(cfg.checkpoint_uri) / "step-15"
    debris.mkdir()
    (debris / ".metadata").write_bytes(b"truncated")
    (cfg.run_dir / "progress.jsonl").unlink()

    resumed = wam_cli("train", cfg.run_dir / "config.yaml")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    log = (cfg.run_dir / "train.log").read_text()
    assert f"Loading the checkpoint from {cfg.checkpoint_uri}/step-{max(complete)}" in log
    assert "ignoring" in log and "step-15: no manifest" in log
    after = step_losses(cfg.run_dir)
    assert sorted(after) == list(range(max(complete) + 1, 17))
    assert all(after[s] == expected[s] for s in after), {s: (after[s], expected[s]) for s in after}
    assert not debris.exists()  # older than the newest complete checkpoint: cleaned up


def test_checkpoints_to_s3_resume_and_export(tmp_path, s3, monkeypatch):
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    uri = "s3://wam-checkpoints/jobs/s3run"
    config = write_run_config(tmp_path, "s3run", training={"steps": 4}, checkpoint={"uri": uri, "interval": 2})
    first = wam_cli("train", config, env=s3)
    assert first.returncode == 0, first.stdout + first.stderr
    assert [(s, ok) for s, _, ok in list_checkpoints(uri)] == [(2, True), (4, True)]
    assert read_manifest(f"{uri}/step-4").step == 4
    more = wam_cli("train", config, "training.steps=6", env=s3)
    assert more.returncode == 0, more.stdout + more.stderr
    assert f"Loading the checkpoint from {uri}/step-4" in (load_config(config).run_dir / "train.log").read_text()
    out = tmp_path / "from-s3.safetensors"
    assert wam_cli("export", uri, out, env=s3).returncode == 0 and out.stat().st_size > 0


ONE_PROCESS = {"steps": 3, "processes": 1}  # rank 0 tracks


@pytest.fixture(scope="module")
def untracked_run(tmp_path_factory):
    """3 steps on 1 process whose MLflow server is dead: also the reference of the recomputation and compile runs."""
    directory = tmp_path_factory.mktemp("untracked")
    config = write_run_config(directory, "notracking", training=ONE_PROCESS, checkpoint={"interval": 3},
                              tracking={"uri": f"http://127.0.0.1:{free_port()}"})
    result = wam_cli("train", config)
    assert result.returncode == 0, result.stdout + result.stderr
    return load_config(config)


def test_dead_tracking_server_does_not_stop_training(untracked_run):
    assert latest_complete(untracked_run.checkpoint_uri)[0] == 3
    assert "unavailable" in (untracked_run.run_dir / "train.log").read_text()


def test_bad_input_fails_before_training_with_a_clear_error(tmp_path):
    config = write_run_config(tmp_path, "bad")
    unknown = wam_cli("train", config, "trainig.steps=3")
    assert unknown.returncode == 2 and "trainig" in unknown.stderr
    too_big = wam_cli("train", config, "model.preset=dreamzero-14b")
    assert too_big.returncode == 2 and "GiB per process" in " ".join(too_big.stderr.split())
    unwritable = wam_cli("train", config, "checkpoint.uri=/proc/wam-checkpoints")
    assert unwritable.returncode == 2 and "cannot write to /proc/wam-checkpoints" in " ".join(unwritable.stderr.split())
    assert not (load_config(config).run_dir / "train.log").exists()  # nothing was started


def test_training_process_refuses_an_unwritable_checkpoint_uri_before_step_one(tmp_path):
    """Without the CLI (as in a pod), the training processes check the URI themselves, and tell the
    operator through the termination log that this is a user error (not worth a restart)."""
    cfg = load_config(write_run_config(tmp_path, "pod", training={"processes": 1}, checkpoint={"uri": "/proc/wam-checkpoints"}))
    cfg.run_dir.mkdir(parents=True)
    path = cfg.run_dir / "config.yaml"
    path.write_text(to_yaml(cfg))
    process = local_training.start(cfg, path)  # which points $WAM_TERMINATION_LOG into the run directory
    assert process.wait(300) != 0
    termination_log = cfg.run_dir / local_training.TERMINATION_FILE
    assert "cannot write to /proc/wam-checkpoints" in (cfg.run_dir / "train.log").read_text()
    assert progress(cfg.run_dir) == {}
    reason, message = termination.parse(termination_log.read_text())
    assert reason == termination.INVALID_INPUT and "/proc/wam-checkpoints" in message


def test_hsdp_matches_fsdp_on_the_same_four_processes(tmp_path):
    """dp_replicate=2 x fsdp=2 (HSDP) and fsdp=4 see the same samples and must learn the same thing."""
    losses = {}
    for name, replicate in (("fsdp4", 1), ("hsdp2x2", 2)):
        config = write_run_config(tmp_path, name, training={"steps": 4, "processes": 4, "dp_replicate": replicate,
                                                              "batch_size": 1}, checkpoint={"interval": 4})
        result = wam_cli("train", config)
        assert result.returncode == 0, result.stdout + result.stderr
        losses[name] = step_losses(load_config(config).run_dir)
    assert "dp_replicate=2, dp_shard=2" in (tmp_path / "runs/hsdp2x2/train.log").read_text()
    for step in range(1, 5):
        assert losses["hsdp2x2"][step] == pytest.approx(losses["fsdp4"][step], rel=1e-4)


def test_activation_checkpointing_and_compile_keep_the_numerics(tmp_path, monkeypatch, untracked_run):
    """Recomputation (full, selective) and per-block torch.compile change speed and memory, not results: each
    run's losses are those of the same run without them (whose tracking server was dead: that changes nothing
    either). Full recomputation is checked in the compiled run: it wraps every compiled block."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    plain = step_losses(untracked_run.run_dir)
    assert sorted(plain) == [1, 2, 3]
    for name, training in (("selective-ac", {"activation_checkpointing": "selective"}),
                           ("compiled-full-ac", {"activation_checkpointing": "full", "compile": True})):
        config = write_run_config(tmp_path, name, training={**ONE_PROCESS, **training}, checkpoint={"interval": 3})
        result = wam_cli("train", config)
        assert result.returncode == 0, result.stdout + result.stderr
        assert step_losses(load_config(config).run_dir) == pytest.approx(plain, rel=1e-5), name
    assert any((tmp_path / "inductor").rglob("*.py")), "torch.compile generated no kernels"


def test_the_dreamzero_5b_layout_trains_from_pixels(tmp_path):
    """tiny-5b (dreamzero-5b scaled down: the Wan2.2 VAE's architecture, 16x spatial, its z channels straight
    into the DiT, no I2V channels) trains from a LeRobot dataset's frames through `wam train` / torchtitan."""
    from wam.trainer.checkpoint_reader import open_checkpoint
    from wam.trainer.data.synth_dataset import SynthOptions, synthesize

    dataset = synthesize(tmp_path / "data", SynthOptions(episodes=2, seed=5))
    config = write_run_config(tmp_path, "tiny5b", model={"preset": "tiny-5b"},
                              sample={"num_chunks": 2, "actions_per_chunk": 24},
                              data={"source": "lerobot", "datasets": [{"uri": str(dataset), "profile": "droid"}]},
                              training={"steps": 2, "processes": 1}, checkpoint={"interval": 2, "keep": 0})
    result = wam_cli("train", config)
    assert result.returncode == 0, result.stdout + result.stderr
    records = progress(load_config(config).run_dir)
    assert sorted(records) == [1, 2] and all(r["video_loss"] > 0 for r in records.values())
    stored = open_checkpoint(load_config(config).checkpoint_uri)
    weights = stored.read(["patch_embedding.weight", "head.head.weight"])
    assert weights["patch_embedding.weight"].shape == (64, 8, 1, 2, 2)  # 8 = the tiny Wan2.2 VAE's z channels
    assert weights["head.head.weight"].abs().sum() > 0  # zero at initialisation: the video loss reached it
