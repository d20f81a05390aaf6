"""Frozen encoders: the streaming VAEs (Wan2.1, Wan2.2), CLIP tokens, umT5 loading (HF folder, Wan .pth, fsspec),
I2V channels."""

import json
import re
import threading
from pathlib import Path

import fsspec
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file
from transformers import UMT5EncoderModel

from wam.platform.accounting import FROZEN_ENCODER_PARAMS
from wam.platform.config import EncodersSection
from wam.platform.errors import CheckpointError, ConfigError
from wam.platform.presets import PRESETS, VAE_LAYOUTS, get_preset
from wam.trainer.model.clip import CLIP_CONFIGS, ClipImageEncoder
from wam.trainer.model.encoders import FrozenEncoders
from wam.trainer.model.text_encoder import ByteTokenizer, load_text_encoder, umt5_config
from wam.trainer.model.vae import VAE_CONFIGS, StreamState, VaeConfig, WanVAE, vae_config
from wam.trainer.model.weights import load_frozen
from wam.trainer.serve.encoding import BatchedEncoder

from conftest import waiting_together


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = WanVAE(VaeConfig(dim=8, z_dim=4, latent_mean=(0.5, -0.5, 1.0, 0.0), latent_std=(2.0, 1.0, 0.5, 1.0)))
    return model.eval()


def clip_video(frames=13, size=32, seed=0):
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vae_streaming_equals_one_shot_encoding(vae):
    video = clip_video()
    with torch.no_grad():
        whole = vae.encode(video, frames_per_call=12)
        wan_chunks = vae.encode(video)  # first frame, then 4 frames per call, as Wan does
        state = StreamState()  # a robot observing 1 + 4, then 8 frames
        streamed = torch.cat([vae.encode_stream(video[:, :, :5], state), vae.encode_stream(video[:, :, 5:], state)], 2)
    assert whole.shape == (1, 4, 4, 4, 4)
    torch.testing.assert_close(wan_chunks, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-5)


def test_vae_is_causal_and_first_frame_is_encoded_alone(vae):
    a, b = clip_video(seed=1), clip_video(seed=1)
    b[:, :, 5:] = clip_video(seed=2)[:, :, 5:]  # change only the future
    with torch.no_grad():
        za, zb = vae.encode(a), vae.encode(b)
    assert torch.equal(za[:, :, :2], zb[:, :, :2]) and not torch.allclose(za[:, :, 2:], zb[:, :, 2:])


def test_vae_decode_shape_and_range(vae):
    with torch.no_grad():
        pixels = vae.decode(vae.encode(clip_video()))
    assert pixels.shape == (1, 3, 13, 32, 32) and pixels.abs().max() <= 1


def test_vae_rejects_bad_clips(vae):
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        vae.encode_stream(clip_video(frames=4), StreamState())
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(clip_video(size=30))


@pytest.mark.parametrize("name", ["vae", "vae22"])
def test_work_waiting_together_is_encoded_in_one_call_each_stream_as_if_alone(name, request):
    """The server's BatchedEncoder: sessions' frames that wait for the encoders go through them together. Streams
    after a window's first frame and after a chunk (histories of different lengths) share a call; two new windows
    (first frame and image-to-video channels) share another. Each stream's latents, now and on its next frames,
    equal encoding it alone."""
    vae = request.getfixturevalue(name)
    encoders = FrozenEncoders(vae, None, None, i2v_concat=True)
    videos = [torch.randint(0, 256, (1, 3, 17, 32, 32), generator=torch.Generator().manual_seed(s),
                            dtype=torch.uint8) for s in range(4)]
    first, chunk, later = slice(0, 1), slice(1, 9), slice(9, 17)

    def encoded(state: StreamState, video: torch.Tensor, *parts: slice) -> list[torch.Tensor]:
        with torch.no_grad():
            return [vae.encode_stream(encoders.unit_range(video[:, :, part]), state) for part in parts]

    alone = [encoded(StreamState(), v, first, chunk, later) for v in videos]
    streams = [StreamState() for _ in videos]
    encoded(streams[0], videos[0], first)  # at its first chunk
    encoded(streams[1], videos[1], first, chunk)  # at its second
    encoder = BatchedEncoder(encoders, threading.Lock(), max_batch=8)
    results, calls = waiting_together(encoder, [
        lambda: encoder.encode(videos[0][:, :, chunk], streams[0]),
        lambda: encoder.encode(videos[1][:, :, later], streams[1]),
        *(lambda i=i: encoder.open_window(videos[i][:, :, first], streams[i], 3) for i in (2, 3))])
    assert calls == [2] * 5  # the two chunks; the two windows: first frames, I2V clips (1 + 4 + 4 frames a call)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0], alone[0][1], **close)
    torch.testing.assert_close(results[1], alone[1][2], **close)
    for i in (2, 3):
        torch.testing.assert_close(results[i].latents, alone[i][0], **close)
        torch.testing.assert_close(results[i].i2v, encoders.i2v_condition(encoders.unit_range(videos[i][:, :, 0]), 3),
                                   **close)
        torch.testing.assert_close(encoded(streams[i], videos[i], chunk)[0], alone[i][1], **close)  # continues
    torch.testing.assert_close(encoded(streams[0], videos[0], later)[0], alone[0][2], **close)


