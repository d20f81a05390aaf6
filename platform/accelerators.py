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
    # Roofline of `wam plan` (bytes/s, one direction, per device): HBM, NVLink within the NVLink domain, and the
    # scale-out network (InfiniBand) between domains.
    hbm_bytes_per_s: float = 0.0
    nvlink_bytes_per_s: float = 0.0
    network_bytes_per_s: float = 0.0
    nvlink_domain: int = 8  # GPUs one NVLink fabric connects (a node; GB200 NVL72: the whole rack)
    # Dense low-precision tensor-core peaks (0: none): the serving roofline's quantized matmuls.
    peak_fp8_flops: float = 0.0
    peak_fp4_flops: float = 0.0

    @property
    def serving_compute(self) -> str:
        """The matmul path a server chooses on this chip (serving.compute: auto): NVFP4 on Blackwell, FP8 on
        Hopper."""
        return "nvfp4" if self.peak_fp4_flops else "fp8" if self.peak_fp8_flops else "bf16-dequantized"


ACCELERATORS = {
    a.name: a
    for a in (
        # NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3, NVLink 4 900 GB/s (both directions); one 400 Gb/s
        # ConnectX-7 InfiniBand port per GPU (DGX H100); FP8 1,979 TFLOP/s dense.
        Accelerator("h100", 989e12, 80, 8, "amd64", 3.35e12, 450e9, 50e9, 8, peak_fp8_flops=1979e12),
        # H200 SXM datasheet: 4.8 TB/s HBM3e; NVLink, networking and tensor cores as H100 (HGX H200).
        Accelerator("h200", 989e12, 141, 8, "amd64", 4.8e12, 450e9, 50e9, 8, peak_fp8_flops=1979e12),
        # GB200 NVL72 datasheet: 8 TB/s HBM3e per GPU, NVLink 5 1.8 TB/s (both directions) across all 72 GPUs of
        # the rack; 800 Gb/s ConnectX-8 per GPU between racks; FP8 5 and FP4 10 PFLOP/s dense per GPU.
        Accelerator("gb200", 2.5e15, 186, 4, "arm64", 8e12, 900e9, 100e9, 72, peak_fp8_flops=5e15,
                    peak_fp4_flops=10e15),
    )
}


def detect(device_name: str) -> Accelerator | None:
    """The profile of a device by its reported name (e.g. torch.cuda.get_device_name()), if known."""
    name = device_name.upper()
    for key in ("GB200", "H200", "H100"):  # GB200 before B200-like substrings; H200 before H100
        if key in name:
            return ACCELERATORS[key.lower()]
    return None
