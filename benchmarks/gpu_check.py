"""Every GPU claim of the platform, measured by one command. Measured on one H200 (2026-12-04, two leases): env 5 s,
plan 46 s, engine 148-274 s, serve 63-75 s; pytest passed 11 of its 15 tests in 255 s (flex_attention and the
Triton kernels compile cold on first use) and needs its full limit; attention, train and trainer not yet run
there; the engine section now also runs the tiny and 512-wide models compiled (limit 480 s). The whole check
outgrows one 10-minute command: run it as two, `--only env,engine,serve` then `--only pytest,plan,trainer,attention,
train`, both with `--compile-cache` on the same file (the first command copies its OUT/compile-cache.tar.gz
there), so that the second starts warm.

    python benchmarks/gpu_check.py OUT                  # on a GPU machine (`make gpu-bundle` prepares one
                                                        # that lacks this project's dependencies)
    python benchmarks/gpu_check.py OUT --cpu            # the dry run: every section's CPU mode (`make gpu-dryrun`)
    python benchmarks/gpu_check.py OUT --only attention,train --limit train=300     # a rerun of some sections
    python benchmarks/gpu_check.py OUT --compile-cache runs/gpu-cache/compile-cache.tar.gz   # start warm

Compiling flex_attention, the Triton kernels and the compiled engine cold took most of the pytest section's
time on the H200. `--compile-cache FILE` starts every section with inductor's and Triton's caches unpacked from
FILE (the OUT/compile-cache.tar.gz a previous run on the same software wrote) and writes the caches, grown by
this run, to OUT/compile-cache.tar.gz; carry it to the next lease.

Sections, each in its own process under its own time limit: one that fails or runs out of time is reported,
and the others still run.
  env        software versions, the GPU, nvidia-smi, the bf16 matmul ceiling measured on this machine
  pytest     the GPU-marked tests (on CPU: the Triton kernels in Triton's interpreter; the GPU tests collected)
  attention  benchmarks/attention.py at the 14B head layout, 4 and 8 chunks: Triton (tuning timed apart) vs
             compiled flex_attention vs masked SDPA vs dense SDPA, forward and forward+backward
  train      a training step at the 14B block width (benchmarks/train_step.py's parallelized_step), with the
             Triton and the flex backend: step time, tokens/s, MFU, peak memory next to the estimate
  serve      per-chunk denoising latency at the 14B block width, KV cache vs recomputing, 1 and 4 steps; and
             DreamZero's sampler built up (UniPC 16 steps, guidance batched or as two passes, the DiT cache);
             one served chunk's attention unmasked but for its state row vs under the dense mask; where a
             chunk's time goes at DreamZero's sampler (the profiler's top kernels: matmul, attention, other)
  trainer    `wam train`'s own process: torchtitan's Trainer under torchrun on one GPU (NCCL, bf16, FSDP2, the
             Triton attention kernels, a DCP checkpoint): the tiny preset, 20 steps; losses, tokens/s, memory
  plan       `wam plan`'s traced peak memory per rank against the same step run for real at the 14B block width
             (2 blocks, activation checkpointing full, Triton attention on both sides): torch's memory tracker and
             torch.cuda.max_memory_allocated
  engine     the fast engine's ablation at the 14B block width, bf16 (benchmarks/serve.py --ablation: guidance
             batched / on two GPUs, DiT cache, compile + CUDA graphs, FP8 or NVFP4, Flash 1 step) and 1/4/8
             concurrent sessions batched vs one at a time; on a GPU also for the tiny preset and 3 blocks of
             width 512, whose forwards leave the GPU mostly idle, eager and compiled + CUDA graphs
What a section needs and this machine lacks (no CUDA device, an older Triton, torchtitan's Trainer on an
older torch) is found before anything runs and reported as skipped, with the reason.

Writes OUT/gpu_check.json, OUT/gpu_check.md (the summary, with each target met or missed) and
OUT/sections.log (every section's output); exits 1 if a section failed or ran out of time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
MIN_TORCH, MIN_TRITON = (2, 11), (3, 6)  # the oldest releases these checks are proven on (`make gpu-dryrun`)


@dataclass(frozen=True)
class Section:
    name: str
    limit_s: float  # on a GPU; CPU modes get CPU_LIMIT_S
    needs: tuple[str, ...]  # capabilities checked up front (see `missing`)
    about: str


SECTIONS = {s.name: s for s in (
    Section("env", 20, (), "versions, nvidia-smi, bf16 matmul ceiling"),
    Section("pytest", 420, ("triton",), "pytest -m gpu"),
    Section("attention", 150, ("triton", "flex"), "Triton vs flex vs SDPA at the 14B head layout"),
    Section("train", 150, ("triton", "flex", "titan-parallel"), "training step at the 14B block width"),
    Section("serve", 150, (), "chunk latency at the 14B block width, KV cache vs recompute"),
    Section("engine", 480, (), "the fast engine's ablation and concurrency at the 14B block width"),
    Section("trainer", 120, ("titan-trainer",), "torchtitan's Trainer end to end on one GPU (wam train's process)"),
    Section("plan", 90, ("triton", "titan-trainer"), "wam plan's traced memory vs the allocator's peak"),
)}
CPU_LIMIT_S = 600  # the dry run on a 2-core machine; Triton's interpreter is slow
CACHE_FILE, CACHE_MAX_BYTES = "compile-cache.tar.gz", 15 * 2**20  # what a device run may bring back: 16 MiB a file
TARGETS = (  # (section, what, path into its result, minimum); from the platform's performance goals
    ("attention", "Triton fwd+bwd vs compiled flex (time ratio), 4 chunks",
     ("layouts", "4_chunks", "triton_vs_flex_speedup_forward_backward"), 1.0),
    ("attention", "Triton fwd+bwd vs compiled flex (time ratio), 8 chunks",
     ("layouts", "8_chunks", "triton_vs_flex_speedup_forward_backward"), 1.0),
    ("attention", "Triton TFLOP/s per allowed FLOP vs dense SDPA, 4 chunks",
     ("layouts", "4_chunks", "triton_tflops_vs_dense_sdpa_forward_backward"), 0.6),
    ("attention", "Triton TFLOP/s per allowed FLOP vs dense SDPA, 8 chunks",
     ("layouts", "8_chunks", "triton_tflops_vs_dense_sdpa_forward_backward"), 0.6),
    ("train", "MFU % of 989 TFLOP/s, 14B width, Triton", ("triton", "mfu_pct"), 45.0),
    ("train", "MFU % of 989 TFLOP/s, 14B width, flex", ("flex", "mfu_pct"), 45.0),
    ("serve", "KV cache vs recompute at 4 chunks, 1 step (speed-up)", ("1_steps", "speedup_p50"), 5.0),
    ("serve", "KV cache vs recompute at 4 chunks, 4 steps (speed-up)", ("4_steps", "speedup_p50"), 5.0),
    ("plan", "traced peak memory vs torch.cuda.max_memory_allocated (1 - |error|)", ("device_accuracy",), 0.9),
    ("engine", "8 sessions batched vs one at a time (throughput ratio)",
     ("concurrency", "8_sessions_throughput_ratio"), 4.0),
    ("engine", "8 sessions batched vs one at a time, tiny preset (throughput ratio)",
     ("concurrency_tiny", "8_sessions_throughput_ratio"), 4.0),
    ("engine", "8 sessions batched vs one at a time, 512 wide (throughput ratio)",
     ("concurrency_wide", "8_sessions_throughput_ratio"), 4.0),
    ("engine", "8 sessions batched vs one at a time, tiny preset, compiled + CUDA graphs (throughput ratio)",
     ("concurrency_tiny_compiled", "8_sessions_throughput_ratio"), 4.0),
    ("engine", "8 sessions batched vs one at a time, 512 wide, compiled + CUDA graphs (throughput ratio)",
     ("concurrency_wide_compiled", "8_sessions_throughput_ratio"), 4.0),
)


# -- what this machine can run, found before anything runs ---------------------------------------------------

def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def capabilities(cpu: bool) -> dict[str, str | None]:
    """capability -> None if present, else why not. Imports only; nothing runs on a device."""
    import torch

    found: dict[str, str | None] = {}
    found["cuda"] = None if torch.cuda.is_available() else "no CUDA device (`--cpu` runs the dry run)"
    if _version(torch.__version__) < MIN_TORCH:
        found["torch"] = f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}"
    else:
        found["torch"] = None
    try:
        import triton

        old = _version(triton.__version__) < MIN_TRITON
        found["triton"] = f"Triton {triton.__version__} is older than 3.6" if old else None
    except ImportError as err:
        found["triton"] = f"Triton is not installed ({err})"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        found["flex"] = None
    except ImportError as err:
        found["flex"] = f"this torch has no flex_attention ({err})"
    for name, module in (("titan-parallel", "torchtitan.distributed.parallel_dims"),
                         ("titan-trainer", "wam.trainer.titan.trainer")):
        found[name] = _imports(module)
    return found


def _imports(module: str) -> str | None:
    """None if `module` imports in a fresh interpreter, else its error (a fresh one: a failed import of a
    package half-initialises it)."""
    run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    if run.returncode == 0:
        return None
    lines = run.stderr.strip().splitlines()
    return lines[-1] if lines else f"import {module} failed"


def missing(section: Section, found: dict[str, str | None], cpu: bool) -> str | None:
    needs = section.needs + (() if cpu or section.name == "env" else ("cuda",)) + ("torch",)
    reasons = [found[need] for need in needs if found.get(need)]
    return "; ".join(reasons) or None


# -- the sections (each runs in its own process: `--section NAME --result FILE`) ------------------------------

def section_env(cpu: bool, partial) -> dict:
    import torch

    result: dict = {"python": platform.python_version(), "torch": torch.__version__,
                    "cuda_runtime": torch.version.cuda, "machine": platform.machine(),
                    "cpu_count": os.cpu_count()}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    for name in ("torchtitan", "numpy", "safetensors"):
        try:
            from importlib.metadata import version

            result[name] = version(name)
        except Exception:  # noqa: BLE001 - absent is an answer
            result[name] = None
    bundle = REPO / ".gpu-bundle" / "bundle.json"
    result["bundle_commit"] = json.loads(bundle.read_text())["commit"] if bundle.exists() else None
    smi = shutil.which("nvidia-smi")
    result["nvidia_smi"] = (subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
                            if smi else "nvidia-smi not found")
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        result.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                      gpu_memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count)
    # The matmul ceiling on this machine, the roof every MFU here sits under (bf16 8192^3 on a GPU).
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (512, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(13):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    result["matmul"] = {"n": n, "dtype": str(dtype), "tflops": 2 * n**3 / statistics.median(times) / 1e12}
    return result


def section_pytest(cpu: bool, partial) -> dict:
    """The GPU-marked tests. On CPU: the Triton kernels in Triton's interpreter, their compilation for Hopper
    and Blackwell by this Triton (no GPU needed), and the GPU tests collected (skipped without CUDA)."""
    gpu_files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if "pytest.mark.gpu" in p.read_text())
    if cpu:
        runs = [["-m", "not slow", "tests/test_kernels.py", *gpu_files], ["tests/test_kernels_compile.py"]]
    else:  # the modules with the fewest GPU tests first: a run cut short by its limit still reaches each module
        runs = [["-m", "gpu", *sorted(gpu_files, key=lambda f: (REPO / f).read_text().count("def test_"))]]
    tests, codes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, args in enumerate(runs):
            report = Path(tmp) / f"junit-{i}.xml"
            run = subprocess.run([sys.executable, "-m", "pytest", "-q" if cpu else "-v", "-p", "no:cacheprovider", "-rs",
                                  "--durations=15",  # -v on a GPU: each test's name as it ends, kept if time runs out
                                  "-W", "ignore::DeprecationWarning", f"--junitxml={report}", *args], cwd=REPO)
            codes.append(run.returncode)
            tests += _junit(report) if report.exists() else []
    counts = {status: sum(t["status"] == status for t in tests) for status in ("passed", "failed", "skipped")}
    result = {"runs": runs, "counts": counts, "tests": tests}
    if any(code not in (0, 5) for code in codes) or counts["failed"]:  # 5: nothing collected
        raise SectionFailed(f"{counts['failed']} test(s) failed, exit codes {codes}", result)
    return result


def _junit(path: Path) -> list[dict]:
    import xml.etree.ElementTree as ET

    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status, message = "failed", (child.get("message") or "")[:300]
            elif child.tag == "skipped":
                status, message = "skipped", (child.get("message") or "")[:300]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status,
                      "seconds": float(case.get("time") or 0), "message": message})
    return tests


def section_attention(cpu: bool, partial) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "attention.json"
        subprocess.run([sys.executable, str(BENCHMARKS / "attention.py"), "--json", str(out),
                        *(["--quick"] if cpu else [])], check=True, cwd=REPO)
        return json.loads(out.read_text())


def section_train(cpu: bool, partial) -> dict:
    if cpu:  # torchtitan must resolve its device to the CPU before it is first imported
        import wam.trainer.titan.cpu  # noqa: F401
    sys.path.insert(0, str(BENCHMARKS))
    from train_step import WIDTH_14B, parallelized_step

    results = {}
    for attention in ("sdpa", "triton") if cpu else ("triton", "flex"):  # flex has no backward on CPU
        results[attention] = parallelized_step([] if cpu else WIDTH_14B, attention, device="cpu" if cpu else "cuda",
                                               steps=2 if cpu else 5, warmup=1 if cpu else 3)
        partial(results)  # kept if the section runs out of time at the next backend
    return results


def section_serve(cpu: bool, partial) -> dict:
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    from serve import (
        LastChunk,
        chunk_encoding,
        chunk_latency,
        chunk_profile,
        sampler_latency,
        served_attention,
    )

    device, repeats = ("cpu", 3) if cpu else ("cuda", 20)
    setup = (LastChunk(["sample.actions_per_chunk=24"], "cpu", torch.float32) if cpu else
             LastChunk(["model.preset=dreamzero-14b", "model.num_layers=2"], "cuda", torch.bfloat16))
    result = chunk_latency(setup, device, repeats)
    partial(result)
    result["samplers"] = sampler_latency(setup, device, repeats)
    partial(result)
    result["profile"] = chunk_profile(setup, device)
    partial(result)
    result["encoding"] = chunk_encoding(["sample.actions_per_chunk=24"] if cpu else ["model.preset=dreamzero-14b"],
                                        device, repeats)
    partial(result)
    return {**result, "served_attention": served_attention(device, torch.float32, 4, 3) if cpu else
            served_attention(device, torch.bfloat16, 40, repeats)}


def section_trainer(cpu: bool, partial) -> dict:
    """The training process `wam train` starts (wam.trainer.titan.train under torchrun, one process), on a config
    file as `wam train` writes it; the CLI itself is not used (the GPU machine's typer may differ)."""
    steps = 3 if cpu else 20
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "model": {"preset": "tiny", "attention": "sdpa" if cpu else "triton"},
            "training": {"steps": steps, "log_every": 1}, "checkpoint": {"interval": steps}, "output_dir": tmp}))
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                              "-m", "wam.trainer.titan.train", "--module", "wam.trainer.titan", "--config", "from_yaml"],
                             env={**os.environ, "WAM_CONFIG": str(config)}, cwd=tmp, capture_output=True, text=True)
        wall = time.monotonic() - started
        print(run.stdout[-4000:], run.stderr[-4000:], sep="\n")
        run_dir = Path(tmp) / "wam-run"
        records = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()
                   ] if (run_dir / "progress.jsonl").exists() else []
        manifests = sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("checkpoints/step-*/*.json"))
        result = {"exit_code": run.returncode, "wall_s": wall, "steps": len(records),
                  "losses": [r["loss"] for r in records], "checkpoint_files": manifests,
                  "tokens_per_s_last": records[-1]["tokens_per_s"] if records else None,
                  "memory": {k: v for k, v in (records[-1] if records else {}).items() if "memory" in k}}
    if run.returncode != 0 or len(records) != steps:
        raise SectionFailed(f"the training process exited with {run.returncode} after {len(records)} of {steps} "
                            "steps", result)
    return result


