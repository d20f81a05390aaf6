"""Writing a model's weights as one safetensors file: a Wan checkpoint imported into a WAM preset, or a
complete training checkpoint consolidated for the quantization stage."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from wam.platform.checkpoints import WEIGHT_DTYPES, check_weight_dtype
from wam.platform.presets import Preset
from wam.trainer.checkpoint_reader import open_checkpoint
from wam.trainer.model.registry import build_model, model_config
from wam.trainer.model.weights import ImportReport, import_wan_checkpoint

DTYPES = {name: getattr(torch, name) for name in WEIGHT_DTYPES}


def save_safetensors(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write atomically: a crash leaves either the old file or none, never a truncated one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def import_to_safetensors(preset: Preset, checkpoint: str, out: Path, dtype: str = "bfloat16") -> ImportReport:
    check_weight_dtype(dtype)
    model = build_model(model_config(preset.arch, preset.sample), dtype=DTYPES[dtype])
    report = import_wan_checkpoint(model, checkpoint)
    save_safetensors(model.state_dict(), out, {"preset": preset.name, "source": str(checkpoint),
                                               "initialised_fresh": ",".join(report.fresh)})
    return report


def export_checkpoint(uri: str, out: Path, dtype: str = "bfloat16") -> int:
    """Consolidate the model weights of a complete DCP checkpoint into one safetensors file; returns its step."""
    check_weight_dtype(dtype)
    stored = open_checkpoint(uri)
    state = stored.read()
    save_safetensors({k: v.to(DTYPES[dtype]) for k, v in state.items()}, Path(out),
                     {"preset": stored.preset.name, "step": str(stored.step), "source": stored.uri,
                      "config": json.dumps(stored.manifest.config)})
    return stored.step
