"""LeRobot datasets: round trips of both formats, DreamZero sampling and transforms checked against values
computed here from the raw files, decoder agreement, remote reading, resume, and bad data."""

import json
import re
import shutil

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from wam.platform.config import DataSection, DatasetEntry
from wam.platform.embodiment import ProfileSection
from wam.platform.presets import SampleShape
from wam.trainer.data.decode import make_decoder
from wam.trainer.data.lerobot import DataError, LeRobotDataset
from wam.trainer.data.loader import WamDataLoader
from wam.trainer.data.robot import RobotSource
from wam.trainer.data.stats import compute_stats, stats_paths
from wam.trainer.data.synth_dataset import CAMERAS, SynthOptions, read_frame_index, synthesize

from conftest import wam_cli

SHAPE = SampleShape(num_chunks=2, frames_per_chunk=2, actions_per_chunk=24, latent_height=8, latent_width=8)
STRIDE, HORIZON = 3, 24


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot")
    return {
        "v3.0": str(synthesize(root / "v3", SynthOptions(episodes=7, version="v3.0", codec="h264", episodes_per_file=3))),
        "v2.1": str(synthesize(root / "v21", SynthOptions(episodes=4, version="v2.1", codec="vp9", seed=1))),
    }


def source_for(uri, tiny, **kwargs):
    return RobotSource([DatasetEntry(uri=uri, profile="droid")], {}, tiny.arch, SHAPE, seed=0, **kwargs)


def raw_episode(uri, version, episode):
    """The episode's rows read straight from its parquet file (not through the reader)."""
    if version == "v2.1":
        table = pq.read_table(f"{uri}/data/chunk-000/episode_{episode:06d}.parquet")
    else:
        table = pq.read_table(f"{uri}/data/chunk-000/file-{episode // 3:03d}.parquet")
        table = table.filter(pa.compute.equal(table["episode_index"], episode))
    return {c: np.asarray(table[c].to_pylist()) for c in ("observation.state", "action", "task_index", "timestamp")}


def test_reader_locates_episodes_in_shared_files(datasets):
    v3 = LeRobotDataset(datasets["v3.0"])
    assert v3.version == "v3.0" and len(v3.episodes) == 7 and v3.fps == 15
    for e in v3.episodes:
        assert e.length == 240 and e.first_row == 240 * e.index
        assert e.data_path.endswith(f"file-{e.index // 3:03d}.parquet")
        for camera in CAMERAS:
            assert e.videos[camera].first_frame == 240 * (e.index % 3)  # its place in the shared mp4
    v21 = LeRobotDataset(datasets["v2.1"])
    assert [e.videos[CAMERAS[0]].first_frame for e in v21.episodes] == [0] * 4
    assert v21.tasks == [json.loads(line)["task"] for line in open(f"{datasets['v2.1']}/meta/tasks.jsonl")]