def section_plan(cpu: bool, partial) -> dict:
    """The traced step (fake tensors, fake process group of 1) and the same step run for real (a process group of
    1: NCCL on the GPU, gloo in the dry run, which compares with SDPA as tests/test_plan.py does)."""
    import torch

    from wam.platform.config import load_config
    from wam.platform.launch import free_port
    from wam.trainer.titan.plan import measure, trace

    overrides = (["training.batch_size=2"] if cpu else
                 ["model.preset=dreamzero-14b", "model.num_layers=2", "training.batch_size=1"])
    attention = "sdpa" if cpu else "triton"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "tiny.yaml",
                          [*overrides, "training.activation_checkpointing=full", f"output_dir={tmp}"])
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
        measured = measure(cfg, attention)
        traced = trace(cfg, 1, attention)
    result = {"attention": attention, "traced_bytes": traced.peak_bytes, "tracker_bytes": measured.peak_bytes,
              "traced_vs_tracker_error": traced.peak_bytes / measured.peak_bytes - 1,
              "traced_memory": traced.memory, "tracker_memory": measured.memory, "trace_s": traced.trace_seconds}
    if torch.cuda.is_available():
        device_peak = measured.extra["device_peak_bytes"]
        error = traced.peak_bytes / device_peak - 1
        result.update(device_peak_bytes=device_peak, traced_vs_device_error=error, device_accuracy=1 - abs(error))
    return result


