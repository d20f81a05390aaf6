"""`wam plan` checked against real runs, next to the static estimate it replaces; and its time for the 14B.

    python benchmarks/plan.py                 # tiny at 1 and 2 processes, then dreamzero-14b on 64 H100s
    python benchmarks/plan.py --skip-14b

Tiny: the traced peak tensor memory per rank (fake tensors, fake process group) and accounting.estimate_memory
against the same step measured on real tensors (torchrun, gloo; torch's FSDPMemTracker on the real run), as
relative errors. 14B: the wall time of `wam plan configs/dreamzero-14b.yaml --accelerator h100 --gpus 64` (a
fresh trace, activation checkpointing full, micro-batch 1) and what it reports next to the static estimate.
Compile, which `wam plan` cannot trace (dynamo does not run under torch's memory tracker): the bytes autograd saves
for backward in one tiny training step with eager blocks against blocks compiled as `training.compile` compiles
them (inductor, whose partitioner chooses what is saved), no activation checkpointing: how far above a compiled
run the eager trace's activations are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny(workdir: Path) -> dict:
    from wam.platform.accounting import estimate_memory
    from wam.platform.config import load_config, resolve_preset
    from wam.platform.plan import TracedStep
    from wam.trainer.titan.plan import trace

    config = REPO / "configs" / "tiny.yaml"
    overrides = [f"output_dir={workdir}", "training.batch_size=2"]
    cfg = load_config(config, overrides)
    preset = resolve_preset(cfg)
    rows = {}
    for n in (1, 2):
        out = workdir / f"real{n}.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                        "-m", "wam.trainer.titan.plan", str(config), str(out), *overrides], check=True,
                       capture_output=True)
        measured = TracedStep.from_json(out.read_text()).peak_bytes
        traced = trace(cfg, n, attention="sdpa").peak_bytes  # the kernel the real CPU run uses
        estimate = estimate_memory(preset.arch, preset.sample, n, batch_per_gpu=2, activation_checkpointing=False)
        static = estimate.total - estimate.frozen_encoders  # the measured step holds no encoders either
        rows[n] = {"measured_bytes": measured, "traced_bytes": traced, "static_bytes": static,
                   "traced_error": traced / measured - 1, "static_error": static / measured - 1}
    return rows


def saved_for_backward(compiled: bool) -> int:
    """Bytes of the distinct storages autograd saves in one tiny forward + backward (second step: compiled warm)."""
    import torch

    from wam.platform.presets import get_preset
    from wam.trainer.model import WamInputs, build_model, model_config

    tiny = get_preset("tiny")
    model = build_model(model_config(tiny.arch, tiny.sample), seed=0).train()
    if compiled:
        for block in model.blocks:
            block.compile(backend="inductor")  # as parallelize_wam does for training.compile
    inputs = WamInputs.random(tiny.arch, tiny.sample, batch=2)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for _ in range(2):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(inputs)
            loss = out.video.square().mean() + out.actions.square().mean()
        loss.backward()
    return sum(saved.values())


def compile_effect() -> dict:
    eager, compiled = saved_for_backward(False), saved_for_backward(True)
    return {"eager_bytes": eager, "compiled_bytes": compiled, "eager_over_compiled": eager / compiled - 1}


def dreamzero_14b(workdir: Path) -> dict:
    wam = Path(sys.executable).parent / "wam"
    started = time.monotonic()
    result = subprocess.run([str(wam), "plan", str(REPO / "configs" / "dreamzero-14b.yaml"), "--accelerator", "h100",
                             "--gpus", "64", "--fresh", "--json", "--set", "training.activation_checkpointing=full",
                             "--set", "training.batch_size=1", "--set", f"output_dir={workdir}"],
                            capture_output=True, text=True, env={**__import__("os").environ,
                                                                  "WAM_PLAN_CACHE": str(workdir / "plans")})
    if result.returncode != 0:
        raise RuntimeError(result.stdout + result.stderr)
    return {"wall_s": time.monotonic() - started, "plan": json.loads(result.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-14b", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results = {"tiny": tiny(workdir)}
        for n, row in results["tiny"].items():
            print(f"tiny, {n} process(es): measured {row['measured_bytes'] / 2**20:.2f} MiB; traced "
                  f"{row['traced_error']:+.2%}, static estimate {row['static_error']:+.2%}")
        results["compile"] = compile_effect()
        c = results["compile"]
        print(f"tiny, saved for backward: eager blocks {c['eager_bytes'] / 2**20:.2f} MiB, compiled "
              f"{c['compiled_bytes'] / 2**20:.2f} MiB: eager {c['eager_over_compiled']:+.1%}")
        if not args.skip_14b:
            results["dreamzero-14b"] = dreamzero_14b(workdir)
            plan = results["dreamzero-14b"]["plan"]
            print(f"dreamzero-14b on 64 H100: wam plan took {results['dreamzero-14b']['wall_s']:.0f} s; "
                  f"{plan['memory_gib_per_gpu']['total']:.1f} GiB per GPU, step {plan['step']['step_s']:.1f} s, "
                  f"MFU {plan['step']['mfu']:.0%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
