"""Shims for torch 2.13.0 that every run needs, accelerator or not (imported before torchtitan)."""

import torch.distributed as dist
from torch.distributed import distributed_c10d

# torchtitan sets the training-phase collective timeout with torch.distributed.set_timeout, which this
# torch release only has as the private _set_pg_timeout (same arguments: timeout, group).
if not hasattr(dist, "set_timeout"):
    dist.set_timeout = distributed_c10d._set_pg_timeout