def test_work_that_fails_together_fails_every_waiting_session_and_none_hangs(vae):
    encoder = BatchedEncoder(FrozenEncoders(vae, None, None), threading.Lock(), max_batch=8)
    streams = [StreamState() for _ in range(2)]
    for state in streams:
        with torch.no_grad():
            vae.encode_stream(clip_video(frames=1), state)
    three = torch.zeros(1, 3, 3, 32, 32, dtype=torch.uint8)  # not a multiple of 4 frames: the VAE refuses the batch
    results, _ = waiting_together(encoder, [lambda s=s: encoder.encode(three, s) for s in streams])
    assert all(isinstance(r, ValueError) and "got 3 frames" in str(r) for r in results.values()) and len(results) == 2


@pytest.fixture(scope="module")
def vae22():
    """The Wan2.2 architecture at tiny width, every weight random (no zero-initialised layer hides an error)."""
    torch.manual_seed(0)
    model = WanVAE(VAE_CONFIGS["tiny-wan2.2"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def test_wan22_vae_shapes_z48_16x_space_4x_time_first_frame_alone(vae22):
    video = clip_video(frames=9, size=16)
    with torch.no_grad():
        whole = vae22.encode(video, frames_per_call=8)
        wan_chunks = vae22.encode(video)
        changed = video.clone()
        changed[:, :, 1:] = clip_video(frames=9, size=16, seed=3)[:, :, 1:]
        first_only = vae22.encode(changed)
        pixels = vae22.decode(whole)
    assert whole.shape == (1, 8, 3, 1, 1) and pixels.shape == video.shape
    torch.testing.assert_close(wan_chunks, whole, atol=1e-5, rtol=1e-5)
    assert torch.equal(first_only[:, :, :1], whole[:, :, :1]) and not torch.allclose(first_only[:, :, 1:], whole[:, :, 1:])
    with torch.device("meta"):
        real = WanVAE(VAE_CONFIGS["wan2.2"])
    assert (real.cfg.z_dim, real.cfg.temporal_stride, real.cfg.spatial_stride) == (48, 4, 16)
    assert real.latent_mean.shape == real.latent_std.shape == (1, 48, 1, 1, 1)
    with pytest.raises(ValueError, match="multiple of 16"):
        vae22.encode(clip_video(size=40))


def test_wan22_vae_has_the_names_and_shapes_of_wan22_vae_pth():
    """Every key and shape of Wan2.2's own VAE (Wan2_2_VAE's configuration), listed once from Wan2.2's source."""
    golden = json.loads((Path(__file__).parent / "golden" / "wan2.2_vae_keys.json").read_text())
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in WanVAE(VAE_CONFIGS["wan2.2"]).state_dict().items()}
    assert set(ours) == set(golden), set(ours) ^ set(golden)
    assert {k: v for k, v in ours.items() if golden[k] != v} == {}


# Wan's VAE names -> diffusers' (as diffusers converts Wan2.2_VAE.pth): stage layers split into resnets and
# the resampler; residual blocks' Sequential indices become names.
_DIFFUSERS_VAE = [(r"^conv1\.", "quant_conv."), (r"^conv2\.", "post_quant_conv."), (r"\.conv1\.", ".conv_in."),
                  (r"\.head\.0\.", ".norm_out."), (r"\.head\.2\.", ".conv_out."),
                  (r"\.middle\.0\.", ".mid_block.resnets.0."), (r"\.middle\.1\.", ".mid_block.attentions.0."),
                  (r"\.middle\.2\.", ".mid_block.resnets.1."), (r"\.residual\.0\.", ".norm1."),
                  (r"\.residual\.2\.", ".conv1."), (r"\.residual\.3\.", ".norm2."), (r"\.residual\.6\.", ".conv2."),
                  (r"\.shortcut\.", ".conv_shortcut.")]


def _diffusers_vae_name(key: str, cfg) -> str:
    stage = re.match(r"(encoder|decoder)\.(?:down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.*)", key)
    if stage:
        part, i, j, rest = stage.groups()
        blocks = "down_blocks" if part == "encoder" else "up_blocks"
        resnets = cfg.num_res_blocks + (part == "decoder")
        where = f"resnets.{j}" if int(j) < resnets else ("downsampler" if part == "encoder" else "upsampler")
        key = f"{part}.{blocks}.{i}.{where}.{rest}"
    for pattern, name in _DIFFUSERS_VAE:
        key = re.sub(pattern, name, key)
    return key


def test_wan22_vae_equals_diffusers_autoencoder_kl_wan(vae22):
    cfg = vae22.cfg
    reference = AutoencoderKLWan(base_dim=cfg.dim, decoder_base_dim=cfg.decoder_dim, z_dim=cfg.z_dim, is_residual=True,
                                 in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16).eval()
    reference.load_state_dict({_diffusers_vae_name(k, cfg): v for k, v in vae22.state_dict().items()}, strict=True)
    video = torch.rand(1, 3, 9, 16, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = vae22.encode(video)
        expected = (reference.encode(video).latent_dist.mean - vae22.latent_mean) / vae22.latent_std
        pixels = vae22.decode(latents)
        expected_pixels = reference.decode(latents * vae22.latent_std + vae22.latent_mean).sample.clamp(-1, 1)
    assert latents.shape == (1, 8, 3, 1, 2) and latents.abs().mean() > 0.1
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pixels, expected_pixels, atol=1e-5, rtol=1e-5)


def test_vae_layouts_of_presets_match_the_networks():
    for name, layout in VAE_LAYOUTS.items():
        cfg = vae_config(name)
        assert (cfg.z_dim, cfg.spatial_stride, cfg.temporal_stride) == (
            layout.latent_channels, layout.spatial_stride, layout.temporal_stride), name
    assert {p.arch.vae for p in PRESETS.values()} <= set(VAE_LAYOUTS)


def test_frozen_encoder_parameter_counts_match_the_accounting_table():
    with torch.device("meta"):
        counts = {
            "wan2.1": WanVAE(VAE_CONFIGS["wan2.1"]),
            "wan2.2": WanVAE(VAE_CONFIGS["wan2.2"]),
            "clip-vit-h-14": ClipImageEncoder(CLIP_CONFIGS["clip-vit-h-14"]).visual,
            "umt5-xxl": UMT5EncoderModel(umt5_config("umt5-xxl")),
        }
    for name, module in counts.items():
        assert sum(p.numel() for p in module.parameters()) == FROZEN_ENCODER_PARAMS[name], name


def test_clip_tokens_and_wan_key_names():
    encoder = ClipImageEncoder(CLIP_CONFIGS["tiny"]).eval()
    tokens = encoder(torch.rand(2, 3, 40, 72) * 2 - 1)
    assert tokens.shape == (2, 5, 32)
    keys = set(encoder.state_dict())
    for key in ("visual.patch_embedding.weight", "visual.cls_embedding", "visual.pos_embedding",
                "visual.pre_norm.weight", "visual.transformer.1.attn.to_qkv.weight", "visual.transformer.0.mlp.2.bias",
                "visual.post_norm.bias", "visual.head"):
        assert key in keys
    assert "visual.patch_embedding.bias" not in keys  # pre-norm ViT: no patch bias


def test_clip_loads_the_visual_part_of_a_full_clip_checkpoint(tmp_path):
    source = ClipImageEncoder(CLIP_CONFIGS["tiny"])
    checkpoint = {k: v.clone() for k, v in source.state_dict().items()}
    checkpoint["textual.head.0.weight"] = torch.zeros(3, 3)  # the text tower is ignored
    checkpoint["log_scale"] = torch.zeros(())
    torch.save(checkpoint, tmp_path / "clip.pth")
    target = ClipImageEncoder(CLIP_CONFIGS["tiny"])
    load_frozen(target.visual, tmp_path / "clip.pth", prefix="visual.")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True))


