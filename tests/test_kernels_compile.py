"""The attention kernels compile for the GPUs the platform targets, on this machine: Triton's CUDA backend
and its ptxas need no GPU. Each pass's default tile configuration (the one that runs before tuning) must
compile for Hopper (sm_90a) and Blackwell (sm_100a), map tl.dot onto the architecture's tensor cores,
spill no registers and fit in shared memory. `python -m wam.trainer.kernels.aot` checks every candidate.

The compiler runs in a subprocess: this test process runs the kernels in Triton's interpreter (conftest)."""

import json
import os
import subprocess
import sys

import pytest


def compile_report(*flags: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "wam.trainer.kernels.aot", "--json", *flags], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.slow
def test_default_configs_compile_for_hopper_and_blackwell_without_spills():
    kernels = compile_report("--default-only")
    assert {(k["arch"], k["name"]) for k in kernels} == {(a, p) for a in ("hopper", "blackwell")
                                                          for p in ("forward", "dq", "dkdv")}
    for k in kernels:
        where = f"{k['name']} on {k['arch']} {k['config']}"
        assert k["tensor_cores"], f"{where}: tl.dot does not use the tensor cores"
        assert k["spill_bytes"] == 0, f"{where}: {k['spill_bytes']} bytes of register spills"
        assert k["fits"], where
