"""Rectified flow: noise schedules, the joint loss with its masks, weighting, and the sampler."""

import numpy as np
import pytest
import torch

from wam.platform.config import FlowSection
from wam.trainer.flow import (
    LossWeighting,
    StepRandomness,
    add_noise,
    euler_step,
    flow_loss,
    sample_noise_levels,
    sampling_sigmas,
    shift_sigma,
)


def test_shift_maps_the_unit_interval_onto_itself_and_biases_towards_noise():
    t = torch.linspace(0, 1, 11)
    s = shift_sigma(t, 5.0)
    assert s[0] == 0 and s[-1] == 1 and bool((s[1:-1] > t[1:-1]).all())
    assert shift_sigma(torch.tensor(0.5), 5.0).item() == pytest.approx(5 / 6)


def test_flash_schedule_statistics():
    """Video noise levels ~ Beta(7, 1) (mean 0.875), action levels ~ U(0, 1), independent per chunk."""
    rng = StepRandomness(seed=1234, step=0, rank=0).numpy
    video, action = sample_noise_levels(FlowSection(schedule="flash"), batch=2000, chunks=4, rng=rng)
    v, a = video.flatten().numpy(), action.flatten().numpy()
    assert v.mean() == pytest.approx(0.875, abs=0.005)
    assert v.var() == pytest.approx(7 / (64 * 9), rel=0.05)  # Beta(7,1): ab / ((a+b)^2 (a+b+1))
    # Kolmogorov-Smirnov distance of the action levels to U(0, 1): critical value at alpha=0.01 is 1.63/sqrt(n)
    a_sorted = np.sort(a)
    n = len(a_sorted)
    ks = max(np.max(np.arange(1, n + 1) / n - a_sorted), np.max(a_sorted - np.arange(n) / n))
    assert ks < 1.63 / np.sqrt(n)
    assert abs(np.corrcoef(v, a)[0, 1]) < 0.03
    # and the Beta check can fail: a uniform sample would not pass it
    assert abs(a.mean() - 0.875) > 0.3


def test_coupled_schedule_shares_t_per_chunk_and_varies_across_chunks():
    video, action = sample_noise_levels(FlowSection(schedule="coupled"), 8, 4, StepRandomness(0, 0, 0).numpy)
    assert torch.equal(video, action)
    assert video.std(dim=1).min() > 0


def test_step_randomness_is_a_function_of_seed_step_and_rank():
    def draw(seed, step, rank):
        r = StepRandomness(seed, step, rank)
        return r.numpy.uniform(size=3).tolist(), torch.randn(3, generator=r.torch()).tolist()

    assert draw(0, 5, 1) == draw(0, 5, 1)
    assert draw(0, 5, 1) != draw(0, 6, 1) and draw(0, 5, 1) != draw(0, 5, 0) and draw(0, 5, 1) != draw(1, 5, 1)


def test_add_noise_interpolates_between_data_and_noise():
    x, eps = torch.ones(2, 3), torch.zeros(2, 3)
    out = add_noise(x, eps, torch.tensor([0.25, 1.0]))
    assert torch.allclose(out, torch.tensor([[0.75] * 3, [0.0] * 3]))


def test_bell_weighting_has_mean_one_over_training_noise_and_vanishes_at_the_ends():
    w = LossWeighting("bell", 5.0)
    t = (torch.arange(20000) + 0.5) / 20000
    assert w(shift_sigma(t, 5.0)).mean().item() == pytest.approx(1.0, abs=1e-3)
    assert w(torch.tensor([0.0, 1.0])).abs().max() < 1e-6
    assert w(torch.tensor(0.5)) > w(torch.tensor(0.9))
    assert torch.equal(LossWeighting("uniform", 5.0)(torch.rand(5)), torch.ones(5))


def _loss_inputs(b=2, k=2, f=2, a=3, dims=4):
    g = torch.Generator().manual_seed(0)
    pred_v, tgt_v = torch.randn(b, 4, k * f, 2, 2, generator=g), torch.randn(b, 4, k * f, 2, 2, generator=g)
    pred_a, tgt_a = torch.randn(b, k, a, dims, generator=g), torch.randn(b, k, a, dims, generator=g)
    sigma = torch.full((b, k), 0.5)
    return pred_v, pred_a, tgt_v, tgt_a, sigma


def test_loss_ignores_padded_action_dims_and_video_only_episodes():
    pred_v, pred_a, tgt_v, tgt_a, sigma = _loss_inputs()
    uniform = LossWeighting("uniform", 5.0)
    dims = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    has = torch.tensor([True, False])
    base = flow_loss(pred_v, pred_a, tgt_v, tgt_a, sigma, sigma, dims, has, uniform)
    # changing padded dims of sample 0, or anything about sample 1's actions, changes nothing
    pred_a2 = pred_a.clone()
    pred_a2[0, :, :, 2:] += 10
    pred_a2[1] += 10
    other = flow_loss(pred_v, pred_a2, tgt_v, tgt_a, sigma, sigma, dims, has, uniform)
    assert torch.equal(base.action_sum, other.action_sum)
    expected = (pred_a[0, :, :, :2] - tgt_a[0, :, :, :2]).square().mean()
    assert base.action.item() == pytest.approx(expected.item(), rel=1e-6)
    assert base.video.item() == pytest.approx((pred_v - tgt_v).square().mean().item(), rel=1e-6)
    # a batch of video-only episodes trains video only
    none = flow_loss(pred_v, pred_a, tgt_v, tgt_a, sigma, sigma, dims, torch.zeros(2, dtype=torch.bool), uniform)
    assert none.action_count.item() == 0 and none.total().item() == pytest.approx(none.video.item())


def test_loss_weights_each_chunk_by_its_own_timestep():
    pred_v, pred_a, tgt_v, tgt_a, _ = _loss_inputs()
    bell = LossWeighting("bell", 5.0)
    sigma = torch.tensor([[0.5, 1.0], [0.5, 1.0]])  # chunk 1 at pure noise: bell weight 0
    loss = flow_loss(pred_v, pred_a, tgt_v, tgt_a, sigma, sigma, torch.ones(2, 4), torch.ones(2, dtype=torch.bool), bell)
    w = bell(torch.tensor(0.5)).item()
    chunk0 = (pred_v[:, :, :2] - tgt_v[:, :, :2]).square().mean(dim=(1, 3, 4)).sum() * w
    assert loss.video_sum.item() == pytest.approx(chunk0.item(), rel=1e-5)


def test_sampling_sigmas_and_one_step_euler_recovers_data_from_the_true_velocity():
    sigmas = sampling_sigmas(4, shift=5.0)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    assert sampling_sigmas(3, 5.0, final_sigma=0.8)[-1].item() == pytest.approx(0.8)
    x0, eps = torch.randn(5), torch.randn(5)
    one = sampling_sigmas(1, 5.0)
    x = euler_step(eps, eps - x0, one[0].item(), one[1].item())  # exact velocity: one step lands on the data
    torch.testing.assert_close(x, x0)
    with pytest.raises(ValueError):
        sampling_sigmas(0, 5.0)
