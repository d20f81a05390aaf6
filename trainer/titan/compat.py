"""Shims for the torch releases the platform runs on (2.13.0 here, 2.11 on the GPU machines lent so far) that every
run needs, accelerator or not (imported before torchtitan)."""

import dataclasses

import torch.distributed as dist
import torch.distributed.fsdp as fsdp
from torch.distributed import distributed_c10d

# torchtitan sets the training-phase collective timeout with torch.distributed.set_timeout, which this
# torch release only has as the private _set_pg_timeout (same arguments: timeout, group).
if not hasattr(dist, "set_timeout"):
    dist.set_timeout = distributed_c10d._set_pg_timeout

# torchtitan's Trainer imports torch.distributed.fsdp.DataParallelMeshDims (torch >= 2.12) for its full-DTensor
# backend only, which the platform never selects; on torch 2.11 a stand-in of the same fields lets it import.
if not hasattr(fsdp, "DataParallelMeshDims"):

    @dataclasses.dataclass(frozen=True)
    class DataParallelMeshDims:
        shard: str | None = None
        replicate: str | None = None

    fsdp.DataParallelMeshDims = DataParallelMeshDims
