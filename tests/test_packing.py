"""Packed windows (data.packing): windows of 1..K chunks in one sequence with no padding token. Each window
keeps its own block-causal mask, RoPE positions and prompt, so it gets exactly what it would get alone."""

import dataclasses

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from wam.app.cli import app
from wam.platform.config import DataSection, DatasetEntry, FlowSection, load_config
from wam.platform.embodiment import ProfileSection, resolve_profile
from wam.platform.errors import ConfigError
from wam.platform.layout import TokenLayout
from wam.platform.presets import SampleShape
from wam.trainer.data.batch import collate_latents, collate_robot
from wam.trainer.data.latent_episodes import SyntheticLatents
from wam.trainer.data.lerobot import LeRobotDataset
from wam.trainer.data.loader import WamDataLoader
from wam.trainer.data.robot import RobotSource
from wam.trainer.data.stats import sampling_summary
from wam.trainer.data.synth_dataset import CAMERAS, SynthOptions, synthesize
from wam.trainer.data.windows import idle_frames, plan_windows
from wam.trainer.flow import LossWeighting, StepRandomness, flow_loss, noise_batch
from wam.trainer.model import WamInputs
from wam.trainer.model.attention import FlexKernel, SDPAKernel
from wam.trainer.model.mask import AttentionMask, RaggedMask

from conftest import randomized_model

WINDOWS = (1, 3, 2)