def test_frames_returns_the_index_column_it_also_filters_and_sorts_by(datasets):
    dataset = LeRobotDataset(datasets["v3.0"])
    episode = dataset.episodes[4]  # the second episode of a shared file: the `index` filter selects its rows
    rows = dataset.frames(episode, ("index", "action"))
    np.testing.assert_array_equal(rows["index"], episode.first_row + np.arange(episode.length))
    np.testing.assert_array_equal(rows["action"], raw_episode(datasets["v3.0"], "v3.0", 4)["action"])


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_window_frames_state_actions_and_prompt(datasets, tiny, version):
    uri = datasets[version]
    source = source_for(uri, tiny)
    for window in source.windows[:: max(1, len(source.windows) // 5)]:
        data = source.load(window)
        expected_frames = window.start + STRIDE * np.arange(1 + 8 * SHAPE.num_chunks)
        for camera in CAMERAS:
            assert [read_frame_index(view) for view in data.views[camera]] == expected_frames.tolist()
        raw = raw_episode(uri, version, window.episode)
        starts = window.start + HORIZON * np.arange(SHAPE.num_chunks)
        np.testing.assert_allclose(data.state, raw["observation.state"][starts])
        np.testing.assert_allclose(data.actions, raw["action"][window.start:window.start + HORIZON * SHAPE.num_chunks])
        assert data.task == LeRobotDataset(uri).tasks[raw["task_index"][window.start]]
        # the window never crosses an instruction boundary
        assert len(set(raw["task_index"][window.start:window.start + HORIZON * SHAPE.num_chunks + 1])) == 1


def test_relative_actions_normalisation_and_padding(datasets, tiny):
    uri = datasets["v3.0"]
    source = source_for(uri, tiny)
    index = 3
    window = source.windows[index]
    sample = source[index]
    raw = raw_episode(uri, "v3.0", window.episode)
    stats = json.loads(next(p for p in stats_paths(uri, source.profiles[0]) if p.exists()).read_text())
    actions = raw["action"][window.start:window.start + 2 * HORIZON].astype(np.float64)
    for chunk in range(2):
        rows = slice(chunk * HORIZON, (chunk + 1) * HORIZON)
        actions[rows, :7] -= raw["observation.state"][window.start + chunk * HORIZON, :7]  # joints relative; gripper not
    q01, q99 = np.array(stats["action_q01"]), np.array(stats["action_q99"])
    span = q99 - q01
    expected = np.clip(np.where(span > 0, 2 * (actions - q01) / np.where(span > 0, span, 1) - 1, actions), -1, 1)
    np.testing.assert_allclose(sample.actions.reshape(-1, 32)[:, :8].numpy(), expected, atol=1e-6)
    assert sample.actions[..., 8:].abs().sum() == 0 and sample.action_dims.tolist() == [True] * 8 + [False] * 24
    assert sample.has_actions and sample.prompt.startswith("push the")
    s01, s99 = np.array(stats["state_q01"]), np.array(stats["state_q99"])
    state = raw["observation.state"][window.start + HORIZON * np.arange(2)]
    s_span = s99 - s01
    expected_state = np.clip(np.where(s_span > 0, 2 * (state - s01) / np.where(s_span > 0, s_span, 1) - 1, state), -1, 1)
    np.testing.assert_allclose(sample.state[:, :8].numpy(), expected_state, atol=1e-6)


def test_stats_are_the_quantiles_of_state_and_chunk_relative_actions(datasets):
    uri = datasets["v2.1"]
    dataset = LeRobotDataset(uri)
    from wam.platform.embodiment import BUILTIN_PROFILES

    stats = compute_stats(dataset, BUILTIN_PROFILES["droid"])
    states, relative = [], []
    for e in range(4):
        raw = raw_episode(uri, "v2.1", e)
        states.append(raw["observation.state"])
        bounds = np.flatnonzero(np.diff(raw["task_index"])) + 1
        for begin, end in zip([0, *bounds], [*bounds, len(raw["task_index"])], strict=True):
            for start in range(begin, end, HORIZON):
                chunk = raw["action"][start:min(start + HORIZON, end)].astype(np.float64)
                chunk[:, :7] -= raw["observation.state"][start, :7]
                relative.append(chunk)
    np.testing.assert_allclose(stats.state_q01, np.quantile(np.concatenate(states), 0.01, axis=0))
    np.testing.assert_allclose(stats.action_q99, np.quantile(np.concatenate(relative), 0.99, axis=0))


def test_views_tile_into_the_droid_layout(datasets, tiny):
    source = source_for(datasets["v3.0"], tiny)
    data = source.load(source.windows[0])
    pixels = source.transform(0, source.windows[0], data).pixels.permute(1, 0, 2, 3)  # (T, 3, 64, 64)

    def resized(camera, size):
        view = torch.from_numpy(data.views[camera]).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        return F.interpolate(view, size=size, mode="bilinear", antialias=True)

    assert torch.equal(pixels[:, :, :32, :], resized(CAMERAS[0], (32, 64)))  # wrist, stretched across the top
    assert torch.equal(pixels[:, :, 32:, :32], resized(CAMERAS[1], (32, 32)))
    assert torch.equal(pixels[:, :, 32:, 32:], resized(CAMERAS[2], (32, 32)))


def test_decoders_agree_on_the_same_frames(datasets):
    """Pixel agreement, as mean absolute difference in 0..255 units: PyAV and torchcodec run the same FFmpeg
    conversion; DALI's CPU decoder (VP9 only) upsamples chroma differently."""
    for uri, names in ((datasets["v2.1"], ["torchcodec", "pyav", "dali"]), (datasets["v3.0"], ["torchcodec", "pyav"])):
        episode = LeRobotDataset(uri).episodes[1]
        segment = episode.videos[CAMERAS[1]]
        indices = (segment.first_frame + 30 + STRIDE * np.arange(17)).tolist()
        frames = {n: make_decoder(n).decode(segment.path, indices).astype(np.float64) for n in names}
        assert [read_frame_index(f.astype(np.uint8)) for f in frames["torchcodec"]] == [30 + 3 * j for j in range(17)]
        assert np.abs(frames["pyav"] - frames["torchcodec"]).mean() < 0.5
        if "dali" in frames:
            assert np.abs(frames["dali"] - frames["torchcodec"]).mean() < 5


def test_reads_a_dataset_from_s3_only_through_fsspec(datasets, tiny, s3, monkeypatch, tmp_path):
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WAM_CACHE_DIR", str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3")
    fs.put(datasets["v2.1"], "wam-checkpoints/datasets/v21", recursive=True)
    remote = source_for("s3://wam-checkpoints/datasets/v21", tiny, decoder="torchcodec")
    local = source_for(datasets["v2.1"], tiny, decoder="torchcodec")
    a, b = remote[2], local[2]
    assert torch.equal(a.pixels, b.pixels) and torch.allclose(a.actions, b.actions) and a.prompt == b.prompt


def _loader(uri, tiny, rank, **config):
    data = DataSection(source="lerobot", datasets=[DatasetEntry(uri=uri, profile="droid")], workers=1, **config)
    cfg = WamDataLoader.Config(arch=tiny.arch, sample=SHAPE, data=data, seed=3)
    return WamDataLoader(cfg, dp_world_size=2, dp_rank=rank, local_batch_size=2)


def test_loader_resumes_the_exact_sample_order_on_two_ranks(datasets, tiny):
    for rank in (0, 1):
        first = _loader(datasets["v3.0"], tiny, rank)
        batches = iter(first)
        for _ in range(4):
            next(batches)
        state = first.state_dict()
        expected = [next(batches)[0] for _ in range(3)]
        resumed = _loader(datasets["v3.0"], tiny, rank)
        resumed.load_state_dict(state)
        got = [batch for batch, _ in (b for _, b in zip(range(3), iter(resumed), strict=False))]
        for want, have in zip(expected, got, strict=True):
            assert torch.equal(want["pixels"], have["pixels"]) and want["prompt"] == have["prompt"]


# -- bad data -------------------------------------------------------------------------------------------


@pytest.fixture
def broken(datasets, tmp_path):
    """A v2.1 copy whose episodes can be damaged one at a time."""
    root = tmp_path / "broken"
    shutil.copytree(datasets["v2.1"], root)
    return root


def _rewrite_episode(root, episode, change):
    path = root / f"data/chunk-000/episode_{episode:06d}.parquet"
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def _episode_windows(source, episode):
    return [i for i, w in enumerate(source.windows) if w.episode == episode]


def test_truncated_video_is_named(broken, tiny):
    video = broken / f"videos/chunk-000/{CAMERAS[0]}/episode_000001.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    source = source_for(str(broken), tiny)
    with pytest.raises(DataError, match=rf"episode 1: cannot decode .*{video.name}"):
        source[_episode_windows(source, 1)[-1]]


def test_missing_video_file_is_named(broken, tiny):
    video = broken / f"videos/chunk-000/{CAMERAS[2]}/episode_000002.mp4"
    video.unlink()
    source = source_for(str(broken), tiny)
    with pytest.raises(DataError, match=rf"episode 2: .*{video.name}"):
        source[_episode_windows(source, 2)[0]]


def test_episode_shorter_than_one_chunk_is_named(broken, tiny):
    _rewrite_episode(broken, 0, lambda t: t.slice(0, 20))
    meta = broken / "meta/episodes.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[0]["length"] = 20
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"episode 0 has 20 frames, fewer than one chunk .*episode_000000.parquet"):
        source_for(str(broken), tiny)


