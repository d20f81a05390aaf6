"""The World Action Model: Wan key/shape compatibility, KV-cache inference, learning, and input errors."""

import dataclasses

import pytest
import torch
from torchtitan.models.common.linear import Linear

from wam.platform.accounting import count_params
from wam.platform.config import FlowSection
from wam.platform.presets import PRESETS, get_preset
from wam.trainer.flow import LossWeighting, StepRandomness, flow_loss, noise_batch
from wam.trainer.model import build_model, model_config

from conftest import random_inputs, randomized_model, wan_i2v_keys


def wan21_i2v_14b_keys() -> dict[str, tuple[int, ...]]:
    return wan_i2v_keys(dim=5120, ffn=13824, layers=40, in_dim=36, out_dim=16, text_dim=4096, freq_dim=256)


WAM_HEAD_KEYS_14B = {
    "state_encoder.layer1.weight": (1024, 64), "state_encoder.layer1.bias": (1024,),
    "state_encoder.layer2.weight": (5120, 1024), "state_encoder.layer2.bias": (5120,),
    "action_encoder.W1.weight": (5120, 32), "action_encoder.W1.bias": (5120,),
    "action_encoder.W2.weight": (5120, 10240), "action_encoder.W2.bias": (5120,),
    "action_encoder.W3.weight": (5120, 5120), "action_encoder.W3.bias": (5120,),
    "action_decoder.layer1.weight": (1024, 5120), "action_decoder.layer1.bias": (1024,),
    "action_decoder.layer2.weight": (32, 1024), "action_decoder.layer2.bias": (32,),
}


def meta_model(name: str):
    preset = get_preset(name)
    with torch.device("meta"):
        return model_config(preset.arch, preset.sample).build()


def test_14b_preset_has_every_wan_i2v_key_with_its_shape_plus_the_wam_heads():
    model = meta_model("dreamzero-14b")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {**wan21_i2v_14b_keys(), **WAM_HEAD_KEYS_14B}
    assert set(got) == set(expected), (set(got) ^ set(expected))
    mismatched = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not mismatched
    wan = sum(torch.Size(s).numel() for s in wan21_i2v_14b_keys().values())
    heads = sum(torch.Size(s).numel() for s in WAM_HEAD_KEYS_14B.values())
    print(f"\nWan2.1-I2V-14B DiT: {wan:,} parameters; WAM heads: {heads:,}; total {wan + heads:,}")
    assert wan + heads == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    model = meta_model(name)
    n = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {n:,} parameters")
    assert n == count_params(get_preset(name).arch).total
    model.verify_module_protocol()


def test_every_linear_is_declared_in_the_config_tree_for_converters(tiny):
    """A converter that swaps every Linear.Config must reach every linear layer of the built model."""

    class TaggedLinear(Linear):
        @dataclasses.dataclass(kw_only=True, slots=True)
        class Config(Linear.Config):
            pass

    cfg = model_config(tiny.arch, tiny.sample)
    for _, linear, parent, attr in list(cfg.traverse(Linear.Config)):
        fields = {f.name: getattr(linear, f.name) for f in dataclasses.fields(linear) if not f.name.startswith("_")}
        replacement = TaggedLinear.Config(**fields)
        if isinstance(parent, list):
            parent[attr] = replacement
        else:
            setattr(parent, attr, replacement)
    with torch.device("meta"):
        model = cfg.build()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, TaggedLinear) for m in linears)


def _observe_chunk(model, cache, latents, c, f):
    model.observe(cache, latents[:, :, 1 + c * f:1 + (c + 1) * f], chunk=c)


