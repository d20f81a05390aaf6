"""Reading published checkpoints into our modules: Wan2.1 / DreamZero DiTs and the frozen encoders.

Formats: a `.safetensors` file, a sharded `*.safetensors.index.json`, a folder holding either, or a
`.pth`/`.pt`. Tensors stream one at a time into the already-built model (safetensors memory-maps, `.pth`
loads with mmap), so importing a 14B checkpoint never holds a second copy of the model in memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from wam.platform.errors import CheckpointError
from wam.platform.storage import localize

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _resolve_files(path: Path) -> list[Path]:
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        singles = sorted(path.glob("*.safetensors"))
        torch_files = sorted(p for p in path.iterdir() if p.suffix in _TORCH_SUFFIXES)
        if indexes:
            return _resolve_files(indexes[0])
        if singles or torch_files:
            return singles or torch_files
        raise CheckpointError(f"{path} holds no .safetensors, *.safetensors.index.json or .pth file")
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        return [path.parent / name for name in sorted(set(weight_map.values()))]
    if path.suffix == ".safetensors" or path.suffix in _TORCH_SUFFIXES:
        return [path]
    raise CheckpointError(f"unsupported checkpoint file {path.name}: expected .safetensors, "
                          "*.safetensors.index.json or .pth")


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a checkpoint at a local path or fsspec URI, one tensor at a time."""
    for file in _resolve_files(localize(path)):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            if "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            yield from state.items()


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, without reading tensor data."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in _resolve_files(localize(path)):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        else:
            shapes.update({name: tuple(t.shape) for name, t in iter_tensors(file)})  # mmap: data is not read
    return shapes


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype))


def load_frozen(module: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Strictly load `module` from the checkpoint's keys under `prefix` (e.g. 'visual.'); other keys are
    ignored. Every parameter must be present with its shape."""
    params = module.state_dict(keep_vars=True)
    seen: set[str] = set()
    for name, value in iter_tensors(path):
        if not name.startswith(prefix):
            continue
        key = name[len(prefix):]
        if key not in params:
            raise CheckpointError(f"{path}: unexpected key {name!r} for {type(module).__name__}")
        if tuple(params[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(value.shape)}, "
                                  f"{type(module).__name__} expects {tuple(params[key].shape)}")
        _copy_into(params[key], value)
        seen.add(key)
    missing = sorted(set(params) - seen)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} missing keys for {type(module).__name__} "
                              f"(under prefix {prefix!r}), e.g. {missing[:6]}")


# -- Wan / DreamZero DiT import -------------------------------------------------------------------------

WAM_HEADS = ("state_encoder.", "action_encoder.", "action_decoder.")
IMAGE_BRANCH = re.compile(r"^(img_emb\.|blocks\.\d+\.cross_attn\.(k_img|v_img|norm_k_img)\.)")


@dataclass
class ImportReport:
    loaded: int = 0
    converted_dreamzero_heads: int = 0
    fresh: list[str] = field(default_factory=list)  # parameters kept at their initialisation

    def summary(self) -> str:
        groups = sorted({k.split(".")[0] if not k.startswith("blocks.") else "image branch" for k in self.fresh})
        fresh = f"; initialised fresh: {', '.join(groups)}" if groups else ""
        return f"loaded {self.loaded} tensors{fresh}"


def _detect_prefix(names) -> str:
    """Wrappers (DreamZero's action head, torch.compile, DDP) prefix the Wan names; find that prefix."""
    for name in names:
        if name.endswith("patch_embedding.weight"):
            return name[: -len("patch_embedding.weight")]
    raise CheckpointError("not a Wan DiT checkpoint: no 'patch_embedding.weight' key")


def _model_name(raw_name: str, prefix: str) -> tuple[str | None, bool]:
    """The model parameter a checkpoint tensor goes to (None: not under the prefix), and whether it is a
    DreamZero CategorySpecificLinear tensor (W (1, in, out) / b (1, out), one embodiment) to convert."""
    if not raw_name.startswith(prefix):
        return None, False
    name = raw_name[len(prefix):]
    if name.startswith(WAM_HEADS) and name.endswith((".W", ".b")):
        return name[:-2] + (".weight" if name.endswith(".W") else ".bias"), True
    return name, False


def _converted(value_or_shape, is_dreamzero_head: bool, is_weight: bool):
    """Apply DreamZero's head layout conversion to a tensor or a shape tuple."""
    if not is_dreamzero_head:
        return value_or_shape
    if isinstance(value_or_shape, tuple):
        return value_or_shape[1:][::-1] if is_weight else value_or_shape[1:]
    return value_or_shape[0].T.contiguous() if is_weight else value_or_shape[0]


def import_wan_checkpoint(model: nn.Module, path: str | Path) -> ImportReport:
    """Load a Wan2.1 (or DreamZero) DiT checkpoint into a WamModel built from a matching preset.

    The WAM heads may be absent (a plain Wan checkpoint): they keep their initialisation, as does the CLIP
    image branch when importing a backbone without one into a model with one (Wan2.2-TI2V-5B). DreamZero's
    heads are converted to Linear weights. Names and shapes are checked before any tensor is read: any
    other missing or unexpected key, or a wrong shape, is an error listing them all, and the model is left
    untouched.
    """
    params = model.state_dict(keep_vars=True)
    shapes = checkpoint_shapes(path)
    prefix = _detect_prefix(shapes)
    report, unexpected, mismatched, targets = ImportReport(), [], [], {}
    for raw_name, shape in shapes.items():
        name, dreamzero = _model_name(raw_name, prefix)
        if name is None or name not in params:
            unexpected.append(raw_name)
            continue
        shape = _converted(shape, dreamzero, name.endswith(".weight"))
        if tuple(params[name].shape) != shape:
            mismatched.append(f"{name}: checkpoint {shape} vs model {tuple(params[name].shape)}")
        targets[raw_name] = (name, dreamzero)
    has_image_branch = any(IMAGE_BRANCH.match(name) for name, _ in targets.values())
    loaded = {name for name, _ in targets.values()}
    missing = []
    for name in sorted(set(params) - loaded):
        if name.startswith(WAM_HEADS) or (IMAGE_BRANCH.match(name) and not has_image_branch):
            report.fresh.append(name)
        else:
            missing.append(name)
    if unexpected or mismatched or missing:
        lines = [f"checkpoint {path} does not fit this model:"]
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatches: " + "; ".join(mismatched[:6]))
            if any(m.startswith("patch_embedding.weight") for m in mismatched):
                lines.append("  (patch_embedding input channels differ: a T2V checkpoint (16) needs preset "
                             "wan2.1-1.3b-like i2v_concat=false, an I2V checkpoint (36) i2v_concat=true)")
        if missing:
            lines.append(f"  {len(missing)} missing keys: {missing[:8]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {unexpected[:8]}")
        lines.append("  check that the model preset matches the checkpoint (dim, num_layers, I2V or T2V)")
        raise CheckpointError("\n".join(lines))
    for raw_name, value in iter_tensors(path):
        name, dreamzero = targets[raw_name]
        _copy_into(params[name], _converted(value, dreamzero, name.endswith(".weight")))
        report.loaded += 1
        report.converted_dreamzero_heads += dreamzero
    return report
