"""Importing Wan2.1 and DreamZero DiT checkpoints: formats, prefixes, fresh heads, and clear errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from wam.platform.errors import CheckpointError
from wam.platform.presets import get_preset
from wam.trainer.model import build_model, model_config
from wam.trainer.model.weights import import_wan_checkpoint

from conftest import wan_i2v_keys


@pytest.fixture
def tiny_model(tiny):
    return build_model(model_config(tiny.arch, tiny.sample), seed=3)


def synthetic_wan_checkpoint(arch, seed=0, **overrides) -> dict[str, torch.Tensor]:
    spec = dict(dim=arch.dim, ffn=arch.ffn_dim, layers=arch.num_layers, in_dim=arch.in_dim, out_dim=arch.out_dim,
                text_dim=arch.text_dim, freq_dim=arch.freq_dim, image_dim=arch.image_dim,
                image=arch.has_image_branch)
    spec.update(overrides)
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in wan_i2v_keys(**spec).items()}


def assert_loaded(model, checkpoint, prefix=""):
    params = model.state_dict()
    for key, value in checkpoint.items():
        assert torch.equal(params[key[len(prefix):]], value), key


def save_sharded(state, folder, shards=3):
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "pth", "folder"])
def test_wan_checkpoint_formats_load_and_heads_start_fresh(tiny, tiny_model, tmp_path, fmt):
    checkpoint = synthetic_wan_checkpoint(tiny.arch)
    heads_before = {k: v.clone() for k, v in tiny_model.state_dict().items() if k.startswith("action_encoder")}
    if fmt == "safetensors":
        path = tmp_path / "dit.safetensors"
        save_file(checkpoint, str(path))
    elif fmt == "sharded":
        save_sharded(checkpoint, tmp_path)
        path = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    elif fmt == "pth":
        path = tmp_path / "dit.pth"
        torch.save(checkpoint, path)
    else:
        save_sharded(checkpoint, tmp_path)
        path = tmp_path
    report = import_wan_checkpoint(tiny_model, path)
    assert_loaded(tiny_model, checkpoint)
    assert report.loaded == len(checkpoint)
    assert {k.split(".")[0] for k in report.fresh} == {"state_encoder", "action_encoder", "action_decoder"}
    for k, v in heads_before.items():
        assert torch.equal(tiny_model.state_dict()[k], v)
    assert "initialised fresh" in report.summary()


def test_dreamzero_checkpoint_with_wrapper_prefix_and_category_heads(tiny, tiny_model, tmp_path):
    arch = tiny.arch
    wan = synthetic_wan_checkpoint(arch, seed=1)
    g = torch.Generator().manual_seed(2)
    heads = {  # DreamZero's CategorySpecificLinear with one embodiment: W (1, in, out), b (1, out)
        "state_encoder.layer1": (arch.state_dim, arch.head_hidden), "state_encoder.layer2": (arch.head_hidden, arch.dim),
        "action_encoder.W1": (arch.action_dim, arch.dim), "action_encoder.W2": (2 * arch.dim, arch.dim),
        "action_encoder.W3": (arch.dim, arch.dim),
        "action_decoder.layer1": (arch.dim, arch.head_hidden), "action_decoder.layer2": (arch.head_hidden, arch.action_dim),
    }
    checkpoint = {f"action_head.model.{k}": v for k, v in wan.items()}
    for name, (n_in, n_out) in heads.items():
        checkpoint[f"action_head.model.{name}.W"] = torch.randn(1, n_in, n_out, generator=g)
        checkpoint[f"action_head.model.{name}.b"] = torch.randn(1, n_out, generator=g)
    torch.save(checkpoint, tmp_path / "dreamzero.pt")
    report = import_wan_checkpoint(tiny_model, tmp_path / "dreamzero.pt")
    assert report.fresh == [] and report.converted_dreamzero_heads == 2 * len(heads)
    assert_loaded(tiny_model, {f"action_head.model.{k}": v for k, v in wan.items()}, prefix="action_head.model.")
    params = tiny_model.state_dict()
    for name in heads:
        assert torch.equal(params[f"{name}.weight"], checkpoint[f"action_head.model.{name}.W"][0].T)
        assert torch.equal(params[f"{name}.bias"], checkpoint[f"action_head.model.{name}.b"][0])


def test_backbone_without_image_branch_leaves_it_fresh(tiny, tiny_model, tmp_path):
    checkpoint = synthetic_wan_checkpoint(tiny.arch, image=False)  # like Wan2.2-TI2V-5B
    save_file(checkpoint, str(tmp_path / "ti2v.safetensors"))
    report = import_wan_checkpoint(tiny_model, tmp_path / "ti2v.safetensors")
    assert any(k.startswith("img_emb.") for k in report.fresh)
    assert any(k.endswith("cross_attn.k_img.weight") for k in report.fresh)
    assert "image branch" in report.summary()


def test_missing_block_key_is_listed_and_the_model_is_left_untouched(tiny, tiny_model, tmp_path):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    checkpoint = synthetic_wan_checkpoint(tiny.arch)
    del checkpoint["blocks.1.ffn.0.weight"]
    save_file(checkpoint, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: \['blocks\.1\.ffn\.0\.weight'\]"):
        import_wan_checkpoint(tiny_model, tmp_path / "broken.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())


def test_unexpected_key_is_listed(tiny, tiny_model, tmp_path):
    checkpoint = synthetic_wan_checkpoint(tiny.arch)
    checkpoint["blocks.9.ffn.0.weight"] = torch.zeros(1)
    save_file(checkpoint, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys: \['blocks\.9\.ffn\.0\.weight'\]"):
        import_wan_checkpoint(tiny_model, tmp_path / "extra.safetensors")


def test_wrong_preset_reports_shapes_and_a_t2v_checkpoint_gets_a_hint(tiny, tiny_model, tmp_path):
    wider = synthetic_wan_checkpoint(tiny.arch, dim=128)
    save_file(wider, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape mismatches.*checkpoint \(128,") as err:
        import_wan_checkpoint(tiny_model, tmp_path / "wide.safetensors")
    assert "preset matches" in str(err.value)
    t2v = synthetic_wan_checkpoint(tiny.arch, in_dim=tiny.arch.latent_channels, image=False)
    save_file(t2v, str(tmp_path / "t2v.safetensors"))
    with pytest.raises(CheckpointError, match="T2V checkpoint"):
        import_wan_checkpoint(tiny_model, tmp_path / "t2v.safetensors")


def test_not_a_checkpoint(tiny_model, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="no .safetensors"):
        import_wan_checkpoint(tiny_model, tmp_path)
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="patch_embedding.weight"):
        import_wan_checkpoint(tiny_model, tmp_path / "other.safetensors")


def test_import_from_an_fsspec_uri(tiny, tiny_model, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("WAM_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint = synthetic_wan_checkpoint(tiny.arch, seed=5)
    save_file(checkpoint, str(tmp_path / "dit.safetensors"))
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "dit.safetensors"), "/wan/dit.safetensors")
    try:
        import_wan_checkpoint(tiny_model, "memory://wan/dit.safetensors")
    finally:
        fs.rm("/wan", recursive=True)
    assert_loaded(tiny_model, checkpoint)


def test_text_only_preset_imports_a_t2v_checkpoint(tmp_path):
    preset = get_preset("tiny", i2v_concat=False, image_tokens=0)
    model = build_model(model_config(preset.arch, preset.sample))
    checkpoint = synthetic_wan_checkpoint(preset.arch)
    assert not any("img" in k for k in checkpoint)
    save_file(checkpoint, str(tmp_path / "t2v.safetensors"))
    import_wan_checkpoint(model, tmp_path / "t2v.safetensors")
    assert_loaded(model, checkpoint)
