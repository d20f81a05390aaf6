"""Loading an NVFP4 model folder (quantize/checkpoint.py) into a runnable WamModel.

Which matmuls run depends on the device, and the server reports it:
  nvfp4            Blackwell (compute capability >= 10) with torchao: the packed weights stay FP4 and
                   torchao's NVFP4Tensor runs real FP4 matmuls (activations quantized on the fly)
  bf16-dequantized other GPUs: weights dequantized once to bfloat16
  fp32-dequantized CPU: weights dequantized once to float32 (weight-only emulation of the NVFP4 numerics)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors import safe_open

from wam.platform.config import WamConfig
from wam.platform.errors import CheckpointError
from wam.trainer.checkpoint_reader import open_quantized
from wam.trainer.model.model import WamModel
from wam.trainer.quantize import nvfp4
from wam.trainer.quantize.quantizer import FORMAT, INDEX, POLICY, SUFFIXES

PATHS = ("nvfp4", "bf16-dequantized", "fp32-dequantized")


@dataclass
class QuantizedPolicy:
    model: WamModel
    config: WamConfig  # the training config
    step: int
    compute_path: str  # one of PATHS
    embodiments: dict[str, dict]  # profile name -> {"profile", "stats", "dataset"}
    source: str  # the checkpoint it was quantized from


def compute_path(device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32-dequantized"
    if torch.cuda.get_device_capability(device) >= (10, 0):
        try:
            import torchao.prototype.mx_formats.nvfp4_tensor  # noqa: F401
        except ImportError:
            return "bf16-dequantized"
        return "nvfp4"
    return "bf16-dequantized"


def _as_torchao(q: nvfp4.NVFP4Weight) -> torch.nn.Parameter:
    """The same bytes as a torchao NVFP4Tensor (layouts agree, see tests/test_quantize.py) whose F.linear
    quantizes activations to NVFP4 and calls the FP4 tensor-core matmul."""
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, QuantizeTensorToNVFP4Kwargs

    weight = NVFP4Tensor(q.packed, q.scales, nvfp4.BLOCK, torch.bfloat16, q.global_scale, None, False, False,
                         QuantizeTensorToNVFP4Kwargs())
    return torch.nn.Parameter(weight, requires_grad=False)


def load_quantized(uri: str, device: torch.device | str = "cpu", path: str | None = None) -> QuantizedPolicy:
    device = torch.device(device)
    stored, folder = open_quantized(uri)
    policy = json.loads((folder / POLICY).read_text())
    if policy.get("format") != FORMAT:
        raise CheckpointError(f"{uri} holds format {policy.get('format')!r}; this version reads {FORMAT}")
    path = path or compute_path(device)
    if path not in PATHS:
        raise ValueError(f"compute path {path!r} is not one of {', '.join(PATHS)}")
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
    model.eval().requires_grad_(False)
    return QuantizedPolicy(model, stored.config, stored.step, path, policy["embodiments"], policy["source"])