def _damaged(column: str, value: float, row: int | slice = 100):
    """A table rewrite putting `value` (NaN, inf) into `column` at `row`."""
    def rewrite(table):
        values = np.asarray(table[column].to_pylist())
        values[row] = value
        return table.set_column(table.schema.get_field_index(column), column,
                                pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1).astype(np.float32)), 8))
    return rewrite


_nan_actions = _damaged("action", np.nan)


def test_non_finite_state_stops_statistics_or_is_skipped(broken, tiny):
    """An episode with inf in its state: `wam data stats` names it (exit 2); with bad_samples skip the statistics
    leave it out, and the loader skips its samples."""
    _rewrite_episode(broken, 2, _damaged("observation.state", np.inf, slice(None)))
    refused = wam_cli("data", "stats", broken)
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert re.search(r"episode 2: inf in \['observation.state'\] at frame\(s\) \[0, 1, 2, 3, 4\] \.\.\. .*"
                     r"episode_000002.parquet", said), said
    skipped = wam_cli("data", "stats", broken, "--bad-samples", "skip")
    assert skipped.returncode == 0 and "saved to" in skipped.stdout, skipped.stderr
    loader = _loader(str(broken), tiny, 0, bad_samples="skip")
    skipped = 0
    for _, (batch, _) in zip(range(40), iter(loader), strict=False):  # until one of episode 2's windows came up
        assert torch.isfinite(batch["state"]).all()
        skipped += batch["skipped"]
        if skipped:
            break
    assert skipped > 0


