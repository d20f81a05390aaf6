"""Accelerator profiles: what the platform schedules onto and what MFU is measured against."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_bf16_flops: float  # dense bf16 tensor-core peak per device (the MFU denominator)
    memory_gib: float
    devices_per_node: int
    cpu_arch: str  # amd64 | arm64


ACCELERATORS = {
    a.name: a
    for a in (
        Accelerator("h100", 989e12, 80, 8, "amd64"),
        Accelerator("h200", 989e12, 141, 8, "amd64"),
        Accelerator("gb200", 2.5e15, 186, 4, "arm64"),
    )
}


def detect(device_name: str) -> Accelerator | None:
    """The profile of a device by its reported name (e.g. torch.cuda.get_device_name()), if known."""
    name = device_name.upper()
    for key in ("GB200", "H200", "H100"):  # GB200 before B200-like substrings; H200 before H100
        if key in name:
            return ACCELERATORS[key.lower()]
    return None
