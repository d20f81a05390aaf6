"""Ahead-of-time compilation of the attention kernels for GPU targets, on any machine.

Triton's CUDA backend and the ptxas it ships compile for a GPU target without a GPU, so a CPU machine can
check what would otherwise show up only on the cluster: every tuned configuration compiles for Hopper
(sm_90a) and Blackwell (sm_100a), uses the target's tensor-core instructions (wgmma / tcgen05), spills no
registers and fits in shared memory. `python -m wam.trainer.kernels.aot` prints the table.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
import triton.backends.nvidia
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from wam.trainer.kernels import triton_attention as kernels
from wam.trainer.kernels.schedule import PassConfig
from wam.trainer.kernels.tuning import CANDIDATES


@dataclass(frozen=True)
class Target:
    capability: int
    max_shared_bytes: int  # opt-in dynamic shared memory per block
    tensor_core_instruction: str  # in the PTX when tl.dot maps to the architecture's tensor cores


TARGETS = {"hopper": Target(90, 232_448, "wgmma"), "blackwell": Target(100, 232_448, "tcgen05")}

# Which kernel parameter of a pass's config is the owned block and which the looped-over tile.
_PASSES = {
    "forward": (kernels.attention_forward, "BLOCK_M", "BLOCK_N"),
    "dq": (kernels.attention_backward_dq, "BLOCK_M", "BLOCK_N"),
    "dkdv": (kernels.attention_backward_dkdv, "BLOCK_N", "BLOCK_M"),
}
_INPUTS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}  # tensors of the input dtype
_FP32 = {"LSE", "DELTA", "DLSE", "cos_q", "sin_q", "cos_k", "sin_k"}
_FLOATS = {"qk_scale", "sm_scale"}


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    arch: str
    config: PassConfig
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_cores: bool

    def fits(self) -> bool:
        return self.spill_bytes == 0 and self.shared_bytes <= TARGETS[self.arch].max_shared_bytes and self.tensor_cores


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Types of every parameter, and 16-divisibility of pointers and strides, as the JIT would specialise
    them for real tensors (sequence lengths are left unaligned, like the 14B's 13,300 tokens)."""
    names = list(inspect.signature(fn.fn).parameters)
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INPUTS:
            signature[name] = f"*{dtype}"
        elif name in _FP32:
            signature[name] = "*fp32"
        elif name in _FLOATS:
            signature[name] = "fp32"
        elif name in ("q_meta", "k_meta", "rows", "tiles"):
            signature[name] = "*i32"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes per thread, i.e. spills) from cuobjdump of the cubin."""
    tool = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    return int(re.search(r"REG:(\d+)", report).group(1)), int(re.search(r"LOCAL:(\d+)", report).group(1))


def compile_pass(name: str, arch: str, config: PassConfig, head_dim: int = 128, dtype: str = "bf16",
                 rope: bool = False) -> CompiledKernel:
    if knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET=1 replaced the kernels by interpreted ones: compile ahead of time in a "
                           "process without it")
    fn, block_param, tile_param = _PASSES[name]
    constexprs = {"HEAD_DIM": head_dim, block_param: config.block, tile_param: config.tile, "ROPE": rope,
                  "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    signature, attrs = _signature(fn, dtype, constexprs)
    target = TARGETS[arch]
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", target.capability, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    registers, spills = _resource_usage(compiled.asm["cubin"])
    return CompiledKernel(name, arch, config, registers, spills, compiled.metadata.shared,
                          target.tensor_core_instruction in compiled.asm["ptx"])


def candidates(arch: str, only_default: bool = False) -> list[tuple[str, PassConfig]]:
    return [(name, config) for name, configs in CANDIDATES[arch].items()
            for config in (configs[:1] if only_default else configs)]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-only", action="store_true", help="only the first candidate of each pass")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rope", action="store_true", help="the fused-RoPE variants")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel instead of a table")
    args = parser.parse_args()
    if not args.json:
        print(f"{'arch':10} {'pass':8} {'block x tile':>12} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} "
              f"{'smem KB':>7}  tensor cores")
    for arch in TARGETS:
        for name, config in candidates(arch, args.default_only):
            k = compile_pass(name, arch, config, args.head_dim, rope=args.rope)
            if args.json:
                print(json.dumps({**dataclasses.asdict(k), "fits": k.fits()}), flush=True)
                continue
            print(f"{arch:10} {name:8} {config.block:>5} x {config.tile:<4} {config.num_warps:>5} {config.num_stages:>6} "
                  f"{k.registers:>5} {k.spill_bytes:>7} {k.shared_bytes / 1024:>7.1f}  "
                  f"{TARGETS[arch].tensor_core_instruction if k.tensor_cores else 'NO'}", flush=True)


if __name__ == "__main__":
    main()
