"""Known-harmless messages of third-party libraries, dropped where they are logged, so that what a person sees is
ours and real. Only these exact messages go; everything else those libraries log still shows.

- torchao logs "Failed to load .../torchao/_C_*.so" for its CUDA extension libraries wherever they cannot load
  (every CPU machine); the Python paths we use (NVFP4 reference, float8 configs) do not need them.
- torch 2.13 logs a deprecation for each Enum that torchao registers with pytree.register_constant on import.
- On CPU-only machines (gloo), torch warns that DTensor's random ops "may not have complete support", and
  torchtitan that it cannot find `lspci` or a peak FLOP/s for "cpu" (MFU is not reported on CPUs anyway).

Imported by `wam.trainer` itself, so it is in place before any of those libraries is.
"""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


logging.getLogger("torchao").addFilter(_DropMessages("/torchao/_C"))
logging.getLogger("torch.utils._pytree").addFilter(
    _DropMessages("is an Enum subclass and is now natively supported by torch.compile"))
# torchtitan logs on the root logger; its CPU-only complaints, nothing else
logging.getLogger().addFilter(_DropMessages("Error running lspci", "Peak flops undefined for: cpu"))
warnings.filterwarnings("ignore", message="DTensor (random operators|manual_seed\\(\\)) may not have complete support "
                                          "on cpu device mesh", category=UserWarning)