def section_engine(cpu: bool, partial) -> dict:
    import tempfile

    sys.path.insert(0, str(BENCHMARKS))
    from serve import SOLVER_SHAPES, WIDE, ablation, concurrency, random_model, solver_batching

    device = "cpu" if cpu else "cuda"
    with tempfile.TemporaryDirectory() as tmp:  # 2 blocks of the 14B width (random weights: speed only)
        model = random_model(Path(tmp), [] if cpu else ["model.preset=dreamzero-14b", "model.num_layers=2"])
        results = {"ablation": ablation(model, device, 2, 1, None, on_row=lambda rows: partial({"ablation": rows}))}
        # 8 sessions' solver steps, batched vs one at a time (the engine batches them on CUDA)
        results["solver_batching"] = {name: solver_batching(overrides, device) for name, overrides in SOLVER_SHAPES}
        partial(results)
        results["concurrency"] = concurrency(model, device, (1, 4, 8), 1, None)
        # where one robot's forward leaves the GPU mostly idle (small models), batching robots is what gains;
        # eager, and compiled with CUDA graphs (which take the launches out of a lone robot's forward too)
        for name, overrides in () if cpu else (("tiny", []), ("wide", WIDE)):
            small = random_model(Path(tmp) / name, overrides)
            for compiled in (False, True):
                partial(results)
                results[f"concurrency_{name}{'_compiled' * compiled}"] = concurrency(small, device, (1, 4, 8), 1, None,
                                                                                     compiled)
        if not cpu:  # last, being the longest to compile: the 14B width's memory through the compiled engine's pool
            partial(results)
            results["concurrency_compiled"] = concurrency(model, device, (1, 4, 8), 1, None, True)
    return results


