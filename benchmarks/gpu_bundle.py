"""The wheels a GPU machine needs beyond its own software to run benchmarks/gpu_check.py (`make gpu-bundle`).

    python benchmarks/gpu_bundle.py [--out .gpu-bundle]

The target is a machine that brings its own Python 3.12, CUDA torch and Triton (plus numpy, safetensors,
einops, pytest, rich, typer, PyYAML, fsspec and other common packages) and has no network: only pure-Python
wheels travel, installed with `pip install --no-index --no-deps --target`, none of this project's pins applied.
The bundle is the project itself and the few pure-Python distributions the GPU checks import that such a
machine lacks, at the versions this checkout is tested with, and torchao's x86-64 wheel (the FP8 serving path).
`make gpu-dryrun` proves it starts on torch 2.11 / Triton 3.6 before a GPU is borrowed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the GPU checks import beyond the target's own software (the model's modules are torchtitan Modules;
# configs are omegaconf; torchtitan's data loader is torchdata's, and its Trainer imports Hugging Face datasets).
# `make gpu-dryrun` fails on an import if this list misses one.
BUNDLED = ("torchtitan", "spmd_types", "tyro", "docstring_parser", "typeguard", "omegaconf", "torchdata", "datasets",
           "dill", "multiprocess")
# Not pure Python, but one wheel for every CPython >= 3.10 (abi3) on x86-64 Linux, the GPU machine's: torchao, whose
# float8 matmuls are the serving FP8 path on Hopper (without it the engine's FP8 row is skipped). Its compiled
# extras are built for one torch release; the FP8 path does not use them.
BINARY = ("torchao",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_MIB = 64  # what may travel with one command
SITE = "/tmp/wam-site"


def run_command(bundle: Path) -> str:
    """The command to run in a checkout of this repository on the GPU machine, with the bundle beside it."""
    rel = bundle.relative_to(REPO) if bundle.is_relative_to(REPO) else bundle
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target {SITE} {rel}/*.whl && "
            f"PYTHONPATH={SITE} PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py ${{OUT:-gpu-check}}")


def _pip(*args: str) -> None:
    # captured: pip's warnings about this machine's indexes are noise (a failure carries them)
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True,
                   capture_output=True, text=True)


def _fetch(name: str, pinned: str, out: Path) -> None:
    """A pure-Python wheel of name==pinned (built from the sdist where the index has no wheel); for BINARY, the
    GPU machine's platform wheel."""
    spec = f"{name}=={pinned}"
    if name in BINARY:
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
             *platforms, "-d", str(out), spec)
        return
    try:
        _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "py",
             "-d", str(out), spec)
    except subprocess.CalledProcessError:
        _pip("wheel", "--no-deps", "-w", str(out), spec)


def _commit() -> str:
    """The checkout the project's wheel was built from (`+dirty` with uncommitted changes)."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return (head or "unknown") + ("+dirty" if dirty else "")


def build(out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:  # the project's wheel, built outside the checkout
        _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO), "--cache-dir", tmp)
    for name in BUNDLED + BINARY:
        _fetch(name, version(name), out)
    wheels = sorted(out.glob("*.whl"))
    impure = [w.name for w in wheels if not w.name.endswith("-none-any.whl") and not w.name.startswith(BINARY)]
    if impure:
        raise SystemExit(f"not pure-Python, cannot travel to another Python: {', '.join(impure)}")
    sizes = {w.name: w.stat().st_size for w in wheels}
    total = sum(sizes.values())
    if total > LIMIT_MIB * 2**20:
        raise SystemExit(f"the bundle is {total / 2**20:.1f} MiB, over the {LIMIT_MIB} MiB that may travel")
    manifest = {"commit": _commit(), "wheels": sizes, "total_mib": round(total / 2**20, 2),
                "command": run_command(out)}
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / ".gpu-bundle", help="folder for the wheels (replaced)")
    args = parser.parse_args()
    manifest = build(args.out.resolve())
    for name, size in manifest["wheels"].items():
        print(f"  {size / 2**20:6.2f} MiB  {name}")
    print(f"{len(manifest['wheels'])} wheels, {manifest['total_mib']:.1f} MiB (limit {LIMIT_MIB} MiB) in {args.out}")
    print("On the GPU machine, from a checkout of this repository with the bundle beside it, run:")
    print(f"  {manifest['command']}")


if __name__ == "__main__":
    main()