def test_load_frozen_errors(vae, tmp_path):
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    del state["decoder.head.2.bias"]
    save_file(state, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_frozen(WanVAE(vae.cfg), tmp_path / "vae.safetensors")
    state["decoder.head.2.bias"] = torch.zeros(5)
    save_file(state, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape \(5,\)"):
        load_frozen(WanVAE(vae.cfg), tmp_path / "vae.safetensors")


def test_byte_tokenizer_and_features_beyond_the_prompt_are_zero():
    ids, mask = ByteTokenizer()(["ab", "é"], 6)
    assert ids.tolist() == [[ord("a") + 3, ord("b") + 3, 1, 0, 0, 0], [0xC3 + 3, 0xA9 + 3, 1, 0, 0, 0]]
    encoder = load_text_encoder("tiny", text_len=16, seed=0)
    features = encoder(["pick up the cup", "open"])
    assert features.shape == (2, 16, 32)
    assert features[1, 5:].abs().sum() == 0 and features[1, :5].abs().sum() > 0
    assert not torch.allclose(features[0, :4], features[1, :4])


def _hf_folder(tmp_path):
    torch.manual_seed(0)
    model = UMT5EncoderModel(umt5_config("tiny"))
    folder = tmp_path / "umt5-tiny"
    model.save_pretrained(folder)
    return model, folder


def test_text_encoder_loads_from_an_hf_folder_and_an_fsspec_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("WAM_CACHE_DIR", str(tmp_path / "cache"))
    model, folder = _hf_folder(tmp_path)
    fs = fsspec.filesystem("memory")
    for file in folder.iterdir():
        fs.put(str(file), f"/umt5/{file.name}")
    try:
        local = load_text_encoder("tiny", 16, str(folder))
        remote = load_text_encoder("tiny", 16, "memory://umt5")
    finally:
        fs.rm("/umt5", recursive=True)
    prompts = ["stack the blocks"]
    ids, mask = ByteTokenizer()(prompts, 16)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    torch.testing.assert_close(local(prompts), expected)
    torch.testing.assert_close(remote(prompts), expected)


def test_text_encoder_loads_wan_t5_pth(tmp_path):
    model, _ = _hf_folder(tmp_path)
    hf = model.state_dict()
    wan = {"token_embedding.weight": hf["shared.weight"], "norm.weight": hf["encoder.final_layer_norm.weight"]}
    for i in range(2):  # Wan's T5 names, written out by hand
        h = f"encoder.block.{i}.layer."
        wan.update({
            f"blocks.{i}.norm1.weight": hf[h + "0.layer_norm.weight"],
            f"blocks.{i}.norm2.weight": hf[h + "1.layer_norm.weight"],
            f"blocks.{i}.pos_embedding.embedding.weight": hf[h + "0.SelfAttention.relative_attention_bias.weight"],
            f"blocks.{i}.ffn.gate.0.weight": hf[h + "1.DenseReluDense.wi_0.weight"],
            f"blocks.{i}.ffn.fc1.weight": hf[h + "1.DenseReluDense.wi_1.weight"],
            f"blocks.{i}.ffn.fc2.weight": hf[h + "1.DenseReluDense.wo.weight"],
            **{f"blocks.{i}.attn.{p}.weight": hf[h + f"0.SelfAttention.{p}.weight"] for p in "qkvo"},
        })
    torch.save(wan, tmp_path / "models_t5_umt5-tiny-enc.pth")
    loaded = load_text_encoder("tiny", 16, str(tmp_path / "models_t5_umt5-tiny-enc.pth"))
    ids, mask = ByteTokenizer()(["wipe the table"], 16)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    torch.testing.assert_close(loaded(["wipe the table"]), expected)
    wan["blocks.0.extra.weight"] = torch.zeros(1)
    torch.save(wan, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unexpected keys"):
        load_text_encoder("tiny", 16, str(tmp_path / "bad.pth"))


@pytest.mark.parametrize("preset", ["dreamzero-14b", "dreamzero-5b"])
def test_real_presets_refuse_to_run_on_random_encoders(preset):
    with pytest.raises(ConfigError, match="needs (its published )?weights"):
        FrozenEncoders.build(get_preset(preset).arch, EncodersSection())


def test_i2v_condition_marks_the_first_latent_frame_and_encodes_first_frame_plus_black(tiny):
    encoders = FrozenEncoders.build(tiny.arch)
    first = torch.rand(2, 3, 64, 64) * 2 - 1
    cond = encoders.i2v_condition(first, latent_frames=3)
    assert cond.shape == (2, 4 + 4, 3, 8, 8)
    assert bool((cond[:, :4, 0] == 1).all()) and bool((cond[:, :4, 1:] == 0).all())
    video = torch.zeros(2, 3, 9, 64, 64)
    video[:, :, 0] = first
    torch.testing.assert_close(cond[:, 4:], encoders.vae.encode(video))


def test_frozen_encoders_build_from_published_style_files(tiny, tmp_path):
    random = FrozenEncoders.build(tiny.arch, seed=7)
    torch.save(random.vae.state_dict(), tmp_path / "Wan2.1_VAE.pth")
    torch.save({**random.image.state_dict(), "textual.embedding.weight": torch.zeros(2, 2)}, tmp_path / "clip.pth")
    random.text.model.save_pretrained(tmp_path / "umt5")
    paths = EncodersSection(vae=str(tmp_path / "Wan2.1_VAE.pth"), text=str(tmp_path / "umt5"),
                         image=str(tmp_path / "clip.pth"))
    loaded = FrozenEncoders.build(tiny.arch, paths, seed=99)
    for a, b in ((random.vae, loaded.vae), (random.image, loaded.image), (random.text.model, loaded.text.model)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