RUNNERS = {"env": section_env, "pytest": section_pytest, "attention": section_attention, "train": section_train,
           "serve": section_serve, "trainer": section_trainer, "plan": section_plan, "engine": section_engine}


class SectionFailed(Exception):
    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def child(name: str, result_file: Path, cpu: bool) -> int:
    def partial(result: dict) -> None:
        result_file.write_text(json.dumps({"status": "partial", "result": result}, default=str))

    try:
        result_file.write_text(json.dumps({"status": "passed", "result": RUNNERS[name](cpu, partial)}, default=str))
        return 0
    except SectionFailed as err:
        result_file.write_text(json.dumps({"status": "failed", "error": str(err), "result": err.result},
                                          default=str))
        return 1


# -- the orchestration ------------------------------------------------------------------------------------------

def run_section(section: Section, limit_s: float, cpu: bool, log, cache: Path | None = None) -> dict:
    """One section in its own process: passed, failed (with the end of its output) or timed out. `cache`: the
    folder of inductor's and Triton's caches that every section shares."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--section", section.name,
                   "--result", str(result_file), *(["--cpu"] if cpu else [])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if cache is not None:
            env.update(TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
        if cpu:
            env["TRITON_INTERPRET"] = "1"  # Triton's interpreter, chosen before Triton is imported
        log.write(f"\n===== {section.name} ({section.about}), limit {limit_s:.0f} s =====\n")
        log.flush()
        begin = log.tell()
        start = time.monotonic()
        # straight into the log, so a command stopped from outside still leaves what each section printed
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the section and whatever it started (pytest, compile workers)
            process.wait()
            code = None
        log.seek(0, os.SEEK_END)
        with open(log.name, errors="replace") as written:
            written.seek(begin)
            text = written.read()
        seconds = time.monotonic() - start
        tail = "\n".join(text.strip().splitlines()[-15:])
        if code is None:
            record = {"status": "timed out", "seconds": seconds, "error": f"no result within {limit_s:.0f} s",
                      "output_tail": tail}
            if result_file.exists():  # what the section finished before its time ran out
                record["result"] = json.loads(result_file.read_text())["result"]
            return record
        if result_file.exists():
            record = json.loads(result_file.read_text())
            return {**record, "seconds": seconds, **({"output_tail": tail} if record["status"] != "passed" else {})}
        return {"status": "failed", "seconds": seconds, "error": f"exit code {code}", "output_tail": tail}


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def restore_cache(archive: Path | None, folder: Path) -> dict:
    """Unpack a previous run's compile caches (if `archive` exists) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if archive is None or not archive.exists():
        return {"restored_bytes": 0}
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return {"restored_from": str(archive), "restored_bytes": _folder_bytes(folder)}


