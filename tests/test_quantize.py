"""NVFP4: the format against torchao's reference, round trips, the streaming quantizer's memory bound,
refusal of unfinished or corrupted checkpoints, and the quantized model's error."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from wam.platform.config import load_config, resolve_preset
from wam.platform.errors import CheckpointError
from wam.trainer.model import WamInputs
from wam.trainer.quantize import nvfp4
from wam.trainer.quantize.load import load_quantized
from wam.trainer.quantize.quantizer import kept_reason, quantize_checkpoint

from conftest import randomized_model, wam_cli, write_checkpoint

WEIGHTS = {
    "gaussian": lambda g: torch.randn(64, 256, generator=g),
    "rows of very different scale": lambda g: torch.randn(32, 128, generator=g) * torch.rand(32, 1, generator=g) * 50,
    "outliers": lambda g: torch.randn(16, 64, generator=g).index_put_((torch.tensor([3]), torch.tensor([7])),
                                                                     torch.tensor(400.0)),
    "zero and tiny blocks": lambda g: torch.cat([torch.zeros(4, 32), torch.randn(4, 32, generator=g) * 1e-7]),
    "exact half steps (rounding ties)": lambda g: torch.randint(-12, 13, (16, 64), generator=g) / 2.0,
    "bfloat16": lambda g: torch.randn(8, 64, generator=g).bfloat16(),
}


@pytest.mark.parametrize("kind", WEIGHTS)
def test_packing_and_scales_are_bit_exact_with_torchao(kind):
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    w = WEIGHTS[kind](torch.Generator().manual_seed(0))
    ours = nvfp4.quantize(w)
    ref = NVFP4Tensor.to_nvfp4(w.contiguous(), per_tensor_scale=per_tensor_amax_to_scale(w.abs().amax()))
    assert torch.equal(ours.packed, ref.qdata.view(torch.uint8))
    assert torch.equal(ours.scales.view(torch.uint8), ref.scale.view(torch.uint8))
    assert torch.equal(ours.global_scale, ref.per_tensor_scale.reshape(()))
    assert torch.equal(nvfp4.dequantize(ours), ref.dequantize(torch.float32))


def test_round_trip_exact_on_representable_values_and_bounded_elsewhere():
    g = torch.Generator().manual_seed(1)
    magnitudes = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    codes = torch.randint(0, 8, (32, 64), generator=g)
    exact = magnitudes[codes] * torch.where(torch.rand(32, 64, generator=g) < 0.5, -1.0, 1.0)
    exact[:, ::16] = 6.0  # every block's amax is 6, so its scale is exactly 1 x the global scale
    assert torch.equal(nvfp4.dequantize(nvfp4.quantize(exact * 0.25)), exact * 0.25)
    w = torch.randn(128, 512, generator=g)
    error = (nvfp4.dequantize(nvfp4.quantize(w)) - w).norm() / w.norm()
    assert 0.05 < error < 0.12  # FP4 keeps ~3 significant bits: ~10% relative error on Gaussian weights
    assert torch.equal(nvfp4.dequantize(nvfp4.quantize(torch.zeros(4, 32))), torch.zeros(4, 32))
    q = nvfp4.quantize(w)
    assert torch.equal(nvfp4.unpack(q.packed), nvfp4.encode_fp4(
        (w.view(128, 32, 16) / (q.scales.float() * q.global_scale)[..., None]).clamp(-6, 6).view(128, 512)))


def test_rounding_is_to_nearest_with_ties_to_even():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 5.01, -0.75, -0.1])
    expected = torch.tensor([0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 6.0, -1.0, -0.0])
    assert torch.equal(nvfp4.decode_fp4(nvfp4.encode_fp4(x)), expected)


def test_refuses_what_it_cannot_quantize():
    with pytest.raises(ValueError, match="multiples of 16"):
        nvfp4.quantize(torch.randn(4, 20))
    with pytest.raises(ValueError, match="NaN or Inf"):
        nvfp4.quantize(torch.tensor([[float("nan")] * 16]))
    keep = ["patch_embedding", "head.*", "*norm*"]
    assert kept_reason("blocks.0.self_attn.q.weight", (64, 64), keep) == ""
    assert "pattern" in kept_reason("head.head.weight", (16, 64), keep)
    assert kept_reason("blocks.0.self_attn.q.bias", (64,), keep) == "not a linear weight"
    assert "multiple of 16" in kept_reason("state_in.weight", (64, 20), [])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant")
    cfg = load_config(None, ["name=quant", f"output_dir={folder}/runs"])
    preset = resolve_preset(cfg)
    model = randomized_model(preset.arch, preset.sample, seed=3)
    return folder, cfg, model, write_checkpoint(folder / "checkpoints", cfg, model)


def test_quantized_model_stays_within_the_stated_error_of_the_fp32_model(tiny_checkpoint):
    folder, cfg, model, checkpoint = tiny_checkpoint
    report = quantize_checkpoint(checkpoint)
    assert report.out == str(folder / "checkpoints" / "nvfp4" / "step-5")
    layers = {layer.name: layer for layer in report.layers}
    assert layers["blocks.0.ffn.0.weight"].format == "nvfp4" and layers["head.head.weight"].format == "bfloat16"
    assert all(0.05 < layer.relative_error < 0.12 for layer in report.quantized)
    saved = json.loads((folder / "checkpoints/nvfp4/step-5/report.json").read_text())
    assert len(saved["layers"]) == len(report.layers) and saved["summary"]["layers_nvfp4"] == len(report.quantized)
    policy = load_quantized(report.out)
    assert policy.compute_path == "fp32-dequantized" and policy.step == 5
    preset = resolve_preset(cfg)
    inputs = WamInputs.random(preset.arch, preset.sample, batch=2, seed=7)
    with torch.no_grad():
        reference, quantized = model(inputs), policy.model(inputs)
    for name in ("video", "actions"):
        ref, q = getattr(reference, name), getattr(quantized, name)
        error = ((q - ref).norm() / ref.norm()).item()
        assert 0.01 < error < 0.25, (name, error)  # docs/robotics.md states this bound for the tiny preset
    again = quantize_checkpoint(checkpoint)  # a retried quantization Job reuses the intact result
    assert again.reused and len(again.layers) == len(report.layers)


def test_refuses_incomplete_and_corrupted_checkpoints_and_models(tiny_checkpoint, tmp_path):
    folder, cfg, model, checkpoint = tiny_checkpoint
    unfinished = write_checkpoint(tmp_path / "ckpt", cfg, model, step=3)
    (tmp_path / "ckpt/step-3/manifest.json").unlink()
    result = wam_cli("quantize", unfinished, "--out", tmp_path / "out")
    assert result.returncode == 2 and "not a complete checkpoint (no manifest.json)" in result.stderr
    assert not (tmp_path / "out").exists()
    corrupted = write_checkpoint(tmp_path / "bad", cfg, model, step=4)
    data = next(p for p in (tmp_path / "bad/step-4").iterdir() if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    result = wam_cli("quantize", corrupted, "--out", tmp_path / "out")
    assert result.returncode == 2 and "sha256 differs from the manifest" in result.stderr
    assert not (tmp_path / "out").exists()
    # The serving side refuses a quantized folder that is unfinished or damaged.
    out = quantize_checkpoint(checkpoint, str(tmp_path / "model")).out
    shard = next((tmp_path / "model").glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_quantized(out)
    (tmp_path / "model/manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete quantized model"):
        load_quantized(out)


def test_quantizer_memory_stays_bounded_by_a_few_tensors(tmp_path):
    """A 470 MB (float32) checkpoint of 560 tensors, quantized in 8 MB shards: the process's peak memory
    grows by far less than the model's size (measured as peak RSS in a fresh process)."""
    cfg = load_config(None, ["name=big", "model.dim=512", "model.num_layers=24", "model.ffn_dim=2048",
                             "model.num_heads=4", f"output_dir={tmp_path}/runs"])
    preset = resolve_preset(cfg)
    from wam.trainer.model import build_model, model_config

    model = build_model(model_config(preset.arch, preset.sample), seed=0)
    model_bytes = sum(p.numel() * 4 for p in model.state_dict().values())
    tensors = len(model.state_dict())
    checkpoint = write_checkpoint(tmp_path / "checkpoints", cfg, model)
    del model
    script = textwrap.dedent(f"""
        import json, gc
        from wam.trainer.quantize.quantizer import quantize_checkpoint
        import wam.trainer.quantize.load, wam.trainer.data.stats  # everything imported before the baseline

        def kib(field):
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

        gc.collect()
        open("/proc/self/clear_refs", "w").write("5")  # peak RSS (VmHWM) restarts from the current RSS
        before = kib("VmRSS:") * 1024
        report = quantize_checkpoint({checkpoint!r}, shard_mb=8)
        print(json.dumps({{"before": before, "peak": kib("VmHWM:") * 1024, "shards": report.output_bytes}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    assert model_bytes > 300e6 and tensors > 350
    assert growth < 0.25 * model_bytes, (measured, model_bytes / 1e6)
    assert len(list((tmp_path / "checkpoints/nvfp4/step-5").glob("model-*-of-*.safetensors"))) > 3
