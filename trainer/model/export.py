"""Writing a model's weights as one safetensors file: a Wan checkpoint imported into a WAM preset, or a
complete training checkpoint consolidated for the quantization stage."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader

from wam.platform.checkpoints import CheckpointManifest, latest_complete, read_manifest, verify
from wam.platform.config import config_from_dict, resolve_preset
from wam.platform.errors import ConfigError
from wam.platform.presets import Preset
from wam.platform.storage import is_remote, local_path
from wam.trainer.model.registry import build_model, model_config
from wam.trainer.model.weights import CheckpointError, ImportReport, import_wan_checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


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
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    model = build_model(model_config(preset.arch, preset.sample), dtype=DTYPES[dtype])
    report = import_wan_checkpoint(model, checkpoint)
    save_safetensors(model.state_dict(), out, {"preset": preset.name, "source": str(checkpoint),
                                               "initialised_fresh": ",".join(report.fresh)})
    return report


def complete_checkpoint(uri: str) -> tuple[str, CheckpointManifest]:
    """A checkpoint folder with its manifest: `uri` itself, or the newest complete one under it. Refuses
    folders without a manifest (an unfinished save) and files that do not match the manifest."""
    manifest = read_manifest(uri)
    if manifest is None:
        newest = latest_complete(uri)
        if newest is None:
            raise CheckpointError(f"{uri} is not a complete checkpoint (no manifest.json) and holds none")
        uri = newest[1]
        manifest = read_manifest(uri)
    problems = verify(uri, manifest, checksums=True)
    if problems:
        raise CheckpointError(f"checkpoint {uri} does not match its manifest: " + "; ".join(problems[:5]))
    return uri, manifest


def load_from_checkpoint(state: dict[str, torch.Tensor], uri: str) -> None:
    """Fill the tensors of `state` (any subset of the checkpoint's keys) in place from a DCP checkpoint folder,
    in this process; DCP reads only the bytes of the requested tensors."""
    if is_remote(uri):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        reader = FsspecReader(uri)
    else:
        reader = FileSystemReader(str(local_path(uri)))
    with warnings.catch_warnings():  # DCP notes that it loads in a single process, which is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)


def export_checkpoint(uri: str, out: Path, dtype: str = "bfloat16") -> int:
    """Consolidate the model weights of a complete DCP checkpoint into one safetensors file; returns its step."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    uri, manifest = complete_checkpoint(uri)
    cfg = config_from_dict(manifest.config)
    preset = resolve_preset(cfg)
    with torch.device("meta"):
        model = model_config(preset.arch, preset.sample).build()
    state = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in model.state_dict().items()}
    load_from_checkpoint(state, uri)
    save_safetensors({k: v.to(DTYPES[dtype]) for k, v in state.items()}, Path(out),
                     {"preset": preset.name, "step": str(manifest.step), "source": uri, "config": json.dumps(manifest.config)})
    return manifest.step