def save_cache(folder: Path, out: Path) -> dict:
    """The caches as OUT/compile-cache.tar.gz, when small enough to come back from a device machine."""
    target = out / CACHE_FILE
    with tarfile.open(target, "w:gz") as tar:
        for part in sorted(folder.iterdir()):
            tar.add(part, arcname=part.name)
    size = target.stat().st_size
    if size > CACHE_MAX_BYTES:
        target.unlink()
        return {"cache_bytes": _folder_bytes(folder), "saved": f"not saved: {size / 2**20:.1f} MiB compressed"}
    return {"cache_bytes": _folder_bytes(folder), "saved": str(target), "saved_bytes": size}


def run_all(out: Path, names: list[str], cpu: bool, budget_s: float, limits: dict[str, float],
            compile_cache: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    found = capabilities(cpu)
    summary: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                     "mode": "cpu dry run" if cpu else "gpu", "budget_s": budget_s,
                     "missing_capabilities": {k: v for k, v in found.items() if v}, "sections": {}}
    deadline = time.monotonic() + budget_s
    with open(out / "sections.log", "w") as log, tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache" if compile_cache else None
        if cache:
            summary["compile_cache"] = restore_cache(compile_cache, cache)
        for name in names:
            section = SECTIONS[name]
            reason = missing(section, found, cpu)
            left = deadline - time.monotonic()
            if reason:
                record = {"status": "skipped", "reason": reason}
            elif left < 5:
                record = {"status": "skipped", "reason": f"the {budget_s:.0f} s budget was spent"}
            else:
                limit = limits.get(name, CPU_LIMIT_S if cpu else section.limit_s)
                record = run_section(section, min(limit, left), cpu, log, cache)
            summary["sections"][name] = record
            _print_status(name, record)
            (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))  # kept if stopped
        if cache:
            summary["compile_cache"] |= save_cache(cache, out)
    summary["targets"] = [] if cpu else evaluate_targets(summary["sections"])
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(summary))
    return summary


