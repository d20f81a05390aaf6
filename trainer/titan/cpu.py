"""Running torchtitan's Trainer on CPU processes (gloo). Imported only where no accelerator exists,
before torchtitan itself: GPU runs never load this module.

torchtitan resolves its device to "cuda" when torch reports none (then picks nccl and calls
torch.cuda.set_device), measures CUDA memory every step, and synchronises with a CUDA barrier. Here the
device is "cpu" (gloo, no set_device), the memory monitor reports zeros, and the barrier is a plain one.
FSDP's gradient reduction, which gloo cannot do as PREMUL_SUM, is forced to SUM in parallelize.py.
"""

import sys

import torch
import torch._utils

if torch.cuda.is_available():
    raise RuntimeError("wam.trainer.titan.cpu is for machines without an accelerator")

torch._utils._get_available_device_type = lambda: "cpu"
# torchtitan resolves the device once, when torchtitan.tools.utils is first imported, and its modules copy it
# (`from torchtitan.tools.utils import device_type`). Where torchtitan came first (the model imports its
# protocols), the copies already loaded are corrected too.
for _module in [m for name, m in sys.modules.items() if name.startswith("torchtitan.")]:
    if getattr(_module, "device_type", None) == "cuda":
        _module.device_type = "cpu"
    if getattr(_module, "device_module", None) is torch.cuda:
        _module.device_module = torch.cpu

import torchtitan.components.metrics as _metrics  # noqa: E402  (after the device type is fixed)
import torchtitan.distributed.utils as _dist_utils  # noqa: E402


class _NoDeviceMemory:
    device_name = "cpu"

    def get_peak_stats(self):
        return _metrics.DeviceMemStats(0.0, 0.0, 0.0, 0.0, 0, 0)

    def reset_peak_stats(self) -> None:
        pass


def _set_pg_timeouts(timeout, parallel_dims) -> None:
    torch.distributed.barrier()
    groups = [mesh.get_group() for mesh in parallel_dims.get_all_one_dimensional_meshes().values()] + [None]
    for group in groups:
        torch.distributed.set_timeout(timeout, group)


_metrics.build_device_memory_monitor = _NoDeviceMemory
_dist_utils.set_pg_timeouts = _set_pg_timeouts