@pytest.mark.parametrize("attention", ["sdpa", "flex", "triton"])
def test_kv_cache_inference_equals_the_full_forward(tiny, attention):
    arch, sample = tiny.arch, tiny.sample
    model = randomized_model(arch, sample, attention=attention)
    reference = randomized_model(arch, sample, attention="sdpa")  # same weights, dense-mask forward
    batch = random_inputs(arch, sample)
    k, f = sample.num_chunks, sample.frames_per_chunk
    with torch.no_grad():
        full = reference(batch)
        cache = model.new_cache(2, k, f, sample.actions_per_chunk, (sample.latent_height, sample.latent_width))
        model.set_conditioning(cache, batch.text, batch.image, batch.i2v_cond)
        model.observe(cache, batch.video[:, :, :1])
        for c in range(k):
            out = model.predict(cache, batch.noisy_video[:, :, c * f:(c + 1) * f], batch.noisy_actions[:, c],
                                batch.state[:, c], batch.video_t[:, c], batch.action_t[:, c])
            torch.testing.assert_close(out.video, full.video[:, :, c * f:(c + 1) * f], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(out.actions, full.actions[:, c], atol=2e-5, rtol=1e-4)
            assert out.actions.abs().mean() > 1e-2  # outputs are not trivially zero
            _observe_chunk(model, cache, batch.video, c, f)


def test_real_frames_replace_the_prediction_in_the_cache(tiny):
    """Writing predicted latents and then the REAL ones for a chunk leaves the cache as if only the real
    frames had been seen; keeping the predicted ones gives a different next chunk."""
    arch, sample = tiny.arch, tiny.sample
    model = randomized_model(arch, sample)
    batch = random_inputs(arch, sample)
    f = sample.frames_per_chunk
    predicted = torch.randn(batch.video.shape, generator=torch.Generator().manual_seed(123))

    def next_chunk_after(write):
        cache = model.new_cache(2, sample.num_chunks, f, sample.actions_per_chunk,
                                (sample.latent_height, sample.latent_width))
        model.set_conditioning(cache, batch.text, batch.image, batch.i2v_cond)
        model.observe(cache, batch.video[:, :, :1])
        write(cache)
        return model.predict(cache, batch.noisy_video[:, :, 2 * f:3 * f], batch.noisy_actions[:, 2],
                             batch.state[:, 2], batch.video_t[:, 2], batch.action_t[:, 2])

    with torch.no_grad():
        full = model(batch)

        def real(cache):
            _observe_chunk(model, cache, batch.video, 0, f)
            _observe_chunk(model, cache, batch.video, 1, f)

        def imagined_then_replaced(cache):
            _observe_chunk(model, cache, predicted, 0, f)
            _observe_chunk(model, cache, predicted, 1, f)
            _observe_chunk(model, cache, batch.video, 0, f)  # drops chunk 1 too: it was computed from chunk 0
            _observe_chunk(model, cache, batch.video, 1, f)

        def imagined(cache):
            _observe_chunk(model, cache, predicted, 0, f)
            _observe_chunk(model, cache, predicted, 1, f)

        for write in (real, imagined_then_replaced):
            out = next_chunk_after(write)
            torch.testing.assert_close(out.actions, full.actions[:, 2], atol=2e-5, rtol=1e-4)
        assert (next_chunk_after(imagined).actions - full.actions[:, 2]).abs().max() > 1e-2


def test_tiny_model_overfits_one_batch(tiny):
    arch, sample = tiny.arch, tiny.sample
    torch.manual_seed(0)
    model = build_model(model_config(arch, sample), seed=0).train()
    data = random_inputs(arch, sample, batch=2)
    noised = noise_batch(data.video, data.noisy_actions.tanh(), data.state, data.text, FlowSection(),
                         StepRandomness(0, 0, 0), data.image, data.i2v_cond)
    weighting = LossWeighting(FlowSection().loss_weighting, 5.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        out = model(noised.inputs)
        loss = flow_loss(out.video, out.actions, noised.target_video, noised.target_actions, noised.sigma_video,
                         noised.sigma_action, torch.ones(2, arch.action_dim), torch.ones(2, dtype=torch.bool),
                         weighting).total()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[0] / losses[-1] > 10:
            break
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.4f} in {len(losses)} steps")
    assert losses[0] / losses[-1] > 10


def test_bf16_weights_keep_an_fp32_residual_and_match_fp32(tiny):
    arch, sample = tiny.arch, tiny.sample
    model = randomized_model(arch, sample)
    batch = random_inputs(arch, sample)
    with torch.no_grad():
        ref = model(batch)
        out = model.to(torch.bfloat16)(batch)
    assert out.video.dtype == torch.float32
    rel = (out.actions - ref.actions).norm() / ref.actions.norm()
    assert rel < 0.05, rel


def test_input_errors_say_what_is_wrong(tiny):
    arch, sample = tiny.arch, tiny.sample
    model = randomized_model(arch, sample)
    batch = random_inputs(arch, sample)
    with pytest.raises(ValueError, match="first frame"):
        model(dataclasses.replace(batch, video=batch.video[:, :, 1:]))
    with pytest.raises(ValueError, match="do not split into"):
        model(dataclasses.replace(batch, noisy_video=batch.noisy_video[:, :, 1:]))
    with pytest.raises(ValueError, match="i2v_cond"):
        model(dataclasses.replace(batch, i2v_cond=None))
    with pytest.raises(ValueError, match="CLIP image tokens"):
        model(dataclasses.replace(batch, image=None))
    with pytest.raises(ValueError, match="patch size"):
        model(dataclasses.replace(batch, video=batch.video[..., 1:], noisy_video=batch.noisy_video[..., 1:]))
    cache = model.new_cache(2, 1, sample.frames_per_chunk, sample.actions_per_chunk, (8, 8))
    with pytest.raises(RuntimeError, match="set_conditioning"):
        model.observe(cache, batch.video[:, :, :1])
    model.set_conditioning(cache, batch.text, batch.image, batch.i2v_cond)
    with pytest.raises(RuntimeError, match="first frame"):
        model.predict(cache, batch.noisy_video[:, :, :2], batch.noisy_actions[:, 0], batch.state[:, 0],
                      batch.video_t[:, 0], batch.action_t[:, 0])
    model.observe(cache, batch.video[:, :, :1])
    with pytest.raises(ValueError, match="latent frame"):
        model.observe(cache, batch.video[:, :, 1:2], chunk=0)
    with pytest.raises(ValueError, match="can observe chunk"):
        model.observe(cache, batch.video[:, :, 1:3], chunk=1)
    model.observe(cache, batch.video[:, :, 1:3], chunk=0)
    with pytest.raises(ValueError, match="reset"):
        model.predict(cache, batch.noisy_video[:, :, :2], batch.noisy_actions[:, 0], batch.state[:, 0],
                      batch.video_t[:, 0], batch.action_t[:, 0])


def test_text_only_backbone_runs_without_image_or_i2v_inputs():
    preset = get_preset("tiny", i2v_concat=False, image_tokens=0)
    model = randomized_model(preset.arch, preset.sample)
    batch = random_inputs(preset.arch, preset.sample)
    assert batch.image is None and batch.i2v_cond is None
    with torch.no_grad():
        out = model(batch)
    assert out.video.shape == batch.noisy_video.shape
    assert not any(k.startswith("img_emb") or "k_img" in k for k in model.state_dict())


def test_initial_weights_depend_on_the_seed_and_names_only(tiny):
    """The same seed gives the same weights whatever else drew random numbers before (and, through the
    per-parameter seeds, however FSDP shards them: tests/test_training.py checks HSDP against FSDP)."""
    first = build_model(model_config(tiny.arch, tiny.sample), seed=7)
    torch.randn(1000)
    second = build_model(model_config(tiny.arch, tiny.sample), seed=7)
    third = build_model(model_config(tiny.arch, tiny.sample), seed=8)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first.blocks[0].ffn[0].weight, third.blocks[0].ffn[0].weight)
    assert not torch.equal(first.blocks[0].ffn[0].weight, first.blocks[1].ffn[0].weight)  # per name, not per shape
