"""The procedural training data and the resumable, rank-sharded loader."""

import pytest
import torch

from wam.platform.config import DataSection
from wam.trainer.data.latent_episodes import REAL_ACTION_DIMS, SPEED, SyntheticLatents
from wam.trainer.data.loader import EpochOrder, WamDataLoader


def test_samples_are_deterministic_and_actions_cause_the_motion(tiny):
    world = SyntheticLatents(tiny.arch, tiny.sample, episodes=8, seed=3)
    a, b = world[5], world[5]
    assert torch.equal(a.video, b.video) and torch.equal(a.actions, b.actions) and a.prompt == b.prompt
    # the state (object position) at each chunk start follows from the commanded velocities
    for c in range(1, tiny.sample.num_chunks):
        moved = (a.state[c, :2] - a.state[c - 1, :2]) / 2  # state is position mapped to [-1, 1]
        commanded = SPEED * a.actions[c - 1, :, :2].sum(0)
        torch.testing.assert_close(moved, commanded, atol=1e-5, rtol=1e-4)
    direction = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}[a.prompt.split()[-1]]
    assert torch.sign(a.actions[:, :, direction[0]].mean()) == direction[1]
    assert a.image.shape == (tiny.arch.image_tokens, tiny.arch.image_dim)
    assert a.i2v_cond.shape == (4 + tiny.arch.latent_channels, *a.video.shape[1:])


def test_video_only_episodes_have_no_action_dims(tiny):
    world = SyntheticLatents(tiny.arch, tiny.sample, episodes=64, seed=0, video_only_fraction=0.5)
    flags = [world[i].has_actions for i in range(64)]
    assert 10 < sum(flags) < 54
    silent = world[flags.index(False)]
    assert not silent.action_dims.any() and silent.actions.abs().sum() == 0
    assert world[flags.index(True)].action_dims.sum() == REAL_ACTION_DIMS


def test_epoch_order_shards_ranks_disjointly_and_covers_each_epoch():
    orders = [EpochOrder(10, seed=1, rank=r, world=2) for r in range(2)]
    epoch0 = [orders[r].take(5) for r in range(2)]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(10))
    assert orders[0].take(5) != epoch0[0]  # the next epoch is a new permutation


def test_loader_state_resumes_the_exact_sample_order(tiny):
    def loader(rank):
        config = WamDataLoader.Config(arch=tiny.arch, sample=tiny.sample, data=DataSection(episodes=16), seed=2)
        return WamDataLoader(config, dp_world_size=2, dp_rank=rank, local_batch_size=3)

    first = loader(1)
    it = iter(first)
    for _ in range(4):  # into the second epoch
        next(it)
    state = first.state_dict()
    expected = [next(it)[0]["video"] for _ in range(3)]
    resumed = loader(1)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    got = [next(it2)[0]["video"] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    with pytest.raises(ValueError, match="same number of processes"):
        other = WamDataLoader(WamDataLoader.Config(arch=tiny.arch, sample=tiny.sample, data=DataSection(episodes=16), seed=2),
                              dp_world_size=4, dp_rank=1, local_batch_size=3)
        other.load_state_dict(state)