def test_nan_actions_are_named(broken, tiny):
    source = source_for(str(broken), tiny)  # statistics before the damage
    _rewrite_episode(broken, 3, _nan_actions)
    from wam.trainer.data.lerobot import _read_episode

    _read_episode.cache_clear()
    window = next(i for i in _episode_windows(source, 3)
                  if source.windows[i].start <= 100 < source.windows[i].start + 2 * HORIZON)
    with pytest.raises(DataError, match=r"episode 3 .*episode_000003.parquet.*NaN in the actions"):
        source[window]


def test_mismatched_timestamps_are_named(broken, tiny):
    _rewrite_episode(broken, 1, lambda t: t.set_column(t.schema.get_field_index("timestamp"), "timestamp",
                                                       pa.compute.multiply(t["timestamp"], 2)))
    source = source_for(str(broken), tiny)
    with pytest.raises(DataError, match=r"episode 1 .*episode_000001.parquet.*timestamp .* is not frame_index/fps"):
        source[_episode_windows(source, 1)[0]]


def test_skip_policy_drops_and_counts_bad_samples(broken, tiny):
    video = broken / f"videos/chunk-000/{CAMERAS[0]}/episode_000001.mp4"
    video.write_bytes(video.read_bytes()[:200])
    loader = _loader(str(broken), tiny, 0, bad_samples="skip")
    skipped, seen = 0, 0
    for batch, labels in (b for _, b in zip(range(8), iter(loader), strict=False)):
        skipped += batch["skipped"]
        seen += len(batch["prompt"])
        assert labels.shape[0] == len(batch["prompt"]) == batch["pixels"].shape[0]
    assert skipped > 0 and seen > 0


def test_validate_reports_every_problem_with_episode_and_file(broken):
    video = broken / f"videos/chunk-000/{CAMERAS[0]}/episode_000001.mp4"
    video.write_bytes(video.read_bytes()[:300])
    _rewrite_episode(broken, 3, _nan_actions)
    result = wam_cli("data", "validate", broken, "--json")
    assert result.returncode == 1
    problems = json.loads(result.stdout)
    assert {(p["episode"], p["file"].rsplit("/", 1)[-1]) for p in problems} >= {
        (1, "episode_000001.mp4"), (3, "episode_000003.parquet")}
    assert any("NaN in action" in p["problem"] for p in problems)


# -- mixtures and tools ---------------------------------------------------------------------------------


def test_weighted_mixture_with_a_video_only_dataset_and_a_declared_profile(datasets, tiny, tmp_path):
    video_only = synthesize(tmp_path / "video", SynthOptions(episodes=3, version="v2.1", video_only=True, seed=4))
    profile = ProfileSection(cameras=list(CAMERAS), layout="droid", state_keys=["observation.state"], action_keys=[],
                             action_horizon=24, video_stride=3)
    entries = [DatasetEntry(uri=datasets["v3.0"], profile="droid", weight=3.0),
               DatasetEntry(uri=str(video_only), profile="human_video", weight=1.0)]
    source = RobotSource(entries, {"human_video": profile}, tiny.arch, SHAPE, seed=0, epoch_samples=400)
    share = np.mean([w.dataset == 1 for w in source.windows])
    assert 0.2 < share < 0.3
    sample = source[[w.dataset for w in source.windows].index(1)]
    assert not sample.has_actions and not sample.action_dims.any() and sample.actions.abs().sum() == 0


def test_data_cli_synth_inspect_and_stats(tmp_path):
    out = tmp_path / "cli"
    assert wam_cli("data", "synth", out, "--episodes", "2", "--version", "v2.1").returncode == 0
    info = json.loads(wam_cli("data", "inspect", out, "--json").stdout)
    assert (info["format"], info["episodes"], info["fps"]) == ("v2.1", 2, 15.0)
    assert set(info["cameras"]) == set(CAMERAS) and info["cameras"][CAMERAS[0]]["codec"] == "h264"
    stats = wam_cli("data", "stats", out, "--profile", "droid")
    assert stats.returncode == 0 and list((out / "meta").glob("wam_stats.droid-*.json"))
    again = wam_cli("data", "synth", out)
    assert again.returncode == 2 and "not empty" in " ".join(again.stderr.split())
    missing = wam_cli("data", "inspect", tmp_path / "nothing")
    assert missing.returncode == 2 and "not a LeRobot dataset" in " ".join(missing.stderr.split())
