"""`wam sim record`: Meta-World's scripted experts recorded as a LeRobot v3.0 dataset through our writer, read
back through our reader; seeded; bad input refused before anything is simulated."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from wam.platform.embodiment import BUILTIN_PROFILES
from wam.trainer.data.decode import make_decoder
from wam.trainer.data.lerobot import LeRobotDataset
from wam.trainer.sim.record import RecordOptions, record

from conftest import wam_cli

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
