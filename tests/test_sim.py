"""`wam sim record`: Meta-World's scripted experts recorded as a LeRobot v3.0 dataset through our writer, read
back through our reader; seeded; bad input refused before anything is simulated. `wam eval --sim`: simulated
robots driving `wam serve` through openpi-client, with the reference rows, videos, MLflow, determinism,
asynchronous execution and a server that drops."""

from __future__ import annotations

import dataclasses
import json

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from wam.platform.checkpoints import step_dir
from wam.platform.config import load_config
from wam.platform.embodiment import BUILTIN_PROFILES
from wam.platform.errors import UserError
from wam.trainer.data.decode import make_decoder
from wam.trainer.data.lerobot import LeRobotDataset
from wam.trainer.sim.closed_loop import SimOptions, run_episodes
from wam.trainer.sim.evaluation import run_sim_eval, served, untrained_policy
from wam.trainer.sim.record import RecordOptions, record

from conftest import REPO, wam_cli

SMALL = ["--height", "32", "--width", "32"]


def _success(root) -> list[bool]:
    return pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").column("success").to_pylist()


def _columns(root) -> dict[str, np.ndarray]:
    dataset = LeRobotDataset(str(root))
    rows = [dataset.frames(e, ("observation.state", "action")) for e in dataset.episodes]
    return {k: np.concatenate([r[k] for r in rows]) for k in ("observation.state", "action")}


def test_record_expert_demonstrations_read_back_by_our_reader(tmp_path):
    out = tmp_path / "push"
    result = wam_cli("sim", "record", out, "--tasks", "push-v3", "--episodes", "2", "--seed", "3", *SMALL)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no EGL teardown noise, no library warnings
    assert "push-v3" in result.stdout and "wrote 2 episodes" in result.stdout

    dataset = LeRobotDataset(str(out))
    profile = BUILTIN_PROFILES["metaworld"]
    profile.validate(pixel_frames_per_chunk=8)
    assert dataset.version == "v3.0" and dataset.fps == 80
    assert dataset.info["robot_type"] == "metaworld_sawyer"
    assert sorted(dataset.video_keys) == sorted(profile.cameras)
    assert dataset.tasks == ["push the puck to the goal"]
    assert len(dataset.episodes) == 2 and _success(out) == [True, True]
    decoder = make_decoder("pyav")
    for episode in dataset.episodes:
        assert episode.tasks == ("push the puck to the goal",)
        assert 20 < episode.length < 200  # the expert pushes the puck home in ~60 steps at 80 Hz
        rows = dataset.frames(episode, ("observation.state", "action"))
        assert rows["observation.state"].shape == (episode.length, 39)
        assert rows["action"].shape == (episode.length, 4)
        assert np.abs(rows["action"]).max() <= 1.0
        assert np.array_equal(rows["frame_index"], np.arange(episode.length))
        for camera in profile.cameras:  # one frame per control step, first and last readable
            segment = episode.videos[camera]
            frames = decoder.decode(segment.path, [segment.first_frame, segment.first_frame + episode.length - 1])
            assert frames.shape == (2, 32, 32, 3) and frames.std() > 5  # a rendered scene, not a blank
    first, second = dataset.episodes
    state = dataset.frames(first, ("observation.state",))["observation.state"]
    assert not np.allclose(state[0, 4:7], dataset.frames(second, ("observation.state",))["observation.state"][0, 4:7])

    # the same seed gives the same episodes; another seed, with action noise, others
    again = tmp_path / "again"
    record(again, RecordOptions(tasks=["push-v3"], episodes=2, seed=3, height=32, width=32))
    noisy = tmp_path / "noisy"
    record(noisy, RecordOptions(tasks=["push-v3"], episodes=1, seed=4, action_noise=0.2, height=32, width=32))
    reference, repeated = _columns(out), _columns(again)
    for key in reference:
        assert np.array_equal(reference[key], repeated[key])
    assert not np.allclose(_columns(noisy)["observation.state"][0], reference["observation.state"][0])


def test_unknown_task_or_suite_is_named_before_anything_runs(tmp_path):
    out = tmp_path / "never"
    result = wam_cli("sim", "record", out, "--tasks", "push-v3,fly-v3", "--episodes", "1", *SMALL)
    assert result.returncode == 2
    assert "fly-v3" in result.stderr and "push-v3" in result.stderr  # names it, lists the available ones
    assert "Traceback" not in result.stderr
    result = wam_cli("sim", "record", out, "--suite", "libero", "--tasks", "push-v3")
    assert result.returncode == 2 and "libero" in result.stderr and "metaworld" in result.stderr
    result = wam_cli("sim", "record", out, "--tasks", "push-v3", "--cameras", "corner,eye")
    assert result.returncode == 2 and "eye" in result.stderr and "gripperPOV" in result.stderr
    assert not out.exists()


def test_no_offscreen_rendering_names_mujoco_gl_and_the_package(tmp_path):
    headless = {"MUJOCO_GL": "glfw", "DISPLAY": "", "WAYLAND_DISPLAY": ""}  # a windowed backend, no display
    result = wam_cli("sim", "record", tmp_path / "never", "--tasks", "push-v3", "--episodes", "1", *SMALL, env=headless)
    assert result.returncode == 2
    assert "MUJOCO_GL=glfw" in result.stderr and "libegl-mesa0" in result.stderr
    assert "Traceback" not in result.stderr and "GLFWError" not in result.stderr


# -- closed loop: `wam eval --sim` ------------------------------------------------------------------------

