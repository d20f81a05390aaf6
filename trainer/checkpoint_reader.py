"""The one way every stage after training reads a stored model: a URI in; the complete folder (or file), its
manifest, the training config it was written with, the resolved preset and the model's skeleton out.

    open_checkpoint(uri)   a training checkpoint: a step-N folder, or a series (its newest complete one)
    open_quantized(uri)    an NVFP4 model folder from `wam quantize` (local copy made for remote URIs)
    open_export(path)      a .safetensors file from `wam export` (it carries its training config)
    open_for_eval(uri)     whichever of a checkpoint and an export `uri` is

Completeness is checked here: a folder without its manifest, or whose files differ from it (sizes and sha256), is
refused with a message saying which (wam.platform.checkpoints, whose torch-free checks the CLI also runs before torch
loads). `wam export`, `wam eval`, `wam demo`, `wam quantize`, the quantized loader, the policy server and the
benchmarks read through this module.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from wam.platform.checkpoints import CheckpointManifest, require_quantized_model, require_training_checkpoint
from wam.platform.config import WamConfig, config_from_dict, resolve_preset
from wam.platform.errors import CheckpointError, ConfigError
from wam.platform.presets import Preset
from wam.platform.storage import is_remote, local_path, localize
from wam.trainer.model.model import WamModel
from wam.trainer.model.registry import meta_model, model_config


@dataclass
class StoredModel:
    uri: str  # the complete step folder, quantized folder or exported file
    step: int
    config: WamConfig  # the training config the model was trained with
    manifest: CheckpointManifest | None  # None for an export (a single file)
    trained_from: str  # the training checkpoint folder it is (or was exported / quantized from); "" if unknown

    @cached_property
    def preset(self) -> Preset:
        return resolve_preset(self.config)

    def skeleton(self, dtype: torch.dtype = torch.float32) -> WamModel:
        """The model on the meta device: names, shapes and dtypes, no memory."""
        return meta_model(model_config(self.preset.arch, self.preset.sample), dtype)

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.skeleton().state_dict().items()}

    def load(self, device: torch.device) -> WamModel:
        """The model for inference on `device`: float32 on CPUs, bfloat16 on GPUs (as training's forward)."""
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = self.skeleton(dtype)
        model.to_empty(device=device)
        model.load_state_dict({k: v.to(dtype) for k, v in self.read().items()}, strict=True)
        return model.eval().requires_grad_(False)

    def read(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Float32 weights (all, or `names`) on the CPU. From a DCP folder only the requested tensors' bytes are
        read."""
        shapes = self.shapes
        wanted = list(shapes) if names is None else names
        if self.manifest is None:  # an export
            state = load_file(self.uri)
            return {name: state[name].float() for name in wanted}
        state = {name: torch.empty(shapes[name], dtype=torch.float32) for name in wanted}
        _read_dcp(state, self.uri)
        return state


def _read_dcp(state: dict[str, torch.Tensor], uri: str) -> None:
    """Fill the tensors of `state` (any subset of the checkpoint's keys) in place from a DCP checkpoint folder, in
    this process; DCP reads only the bytes of the requested tensors."""
    if is_remote(uri):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        reader = FsspecReader(uri)
    else:
        reader = FileSystemReader(str(local_path(uri)))
    with warnings.catch_warnings():  # DCP notes that it loads in a single process, which is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)


def _config(manifest: CheckpointManifest, where: str) -> WamConfig:
    return config_from_dict(manifest.config, f"training config in {where}")


def open_checkpoint(uri: str) -> StoredModel:
    """A complete training checkpoint: `uri` itself, or the newest complete one under it."""
    folder, manifest = require_training_checkpoint(uri)
    return StoredModel(folder, manifest.step, _config(manifest, folder), manifest, folder)


def open_quantized(uri: str) -> tuple[StoredModel, Path]:
    """A complete NVFP4 model folder and a local copy of it (the folder itself when it is local)."""
    # complete where it is (sizes only: the bytes are hashed once, in the local copy) before anything is copied
    require_quantized_model(uri, checksums=False)
    folder = localize(uri)
    manifest = require_quantized_model(str(folder))
    return StoredModel(uri, manifest.step, _config(manifest, uri), manifest, manifest.metrics.get("source", "")), folder


def open_export(path: str) -> StoredModel:
    """A `wam export` file: one safetensors file whose metadata holds the training config and step."""
    if is_remote(path):
        raise ConfigError(f"{path}: read an exported file from a local path (or the checkpoint folder by URI)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no file {path}")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise CheckpointError(f"{path} carries no training config (only `wam export` writes one): use the checkpoint "
                              "folder it came from, or export it with `wam export`")
    cfg = config_from_dict(json.loads(meta["config"]), f"training config in {path}")
    return StoredModel(path, int(meta.get("step", 0)), cfg, None, meta.get("source", ""))


def open_for_eval(uri: str) -> StoredModel:
    """A `wam export` file or a training checkpoint (folder or series)."""
    return open_export(uri) if uri.endswith(".safetensors") else open_checkpoint(uri)
