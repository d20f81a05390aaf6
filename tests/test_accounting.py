"""Analytical accounting against measurement: FLOPs vs torch's FLOP counter, memory estimates' behaviour."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from wam.platform.accounting import count_flops, estimate_memory, min_gpus, training_layout
from wam.platform.presets import get_preset
from wam.trainer.model.mask import AttentionMask

from conftest import random_inputs, randomized_model


def test_forward_flops_match_torch_flop_counter(tiny):
    """torch counts every matmul/conv/SDPA (dense attention); our count must agree with that exactly."""
    model = randomized_model(tiny.arch, tiny.sample)
    batch = random_inputs(tiny.arch, tiny.sample, batch=1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the math path is made of counted bmm's
        model(batch)
    flops = count_flops(tiny.arch, tiny.sample)
    assert counter.get_total_flops() == flops.linear + flops.self_attention_dense + flops.cross_attention


def test_mask_aware_attention_flops_use_the_allowed_pairs(tiny):
    layout = training_layout(tiny.arch, tiny.sample)
    flops = count_flops(tiny.arch, tiny.sample)
    allowed = int(AttentionMask(layout).dense().sum())
    assert flops.self_attention == tiny.arch.num_layers * 4 * tiny.arch.dim * allowed
    assert flops.self_attention < flops.self_attention_dense


def test_14b_sample_matches_the_dreamzero_sequence():
    preset = get_preset("dreamzero-14b")
    layout = training_layout(preset.arch, preset.sample)
    # first frame 880 + 3 clean chunks + 4 noisy chunks of 1760 tokens + 96 actions + 4 states
    assert layout.length == 880 + 3 * 1760 + 4 * 1760 + 96 + 4
    flops = count_flops(preset.arch, preset.sample)
    assert 0.3 < flops.self_attention / flops.self_attention_dense < 0.4


def test_model_reports_training_flops_per_token_to_torchtitan(tiny):
    from wam.trainer.model import model_config

    cfg = model_config(tiny.arch, tiny.sample)
    with torch.device("meta"):
        model = cfg.build()
    nparams, per_token = cfg.get_nparams_and_flops(model, seq_len=0)
    flops = count_flops(tiny.arch, tiny.sample)
    assert nparams == sum(p.numel() for p in model.parameters())
    assert per_token == flops.training // flops.tokens


def test_memory_estimate_behaves():
    preset = get_preset("dreamzero-14b")
    arch, sample = preset.arch, preset.sample
    e8, e16 = estimate_memory(arch, sample, 8), estimate_memory(arch, sample, 16)
    assert e16.sharded_states == pytest.approx(e8.sharded_states / 2)
    assert estimate_memory(arch, sample, 8, activation_checkpointing=False).activations > 5 * e8.activations
    assert estimate_memory(arch, sample, 8, cached_text=True).frozen_encoders < e8.frozen_encoders
    fewest = min_gpus(arch, sample, 80)
    assert fewest is not None and estimate_memory(arch, sample, fewest).total <= 0.9 * 80 * 2**30
    assert estimate_memory(arch, sample, fewest - 1).total > 0.9 * 80 * 2**30
    assert min_gpus(arch, sample, 4) is None  # the frozen encoders alone exceed 4 GiB
    tiny = get_preset("tiny")
    assert min_gpus(tiny.arch, tiny.sample, 1) == 1


def test_serving_flops_match_torch_flop_counter_at_every_chunk(tiny):
    """predict and observe over a growing KV cache: what the serving roofline counts is what the model computes."""
    from wam.platform.accounting import observation_flops, prediction_flops

    a, s = tiny.arch, tiny.sample
    model, x, f = randomized_model(a, s), random_inputs(a, s, batch=1), s.frames_per_chunk
    cache = model.new_cache(1, s.num_chunks, f, s.actions_per_chunk, (s.latent_height, s.latent_width))
    model.set_conditioning(cache, x.text, x.image, x.i2v_cond)
    model.observe(cache, x.video[:, :, :1])

    def counted(fn) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            fn()
        return counter.get_total_flops()

    t = torch.full((1,), 500.0)
    for c in range(s.num_chunks):
        predicted = counted(lambda c=c: model.predict(cache, x.noisy_video[:, :, c * f:(c + 1) * f],
                                                      x.noisy_actions[:, c], x.state[:, c], t, t))
        observed = counted(lambda c=c: model.observe(cache, x.video[:, :, 1 + c * f:1 + (c + 1) * f], c))
        for measured, flops in ((predicted, prediction_flops(a, s, c)), (observed, observation_flops(a, s, c))):
            assert measured == flops.linear + flops.self_attention_dense + flops.cross_attention