CLOSED_LOOP = ["--tasks", "reach-v3", "--episodes", "2", "--max-steps", "96", "--height", "32", "--width", "32"]


def _outcomes(episodes: list[dict]) -> list[tuple]:
    """What must replay for a seed; progress to float rounding (two server processes may sum in another order)."""
    return [(e["seed"], e["success"], e["steps"], e["error"], pytest.approx(e["progress"], abs=1e-4))
            for e in episodes]


@pytest.fixture(scope="module")
def reach_model(tmp_path_factory):
    """configs/sim-reach.yaml on two recorded reach-v3 demonstrations, at initialisation (step 0): its checkpoint
    and its quantized folder. Training it is the README's documented command, not a test. Two demonstrations span
    few goal positions: the state check is widened so that other positions are not refused as out of range."""
    root = tmp_path_factory.mktemp("closed-loop")
    record(root / "data", RecordOptions(tasks=["reach-v3"], episodes=2, height=32, width=32, after_success=40))
    cfg = load_config(REPO / "configs/sim-reach.yaml", [f"data.datasets=[{{uri: {root / 'data'}, profile: metaworld}}]",
                                                       f"output_dir={root}", "serving.state_margin=50"])
    quantized = untrained_policy(cfg, root / "model")
    return root, step_dir(str(root / "model" / "checkpoints"), 0), quantized


def test_closed_loop_through_the_served_policy_with_references_videos_and_mlflow(reach_model):
    root, checkpoint, quantized = reach_model
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    out = root / "eval"
    result = wam_cli("eval", checkpoint, "--sim", "metaworld", *CLOSED_LOOP, "--workers", "2", "--out", out,
                     "--tracking-uri", tracking, "--json", cwd=root)  # a new store's artifacts go to ./mlruns
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "EGLError" not in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["execution"] == "synchronous" and report["server"]["embodiment"] == "metaworld"
    rows = report["rows"]
    assert set(rows) == {"policy", "expert", "untrained"}
    assert rows["expert"]["overall"]["success_rate"] == 1.0  # the upper bound succeeds on these seeds
    policy = rows["policy"]
    assert policy["overall"]["episodes"] == 2 and policy["tasks"]["reach-v3"]["episodes"] == 2
    assert policy["overall"]["chunk_ms_p50"] > 0 and policy["overall"]["errors"] == 0
    for episode in policy["episodes"]:  # never refused, ran every chunk to the step limit or success
        assert episode["error"] == "" and (episode["success"] or episode["steps"] == 96)
        assert 0.0 <= episode["progress"] <= 1.0
    # the model at step 0 is the untrained reference: the same seeds and noise give the same episodes (to float
    # rounding: two server processes may sum in another order)
    assert _outcomes(policy["episodes"]) == _outcomes(rows["untrained"]["episodes"])

    video = out / report["videos"][0]
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    # 8 frames per executed chunk; the two 32 px cameras, a separator, the predicted canvas scaled to 32 px
    assert len(frames) >= 8 and frames[0].shape == (32, 32 + 32 + 2 + 32, 3)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    run = client.search_runs([client.get_experiment_by_name("wam").experiment_id])[0]
    assert run.data.metrics["sim/metaworld/success_rate"] == policy["overall"]["success_rate"]
    assert run.data.metrics["sim/metaworld/expert/success_rate"] == 1.0
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "sim/step-0")}
    assert "sim/step-0/report.json" in logged and "sim/step-0/videos" in logged

    # the same episodes from a server started apart, one worker; one chunk ahead asynchronously; then the server
    # drops after the first of three episodes: the others fail with the reason and the evaluation goes on
    one = SimOptions(tasks=["reach-v3"], episodes=2, max_steps=96, height=32, width=32, workers=1)
    with served(quantized, root / "server.log") as server:
        assert _outcomes([vars(r) for r in run_episodes(server.uri, one)]) == _outcomes(policy["episodes"])
        ahead = run_episodes(server.uri, dataclasses.replace(one, episodes=1, asynchronous=True))
        assert ahead[0].error == "" and len(ahead[0].chunk_ms) >= 2

        def drop_after_the_first(result):
            if result.episode == 0:
                server.process.kill()

        dropped = run_episodes(server.uri, dataclasses.replace(one, episodes=3, videos=0),
                               progress=drop_after_the_first)
    assert [r.episode for r in dropped] == [0, 1, 2] and dropped[0].error == ""
    for failed in dropped[1:]:
        assert not failed.success and failed.error, failed
    assert "connect" in dropped[2].error.lower() or "refused" in dropped[2].error.lower()


def test_eval_sim_bad_input_is_named_before_anything_starts(reach_model, tmp_path):
    _, checkpoint, _ = reach_model
    result = wam_cli("eval", checkpoint, "--sim", "metaworld", "--tasks", "reach-v3,fly-v3", "--out", tmp_path / "x")
    assert result.returncode == 2 and "fly-v3" in result.stderr and "reach-v3" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="libero.*metaworld"):
        SimOptions(tasks=["reach-v3"], suite="libero").check()
    with pytest.raises(UserError, match="does not exist"):
        run_sim_eval(str(tmp_path / "nothing"), SimOptions(tasks=["reach-v3"]), out=tmp_path / "y")
    with pytest.raises(UserError, match="cannot reach the policy server at ws://127.0.0.1:9"):
        run_sim_eval("ws://127.0.0.1:9", SimOptions(tasks=["reach-v3"]), out=tmp_path / "y")