def test_ragged_mask_is_each_windows_mask_and_nothing_across():
    layouts = [TokenLayout.teacher_forcing(k, 1, 2, 3) for k in WINDOWS]
    ragged = RaggedMask([AttentionMask(layout) for layout in layouts])
    expected = torch.block_diag(*(AttentionMask(layout).dense() for layout in layouts))
    assert torch.equal(ragged.dense(), expected)
    # flex's BlockMask (tiles + mask_mod) and SDPA's dense mask give the same attention, window by window
    total = ragged.queries.length
    q, k, v = (torch.randn(1, total, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    flex = FlexKernel(FlexKernel.Config(block_size=16))(q, k, v, ragged)
    sdpa = SDPAKernel(SDPAKernel.Config())(q, k, v, ragged)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)
    start = 0
    for layout in layouts:
        part = slice(start, start + layout.length)
        alone = SDPAKernel(SDPAKernel.Config())(q[:, part], k[:, part], v[:, part], AttentionMask(layout))
        torch.testing.assert_close(sdpa[:, part], alone, atol=1e-6, rtol=1e-6)
        start += layout.length


def _window(inputs: WamInputs, noised, i: int, f: int):
    """Window i of a packed batch as a batch of its own: (inputs, targets, sigmas)."""
    windows = inputs.windows
    c0, c1 = sum(windows[:i]), sum(windows[:i + 1])
    v0 = i + c0 * f
    frames, chunks = slice(v0, v0 + 1 + windows[i] * f), slice(c0, c1)
    alone = dataclasses.replace(
        inputs, windows=None, video=inputs.video[:, :, frames], noisy_video=inputs.noisy_video[:, :, c0 * f:c1 * f],
        noisy_actions=inputs.noisy_actions[:, chunks], state=inputs.state[:, chunks], video_t=inputs.video_t[:, chunks],
        action_t=inputs.action_t[:, chunks], text=inputs.text[i:i + 1],
        image=inputs.image[i:i + 1] if inputs.image is not None else None,
        i2v_cond=inputs.i2v_cond[:, :, frames] if inputs.i2v_cond is not None else None)
    return (alone, noised.target_video[:, :, c0 * f:c1 * f], noised.target_actions[:, chunks],
            noised.sigma_video[:, chunks], noised.sigma_action[:, chunks], chunks)


def test_packed_batch_gives_each_window_the_loss_it_has_alone(tiny):
    """Three windows of 1, 3 and 2 chunks packed: outputs and losses per window equal running each alone, so
    no window attends across a boundary, each has its own RoPE positions from 0 and its own prompt."""
    model = randomized_model(tiny.arch, tiny.sample)
    world = SyntheticLatents(tiny.arch, tiny.sample, episodes=64, seed=0, video_only_fraction=0.3, min_chunks=1)
    picks = [next(i for i in range(64) if world.chunks(i) == k) for k in WINDOWS]
    batch = collate_latents([world[i] for i in picks], pack=True)
    assert batch["windows"] == tuple(sorted(WINDOWS, reverse=True))  # longest first
    windows, f = batch["windows"], tiny.sample.frames_per_chunk
    text = torch.randn(len(windows), tiny.arch.text_len, tiny.arch.text_dim)
    noised = noise_batch(batch["video"], batch["actions"], batch["state"], text, FlowSection(),
                         StepRandomness(0, 1, 0), batch["image"], batch["i2v_cond"], windows)
    assert torch.equal(noised.inputs.video, batch["video"])  # every window's first frame is clean context
    weighting = LossWeighting("bell", 5.0)
    with torch.no_grad():
        out = model(noised.inputs)
    packed = flow_loss(out.video, out.actions, noised.target_video, noised.target_actions, noised.sigma_video,
                       noised.sigma_action, batch["action_dims"], batch["has_actions"], weighting)
    sums = torch.zeros(4)
    for i in range(len(windows)):
        alone, target_v, target_a, sigma_v, sigma_a, chunks = _window(noised.inputs, noised, i, f)
        with torch.no_grad():
            own = model(alone)
        torch.testing.assert_close(out.video[:, :, chunks.start * f:chunks.stop * f], own.video, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.actions[:, chunks], own.actions, atol=1e-5, rtol=1e-4)
        assert own.video.abs().max() > 0.1  # a real prediction, not the zero-initialised head
        dims, has = batch["action_dims"][:, chunks.start], batch["has_actions"][:, chunks.start]
        loss = flow_loss(own.video, own.actions, target_v, target_a, sigma_v, sigma_a, dims, has, weighting)
        sums += torch.stack([loss.video_sum, loss.video_count, loss.action_sum, loss.action_count])
    got = torch.stack([packed.video_sum, packed.video_count, packed.action_sum, packed.action_count])
    torch.testing.assert_close(got, sums, atol=1e-4, rtol=1e-5)
    assert packed.video_count == sum(windows) * f  # real latent frames only: no padding is counted


def _loader(tiny, rank: int = 0, **data) -> WamDataLoader:
    config = WamDataLoader.Config(arch=tiny.arch, sample=tiny.sample, seed=2,
                                  data=DataSection(episodes=24, packing=True, **data))
    return WamDataLoader(config, dp_world_size=2, dp_rank=rank, local_batch_size=2)


def test_packed_loader_fills_sequences_without_padding_and_resumes_exactly(tiny):
    s = tiny.sample
    tokens = [TokenLayout.teacher_forcing(k, s.frames_per_chunk, s.tokens_per_frame(tiny.arch),
                                          s.actions_per_chunk).length for k in range(s.num_chunks + 1)]
    first = _loader(tiny, rank=1)
    it = iter(first)
    seen = [next(it) for _ in range(3)]  # a packing group holds 16 windows, more than an epoch of this rank
    for batch, labels in seen:
        used = sum(tokens[k] for k in batch["windows"])
        assert labels.shape == (1, used) and used <= 2 * tokens[-1]  # one label per real token, within budget
        assert batch["video"].shape[2] == len(batch["windows"]) * 1 + sum(batch["windows"]) * s.frames_per_chunk
    assert len({k for batch, _ in seen for k in batch["windows"]}) > 1
    assert max(len(batch["windows"]) for batch, _ in seen) > 2  # short windows share a sequence
    state = first.state_dict()
    assert state["rank1"]["packed"] > 0  # resumed inside a packing group
    expected = [next(it)[0] for _ in range(8)]  # and on into the next group
    resumed = _loader(tiny, rank=1)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for want in expected:
        got = next(it2)[0]
        assert got["windows"] == want["windows"] and torch.equal(got["video"], want["video"])


def test_windows_of_one_to_k_chunks_reach_episode_ends_and_skip_idle_stretches():
    tasks = np.zeros(100, dtype=int)  # one instruction segment of 100 frames, chunks of 24
    fixed = plan_windows(tasks, chunks=3, horizon=24, step=12)
    assert all(c == 3 for _, c in fixed) and max(s for s, _ in fixed) + 72 < 100
    packed = plan_windows(tasks, chunks=3, horizon=24, step=12, min_chunks=1)
    assert [c for _, c in packed] == [3, 3, 3, 2, 2, 1, 1]  # starts 0, 12, ..., 72: the episode's end is sampled
    assert all(s + c * 24 < 100 for s, c in packed)
    # a robot still for frames 40..59 (20 frames; stretches of >= 12 count): no window holds one of them
    actions = np.cumsum(np.ones((100, 2)), axis=0)
    actions[40:60] = actions[40]
    idle = idle_frames(actions, threshold=1e-3, min_frames=12)
    assert idle[40:60].all() and idle.sum() == 20
    assert not idle_frames(actions[:50], 1e-3, 12)[:40].any()
    short = actions.copy()
    short[70:75] = short[70]  # 5 still frames: a pause, not an idle stretch
    assert idle_frames(short, 1e-3, 12)[70:75].sum() == 0
    kept = plan_windows(tasks, chunks=3, horizon=24, step=12, min_chunks=1, idle=idle)
    assert kept == [(0, 1), (12, 1), (60, 1), (72, 1)]
    assert all(not idle[s:s + c * 24 + 1].any() for s, c in kept)


@pytest.fixture(scope="module")
def robot_dataset(tmp_path_factory):
    """Scripted pushes: each of an episode's two tasks ends with the arm still for 12 frames (an idle stretch)."""
    return str(synthesize(tmp_path_factory.mktemp("packing") / "v3", SynthOptions(episodes=2, codec="vp9")))


IDLE_PROFILE = ProfileSection(cameras=list(CAMERAS), layout="droid", state_keys=["observation.state"],
                              action_keys=["action"], relative_dims=list(range(7)), idle_threshold=1e-4)


def test_robot_windows_pack_and_leave_idle_stretches_out(robot_dataset, tiny, tmp_path):
    shape = SampleShape(num_chunks=3, frames_per_chunk=2, actions_per_chunk=24, latent_height=8, latent_width=8)
    entry = DatasetEntry(uri=robot_dataset, profile="still")
    source = RobotSource([entry], {"still": IDLE_PROFILE}, tiny.arch, shape, seed=0, min_chunks=1)
    fixed = RobotSource([entry], {"still": dataclasses.replace(IDLE_PROFILE, idle_threshold=None)}, tiny.arch,
                        shape, seed=0)
    assert {w.chunks for w in source.windows} == {1, 2, 3} and {w.chunks for w in fixed.windows} == {3}
    dataset = LeRobotDataset(robot_dataset)
    for window in source.windows:  # no window holds 12 still frames (the 8 while the gripper closes are a pause)
        frames = dataset.frames(dataset.episodes[window.episode], ("action",))
        moved = np.abs(np.diff(frames["action"][window.start:window.start + 24 * window.chunks + 1], axis=0))
        still = np.concatenate([[0], (moved.max(axis=1) <= 1e-4).astype(int), [0]])
        edges = np.flatnonzero(np.diff(still))
        assert (edges[1::2] - edges[::2]).max(initial=0) < 11
    picks = [next(i for i, w in enumerate(source.windows) if w.chunks == k) for k in (1, 3)]
    batch = collate_robot([source[i] for i in picks], pack=True)
    assert batch["windows"] == (3, 1) and batch["pixels"].shape[:3] == (1, 3, 2 + 4 * 2 * 4)
    assert batch["actions"].shape[:3] == (1, 4, 24) and batch["has_actions"].shape == (1, 4)

    summary = sampling_summary(dataset, resolve_profile("still", {"still": IDLE_PROFILE}), 3)
    assert (summary.frames, summary.idle_frames) == (480, 4 * 12)
    assert sum(summary.windows.values()) == len(source.windows) < sum(summary.windows_unfiltered.values())
    assert summary.windows_unfiltered[3] == len(fixed.windows)
    config = tmp_path / "profiles.yaml"
    config.write_text(yaml.safe_dump({"sample": {"num_chunks": 3},
                                      "data": {"profiles": {"still": dataclasses.asdict(IDLE_PROFILE)}}}))
    result = CliRunner().invoke(app, ["data", "stats", robot_dataset, "--profile", "still", "--config", str(config)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "48 of 480 frames (10.0%) left out of sampling" in text
    assert f"3: {summary.windows[3]} (of {summary.windows_unfiltered[3]})" in text


def test_bad_packing_settings_are_named_before_anything_runs():
    with pytest.raises(ConfigError, match=r"data.min_chunks must be 1..4 \(sample.num_chunks\), got 5"):
        load_config(None, ["data.packing=true", "data.min_chunks=5"])
    with pytest.raises(ConfigError, match="idle_threshold must be >= 0"):
        resolve_profile("still", {"still": dataclasses.replace(IDLE_PROFILE, idle_threshold=-1.0)}).validate(8)
