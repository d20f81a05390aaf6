"""The `wam` command line."""

import json
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from wam.app.cli import app
from wam.platform.accounting import count_flops, count_params
from wam.platform.presets import get_preset

from conftest import REPO

runner = CliRunner()


def text(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_model_info_json_reports_the_accounting():
    result = runner.invoke(app, ["model", "info", "dreamzero-14b", "--json", "--gpus", "16"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    preset = get_preset("dreamzero-14b")
    assert info["params"]["total"] == count_params(preset.arch).total == 16_484_292_448
    assert info["flops_per_sample"]["training"] == count_flops(preset.arch, preset.sample).training
    assert info["memory_gib_per_gpu"]["gpus"] == 16 and info["min_gpus"]["count"] >= 1


def test_model_info_table_and_config_overrides(tmp_path):
    cfg = tmp_path / "wide.yaml"
    cfg.write_text("model:\n  num_layers: 4\n")
    result = runner.invoke(app, ["model", "info", "tiny", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "trained parameters" in result.output
    assert f"{count_params(get_preset('tiny', num_layers=4).arch).total:,}" in result.output


def test_model_info_gives_each_backbone_its_vae_latent_layout_on_the_same_canvas(tmp_path):
    layouts = {}
    for name in ("dreamzero-5b", "dreamzero-14b"):
        result = runner.invoke(app, ["model", "info", name, "--json"])
        assert result.exit_code == 0, result.output
        info = json.loads(result.output)
        layouts[name] = (info["vae"]["name"], info["vae"]["latent_channels"], info["vae"]["spatial_stride"],
                         info["vae"]["temporal_stride"], info["sample"]["latent_height"], info["sample"]["latent_width"],
                         info["canvas"])
    assert layouts == {"dreamzero-5b": ("wan2.2", 48, 16, 4, 22, 40, [352, 640]),
                       "dreamzero-14b": ("wan2.1", 16, 8, 4, 44, 80, [352, 640])}
    assert "wan2.2: 48 channels, 16x space" in text(runner.invoke(app, ["model", "info", "dreamzero-5b"]))
    cfg = tmp_path / "odd.yaml"
    cfg.write_text("sample:\n  latent_height: 21\n")
    result = runner.invoke(app, ["model", "info", "dreamzero-5b", "--config", str(cfg)])
    assert result.exit_code == 2 and "multiple of 32x32 pixels" in text(result)


def test_unknown_preset_is_a_one_line_error():
    result = runner.invoke(app, ["model", "info", "gpt-5"])
    assert result.exit_code == 2
    assert "unknown model preset 'gpt-5'" in text(result) and "Traceback" not in result.output


def test_model_list_names_every_preset():
    result = runner.invoke(app, ["model", "list"])
    assert result.exit_code == 0
    for name in ("tiny", "wan2.1-1.3b", "dreamzero-5b", "dreamzero-14b"):
        assert name in result.output


def test_demo_runs_the_tiny_chunkwise_inference_end_to_end():
    wam = Path(sys.executable).parent / "wam"  # the console script installed next to this interpreter
    result = subprocess.run([str(wam), "demo", "--steps", "2"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "held-out windows" in text and "action MAE" in text and "untrained 0" in text
    diff = float(re.search(r"max abs difference ([0-9.e+-]+)", result.stdout).group(1))
    assert diff < 1e-4


def test_model_import_writes_initial_weights_with_fresh_heads(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from test_weights import synthetic_wan_checkpoint

    arch = get_preset("tiny").arch
    checkpoint = synthetic_wan_checkpoint(arch, seed=4)
    save_file(checkpoint, str(tmp_path / "wan.safetensors"))
    out = tmp_path / "init" / "weights.safetensors"
    result = runner.invoke(app, ["model", "import", str(tmp_path / "wan.safetensors"), "--preset", "tiny",
                                 "--out", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "initialised fresh: action_decoder, action_encoder, state_encoder" in text(result)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["preset"] == "tiny"
        assert torch.equal(f.get_tensor("blocks.0.ffn.0.weight"), checkpoint["blocks.0.ffn.0.weight"])
        assert "action_encoder.W1.weight" in f.keys()


def test_model_import_of_a_mismatched_checkpoint_is_a_clear_error_and_writes_nothing(tmp_path):
    from safetensors.torch import save_file
    from test_weights import synthetic_wan_checkpoint

    save_file(synthetic_wan_checkpoint(get_preset("tiny").arch, dim=128), str(tmp_path / "wide.safetensors"))
    out = tmp_path / "weights.safetensors"
    result = runner.invoke(app, ["model", "import", str(tmp_path / "wide.safetensors"), "--preset", "tiny",
                                 "--out", str(out)])
    assert result.exit_code == 2 and "shape mismatches" in text(result) and "Traceback" not in result.output
    assert not out.exists()
