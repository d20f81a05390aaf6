"""Loading an NVFP4 model folder (quantize/checkpoint.py) into a runnable WamModel.

Which matmuls run depends on the device (chosen by its compute capability unless serving.compute or
`wam serve --compute` names one), and the server reports it:
  nvfp4            Blackwell (compute capability >= 10) with torchao: the packed weights stay FP4 and
                   torchao's NVFP4Tensor runs real FP4 matmuls (activations quantized on the fly)
  fp8              Hopper and Ada (>= 8.9) with torchao: the NVFP4 weights dequantized, then FP8 matmuls with
                   rowwise scales, activations quantized on the fly (torchao's float8 dynamic activation + weight)
  bf16-dequantized other GPUs: weights dequantized once to bfloat16
  fp32-dequantized CPU: weights dequantized once to float32 (weight-only emulation of the NVFP4 numerics)
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

import torch
from safetensors import safe_open

from wam.platform.config import COMPUTE_PATHS, WamConfig
from wam.platform.errors import CheckpointError, ConfigError
from wam.trainer.checkpoint_reader import open_quantized
from wam.trainer.model.model import WamModel
from wam.trainer.quantize import nvfp4
from wam.trainer.quantize.quantizer import FORMAT, INDEX, POLICY, SUFFIXES

PATHS = tuple(p for p in COMPUTE_PATHS if p != "auto")
NEEDS = {"nvfp4": ((10, 0), "Blackwell"), "fp8": ((8, 9), "Hopper or Ada")}  # the least compute capability


@dataclass
class QuantizedPolicy:
    model: WamModel
    config: WamConfig  # the training config
    step: int
    compute_path: str  # one of PATHS
    embodiments: dict[str, dict]  # profile name -> {"profile", "stats", "dataset", "control_hz" (its fps; newer)}
    source: str  # the checkpoint it was quantized from
    uri: str  # the quantized folder it was loaded from (a guidance peer loads it too)


def choose_path(capability: tuple[int, int] | None, kernels: set[str]) -> str:
    """The fastest path of a device: `capability` None for the CPU; `kernels` the low-precision paths whose
    torchao kernels import here."""
    if capability is None:
        return "fp32-dequantized"
    return next((p for p in ("nvfp4", "fp8") if capability >= NEEDS[p][0] and p in kernels), "bf16-dequantized")


def _torchao_kernels() -> set[str]:
    kernels = set()
    for path, module in (("nvfp4", "torchao.prototype.mx_formats.nvfp4_tensor"), ("fp8", "torchao.quantization")):
        try:
            importlib.import_module(module)
            kernels.add(path)
        except ImportError:
            pass
    return kernels


def compute_path(device: torch.device) -> str:
    if device.type != "cuda":
        return choose_path(None, set())
    return choose_path(torch.cuda.get_device_capability(device), _torchao_kernels())


def check_path(path: str, device: torch.device, key: str) -> None:
    """Refuse a compute path named by `key` that `device` cannot run."""
    if path not in PATHS:
        raise ConfigError(f"{key} = {path!r} is not one of auto, {', '.join(PATHS)}")
    if path not in NEEDS:
        return
    (major, minor), chips = NEEDS[path]
    has = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if has is None or has < (major, minor):
        raise ConfigError(f"{key} = {path} needs a CUDA GPU of compute capability >= {major}.{minor} ({chips}); "
                          f"{device} has {'none' if has is None else '.'.join(map(str, has))}; use auto")


def _as_torchao(q: nvfp4.NVFP4Weight) -> torch.nn.Parameter:
    """The same bytes as a torchao NVFP4Tensor (layouts agree, see tests/test_quantize.py) whose F.linear
    quantizes activations to NVFP4 and calls the FP4 tensor-core matmul."""
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, QuantizeTensorToNVFP4Kwargs

    weight = NVFP4Tensor(q.packed, q.scales, nvfp4.BLOCK, torch.bfloat16, q.global_scale, None, False, False,
                         QuantizeTensorToNVFP4Kwargs())
    return torch.nn.Parameter(weight, requires_grad=False)


def load_quantized(uri: str, device: torch.device | str = "cpu", path: str | None = None) -> QuantizedPolicy:
    """`path` (a flag's value) outranks the model config's serving.compute; auto picks by the device."""
    device = torch.device(device)
    stored, folder = open_quantized(uri)
    policy = json.loads((folder / POLICY).read_text())
    if policy.get("format") != FORMAT:
        raise CheckpointError(f"{uri} holds format {policy.get('format')!r}; this version reads {FORMAT}")
    key = "--compute" if path else "serving.compute"
    path = path or stored.config.serving.compute
    if path == "auto":
        path = compute_path(device)
    else:
        check_path(path, device, key)
    dtype = torch.float32 if path == "fp32-dequantized" else torch.bfloat16
    model = stored.skeleton(dtype)
    model.to_empty(device=device)
    index = json.loads((folder / INDEX).read_text())
    quantized = set(index["metadata"]["nvfp4"])
    targets = dict(model.state_dict())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), framework="pt", device=str(device)) as f:
            names = set(f.keys())
            for name in sorted(n for n in quantized if f"{n}.packed" in names):
                q = nvfp4.NVFP4Weight(*(f.get_tensor(f"{name}.{s}") for s in SUFFIXES))
                if path == "nvfp4":
                    module_name, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(module_name), attr, _as_torchao(q))
                else:
                    targets[name].copy_(nvfp4.dequantize(q, dtype))
            for name in names - {f"{n}.{s}" for n in quantized for s in SUFFIXES}:
                targets[name].copy_(f.get_tensor(name).to(dtype))
    if path == "fp8":  # the layers NVFP4 quantized (the others stay bf16, as quantization kept them)
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        layers = {name.rpartition(".")[0] for name in quantized}
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda _, fqn: fqn in layers)
    model.eval().requires_grad_(False)
    return QuantizedPolicy(model, stored.config, stored.step, path, policy["embodiments"], policy["source"], uri)