def _print_status(name: str, record: dict) -> None:
    detail = record.get("reason") or record.get("error") or ""
    seconds = f"{record['seconds']:.0f} s" if "seconds" in record else ""
    print(f"{name:<10} {record['status']:<10} {seconds:>6}  {detail}", flush=True)


def _lookup(result: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def evaluate_targets(sections: dict) -> list[dict]:
    rows = []
    for name, what, path, minimum in TARGETS:
        value = _lookup(sections.get(name, {}).get("result", {}), path)
        verdict = "not measured" if value is None else ("met" if value >= minimum else f"missed by {minimum - value:.3g}")
        rows.append({"section": name, "target": what, "minimum": minimum, "measured": value, "verdict": verdict})
    return rows


def markdown(summary: dict) -> str:
    sections = summary["sections"]
    env = sections.get("env", {}).get("result", {})
    lines = [f"# GPU check, {summary['date']} ({summary['mode']})", ""]
    if env:
        device = env.get("gpu", "no GPU")
        lines += [f"{device}; Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}), "
                  f"Triton {env.get('triton')}, torchtitan {env.get('torchtitan')}, bundle {env.get('bundle_commit')}; matmul ceiling "
                  f"{env['matmul']['tflops']:.3g} TFLOP/s ({env['matmul']['dtype']}, {env['matmul']['n']}^3)", ""]
    if "compile_cache" in summary:
        c = summary["compile_cache"]
        lines += [f"Compile caches: {c['restored_bytes'] / 2**20:.1f} MiB restored, {c['cache_bytes'] / 2**20:.1f} MiB "
                  f"after the run, {c['saved']}", ""]
    lines += ["| section | status | seconds | note |", "|---|---|---|---|"]
    for name, record in sections.items():
        note = (record.get("reason") or record.get("error") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {record['status']} | {record.get('seconds', 0):.0f} | {note} |")
    if summary["targets"]:
        lines += ["", "| target | minimum | measured | verdict |", "|---|---|---|---|"]
        for row in summary["targets"]:
            measured = "—" if row["measured"] is None else f"{row['measured']:.3g}"
            lines.append(f"| {row['target']} | {row['minimum']:g} | {measured} | {row['verdict']} |")
    if summary["missing_capabilities"]:
        lines += ["", "Missing on this machine (a section that needs one of these is skipped):", ""]
        lines += [f"- {name}: {why}" for name, why in summary["missing_capabilities"].items()]
    lines += _details(sections)
    if env.get("nvidia_smi"):
        lines += ["", "```", env["nvidia_smi"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _details(sections: dict) -> list[str]:
    lines = []
    attention = sections.get("attention", {}).get("result", {})
    for layout, row in attention.get("layouts", {}).items():
        lines += ["", f"Attention, {layout} ({row['tokens']} tokens, {row['allowed_fraction']:.1%} of pairs allowed, "
                  f"Triton tuning {row['tuning_s']:.1f} s apart, max |Triton - flex| "
                  f"{row.get('triton_vs_flex_max_abs_diff', float('nan')):.2g}):", "",
                  "| kernel | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {r['forward_ms']:.2f} | {r['forward_tflops']:.0f} | {r['forward_backward_ms']:.2f} | "
                  f"{r['forward_backward_tflops']:.0f} |" for name, r in row["results"].items()]
        if row.get("tuning"):
            lines += ["", "Tiles chosen: " + "; ".join(f"{p} {c}" for p, c in row["tuning"]["chosen"].items())]
    train = sections.get("train", {}).get("result", {})
    if train:
        lines += ["", "Training step:", "", "| attention | layers x dim | tokens | step s | tokens/s | MFU % | "
                  "peak GiB | estimate GiB |", "|---|---|---|---|---|---|---|---|"]
        for name, r in train.items():
            lines.append(f"| {name} | {r['layers']} x {r['dim']} | {r['tokens']} | {r['step_s']:.3f} | "
                         f"{r['tokens_per_s']:,.0f} | {r.get('mfu_pct', float('nan')):.1f} | "
                         f"{r.get('peak_allocated_gib', float('nan')):.1f} | {r.get('estimate_gib', float('nan')):.1f} |")
    trainer = sections.get("trainer", {}).get("result", {})
    if trainer.get("losses"):
        lines += ["", f"torchtitan's Trainer (`wam train`'s process), tiny preset: {trainer['steps']} steps in "
                  f"{trainer['wall_s']:.0f} s, loss {trainer['losses'][0]:.3f} -> {trainer['losses'][-1]:.3f}, "
                  f"{trainer['tokens_per_s_last']:,.0f} tokens/s at the last step, checkpoint "
                  f"{', '.join(trainer['checkpoint_files']) or 'none'}; {trainer['memory'] or ''}"]
    plan = sections.get("plan", {}).get("result", {})
    if plan:
        mib = 2**20
        lines += ["", f"`wam plan`'s trace against the same step run ({plan['attention']} attention): traced "
                  f"{plan['traced_bytes'] / mib:,.1f} MiB; memory tracker {plan['tracker_bytes'] / mib:,.1f} MiB "
                  f"({plan['traced_vs_tracker_error']:+.1%})" + (
                      f"; torch.cuda.max_memory_allocated {plan['device_peak_bytes'] / mib:,.1f} MiB "
                      f"({plan['traced_vs_device_error']:+.1%})" if "device_peak_bytes" in plan else "")]
    engine = sections.get("engine", {}).get("result", {})
    if engine.get("ablation"):
        lines += ["", "The fast engine's ablation (roofline: `wam plan --serve`'s least time per chunk for the same "
                  "blocks and sampler on this GPU; of roofline: that bound over the measured p50):", "",
                  "| step | p50 / p99 ms | speed-up | roofline ms | of roofline | peak GiB |", "|---|---|---|---|---|---|"]
        for name, r in engine["ablation"].items():
            if "p50_ms" in r:
                bound, peak = r.get("roofline_ms"), r.get("peak_gib")
                lines.append(f"| {name} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {r['speedup_p50']:.2f}x | "
                             + (f"{bound:.1f} | {bound / r['p50_ms']:.0%} |" if bound else "— | — |")
                             + (f" {peak:.2f} |" if peak is not None else " — |"))
    for key, model in (("concurrency", "the ablation's model"), ("concurrency_tiny", "the tiny preset"),
                       ("concurrency_tiny_compiled", "the tiny preset, compiled + CUDA graphs"),
                       ("concurrency_wide", "3 blocks of width 512"),
                       ("concurrency_wide_compiled", "3 blocks of width 512, compiled + CUDA graphs"),
                       ("concurrency_compiled", "the ablation's model, compiled + CUDA graphs")):
        rows = engine.get(key, {})
        if not rows:
            continue
        lines += ["", f"Concurrent sessions, batched over one at a time ({model}):", "",
                  "| sessions | throughput | roofline's | forward's ceiling: one chunk / out of phase | p99 over a lone "
                  "session's | peak GiB batched (weights + caches + activations traced) | engine host time batched: forwards / solver steps / "
                  "observes (share of wall) | mean batch |", "|---|---|---|---|---|---|---|---|"]
        for n in (1, 4, 8):
            if f"{n}_sessions_throughput_ratio" in rows:
                batched = rows[f"{n}_sessions_batched"]
                bound, peak = rows.get(f"{n}_sessions_roofline_gain"), batched.get("peak_gib")
                lines.append(f"| {n} | {rows[f'{n}_sessions_throughput_ratio']:.2f}x | "
                             f"{'—' if bound is None else f'{bound:.2f}x'} | "
                             + " / ".join(f"{rows[key]:.2f}x" if key in rows else "—" for key in (
                                 f"{n}_sessions_forward_ceiling", f"{n}_sessions_forward_ceiling_mixed")) + " | "
                             f"{rows[f'{n}_sessions_p99_over_lone_session']:.2f}x | "
                             + ("— | " if peak is None else f"{peak:.2f} ({batched['weights_gib']:.2f} + "
                                f"{batched['caches_gib']:.2f} + {batched.get('activations_gib') or float('nan'):.2f}) | ")
                             + " / ".join(f"{batched[key]:.0%}" if key in batched else "—" for key in (
                                 "engine_forward_share", "engine_solver_share", "engine_observe_share"))
                             + (f" | {batched['mean_batch']:.1f} |" if "mean_batch" in batched else " | — |"))
    for name, r in engine.get("solver_batching", {}).items():
        lines += ["", f"Solver steps of 8 sessions out of phase ({name} shapes), one engine step: batched "
                  f"{r['batched']['p50_ms']:.3f} ms, one session at a time {r['one_at_a_time']['p50_ms']:.3f} ms "
                  f"({r['speedup_p50']:.2f}x)"]
    serve = sections.get("serve", {}).get("result", {})
    if serve:
        lines += ["", "Per-chunk denoising latency (last chunk of the context):", "",
                  "| steps | KV cache p50 / p99 ms | recompute p50 / p99 ms | speed-up |", "|---|---|---|---|"]
        for steps, r in serve.items():
            if steps.endswith("_steps"):
                kv, re = r["kv_cache"], r["recompute"]
                lines.append(f"| {steps.split('_')[0]} | {kv['p50_ms']:.1f} / {kv['p99_ms']:.1f} | "
                             f"{re['p50_ms']:.1f} / {re['p99_ms']:.1f} | {r['speedup_p50']:.1f}x |")
        if "samplers" in serve:
            lines += ["", "DreamZero's sampler built up (UniPC 16 steps; guidance 5; DiT cache 8 of 16):", "",
                      "| sampler | transformer passes | p50 / p99 ms |", "|---|---|---|"]
            lines += [f"| {name} | {r['transformer_passes']} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} |"
                      for name, r in serve["samplers"].items()]
        if "served_attention" in serve:
            a = serve["served_attention"]
            lines += ["", f"One served chunk's self-attention ({a['queries']} queries, {a['keys']} keys, {a['heads']} "
                      f"heads): unmasked but for the state row {a['sdpa_kernel']['p50_ms']:.2f} ms, under the dense "
                      f"mask {a['dense_mask']['p50_ms']:.2f} ms ({a['speedup_p50']:.2f}x)"]
        if "encoding" in serve:
            e = serve["encoding"]
            lines += ["", f"A served chunk's encoding ({e['canvas'][0]}x{e['canvas'][1]} canvas): its "
                      f"{e['frames_per_chunk']} observed frames {e['observed_chunk']['p50_ms']:.1f} ms, a new window "
                      f"{e['new_window']['p50_ms']:.1f} ms; {e['sessions']} sessions' chunks one after another "
                      f"{e['sessions_one_at_a_time']['p50_ms']:.1f} ms, in one call "
                      f"{e['sessions_batched']['p50_ms']:.1f} ms ({e['batched_speedup_p50']:.2f}x)"]
            lines += [f"- {e['sessions']} robots' {kind} arriving at once through the server's encoder: batched "
                      f"{e[f'server_{kind}_batching']['p50_ms']:.1f} ms (mean batch "
                      f"{e[f'server_{kind}_batching']['mean_batch']:.1f}), one at a time "
                      f"{e[f'server_{kind}_one_at_a_time']['p50_ms']:.1f} ms ({e[f'server_{kind}_speedup_p50']:.2f}x)"
                      for kind in ("chunks", "windows")]
        if "profile" in serve:
            prof = serve["profile"]
            shares = ", ".join(f"{kind} {share:.0%}" for kind, share in prof["shares"].items())
            lines += ["", f"Where one chunk's time goes ({prof['sampler']} sampler, {prof['total_ms']:.1f} ms of "
                      f"{prof['clock']} time: {shares}):", "", "| kernel | kind | ms | share | calls |",
                      "|---|---|---|---|---|"]
            lines += [f"| `{r['op']}` | {r['kind']} | {r['self_ms']:.2f} | {r['share']:.1%} | {r['calls']} |"
                      for r in prof["top"]]
    return lines


def _limits(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, float]:
    limits = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in SECTIONS or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--limit {item!r}: expected SECTION=SECONDS, SECTION one of {', '.join(SECTIONS)}")
        limits[name] = float(seconds)
    return limits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", help="folder for gpu_check.json, gpu_check.md, sections.log")
    parser.add_argument("--cpu", action="store_true", help="every section's CPU mode (the dry run)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections (default: all)")
    parser.add_argument("--budget-s", type=float, default=480, help="all sections together (default 480)")
    parser.add_argument("--limit", action="append", default=[], metavar="SECTION=SECONDS",
                        help="one section's time limit")
    parser.add_argument("--compile-cache", type=Path, metavar="FILE",
                        help="start from the compile caches in FILE (if it exists); write them to OUT/" + CACHE_FILE)
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # a section's own process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section:
        sys.exit(child(args.section, args.result, args.cpu))
    if args.out is None:
        parser.error("OUT: give a folder for the results")
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    limits = _limits(parser, args.limit)
    summary = run_all(args.out, names, args.cpu, args.budget_s if not args.cpu else 10**6, limits,
                      args.compile_cache)
    print(f"summary: {args.out / 'gpu_check.md'}")
    if "compile_cache" in summary:
        print(f"compile cache: {summary['compile_cache']}")
    for row in summary["targets"]:
        print(f"  {row['target']}: {row['verdict']}")
    sys.exit(int(any(r["status"] in ("failed", "timed out") for r in summary["sections"].values())))


if __name__ == "__main__":
    main()
