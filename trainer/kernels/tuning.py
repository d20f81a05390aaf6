"""Tile configurations of the attention kernels per GPU architecture, and the tuner that picks one.

Tile sizes decide the schedule (which tiles exist, how many are partial), so configurations are tuned
per layout rather than through `triton.autotune` (whose configs cannot change the schedule's tensors):
the first call for a (device, dtype, head size, heads, batch, layouts) key times every candidate of each
pass on the real inputs and keeps the fastest; later calls reuse it. The candidates are the usual
FlashAttention-2 shapes for head dims up to 128: Hopper (sm_90, 228 KB shared memory, wgmma) and
Blackwell (sm_100 / GB200, tcgen05) take 128-row blocks with 8 warps; older or smaller parts smaller ones.
`tests/test_kernels_compile.py` compiles every candidate for sm_90a and sm_100a and checks it fits.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from wam.trainer.kernels.schedule import KernelConfigs, PassConfig

# (block the program owns, tile it loops over, warps, pipeline stages)
CANDIDATES: dict[str, dict[str, tuple[PassConfig, ...]]] = {
    "hopper": {
        "forward": (PassConfig(128, 64, 8, 3), PassConfig(128, 128, 8, 2), PassConfig(128, 64, 4, 3),
                    PassConfig(64, 64, 4, 3)),
        "dq": (PassConfig(128, 64, 8, 2), PassConfig(64, 64, 4, 3), PassConfig(128, 32, 4, 3)),
        "dkdv": (PassConfig(128, 64, 8, 2), PassConfig(64, 64, 4, 3), PassConfig(128, 32, 4, 3)),
    },
    "blackwell": {
        "forward": (PassConfig(128, 128, 8, 2), PassConfig(128, 64, 8, 3), PassConfig(128, 64, 4, 3),
                    PassConfig(64, 64, 4, 3)),
        "dq": (PassConfig(128, 64, 8, 2), PassConfig(128, 32, 4, 3), PassConfig(64, 64, 4, 3)),
        "dkdv": (PassConfig(128, 64, 8, 2), PassConfig(128, 32, 4, 3), PassConfig(64, 64, 4, 3)),
    },
    "other": {  # Ampere/Ada and consumer parts: ~100-164 KB shared memory
        "forward": (PassConfig(64, 64, 4, 2), PassConfig(128, 32, 4, 2)),
        "dq": (PassConfig(64, 32, 4, 2), PassConfig(64, 64, 4, 2)),
        "dkdv": (PassConfig(64, 32, 4, 2), PassConfig(64, 64, 4, 2)),
    },
}
ARCHITECTURES = {9: "hopper", 10: "blackwell"}  # compute capability major -> candidates

# Triton's interpreter (CPU tests): small tiles keep several tiles per sequence, so full, partial and
# bounded tiles all occur on short test sequences.
INTERPRETER = KernelConfigs(PassConfig(32, 16), PassConfig(16, 32), PassConfig(32, 16))


def architecture(device: torch.device) -> str:
    return ARCHITECTURES.get(torch.cuda.get_device_capability(device)[0], "other")


def default_configs(arch: str) -> KernelConfigs:
    """The first candidate of each pass: what runs before (or without) tuning."""
    table = CANDIDATES[arch]
    return KernelConfigs(table["forward"][0], table["dq"][0], table["dkdv"][0])


_tuned: dict[tuple, KernelConfigs] = {}
_timings: dict[tuple, dict[str, dict[str, float]]] = {}  # key -> pass -> candidate -> ms (benchmarks report them)


def tuned_configs(key: tuple, arch: str, time_pass) -> KernelConfigs:
    """Fastest candidate per pass for `key`; `time_pass(name, configs)` times pass `name` (forward, dq or
    dkdv) under `configs` in milliseconds. Passes are tuned in order, each with the earlier winners fixed.

    The kernels are deterministic for given tile sizes, but tile sizes change the order of floating-point
    sums: WAM_ATTENTION_TUNING=off pins the default configs, so reruns and resumed runs are bit-identical
    even when timing noise would pick another winner."""
    if os.environ.get("WAM_ATTENTION_TUNING", "on") == "off":
        return default_configs(arch)
    if key not in _tuned:
        chosen = default_configs(arch)
        _timings[key] = {}
        for name in ("forward", "dq", "dkdv"):
            timings = {c: time_pass(name, dataclasses.replace(chosen, **{name: c})) for c in CANDIDATES[arch][name]}
            chosen = dataclasses.replace(chosen, **{name: min(timings, key=timings.get)})
            _timings[key][name] = {str(c): ms for c, ms in timings.items()}
        _tuned[key] = chosen
    return _tuned[key]


def tuning_log() -> list[dict]:
    """Every tuning of this process: the key, the chosen configs and each candidate's time per pass."""
    return [{"key": str(key), "chosen": {name: str(getattr(configs, name)) for name in ("forward", "dq", "dkdv")},
             "candidate_ms": _timings.get(key, {})} for key, configs in _tuned.items()]

