"""Prove the GPU check starts on the GPU machine's own software before a GPU is borrowed (`make gpu-dryrun`).

    python3 benchmarks/gpu_dryrun.py [OUT [OPTION...]]    # default OUT: runs/gpu-dryrun; OPTIONs go to gpu_check
                                                          # (e.g. --only env,engine), every section by default

The GPU machine runs torch 2.11.0 and Triton 3.6.0 with a fixed set of common packages and no network; none
of this project's pins apply there. This script builds a virtualenv outside the repository with exactly that
torch and Triton (the index here has torch 2.11.0 only as its CUDA build: several GB of nvidia-* wheels,
downloaded once, reused while the recipe below is unchanged), installs the packages such a machine has that
the checks may touch, removes every distribution the machine does not have, then does what the machine will
do: installs the bundle (`make gpu-bundle`) with `pip install --no-index --no-deps --target` and runs
`benchmarks/gpu_check.py --cpu`: imports, the Triton interpreter tests, and every section's CPU mode.
Exit code: gpu_check's (0 when every section passed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("GPU_DRYRUN_VENV", Path.home() / ".cache" / "wam-gpu-dryrun" / "venv"))
PINNED = ["torch==2.11.0", "triton==3.6.0"]  # what the GPU machine runs
# Packages of the GPU machine's image the checks (or torch, pytest, torchtitan under them) may import, at the
# image's versions where they were read (a newer one may need a dependency the image lacks).
COMMON = ["pyarrow", "safetensors==0.8.0", "transformers==5.17.0", "huggingface-hub==1.33.0", "tokenizers==0.23.2", "einops", "pytest", "pytest-timeout", "rich", "typer", "pyyaml", "fsspec",
          "packaging", "tensorboard", "attrs", "typing-extensions", "jinja2", "filelock", "psutil", "pillow",
          "hypothesis", "tqdm", "requests", "scipy",  # scipy: the served actions' smoothing
          "pandas", "xxhash",  # Hugging Face datasets (torchtitan's Trainer imports it)
          # Triton 3.6's interpreter calls int() on one-element arrays, which NumPy 2.4 refuses. Only the dry run
          # interprets kernels (the GPU machine, on NumPy 2.5, compiles them), so here NumPy stays below 2.4.
          "numpy<2.4"]
# Everything the GPU machine's image holds (as read on one on 2026-11-17); anything else is removed from the
# dry-run virtualenv, so an import the bundle misses fails here and not there.
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True)


def virtualenv() -> Path:
    """The dry-run virtualenv, built once per recipe: torch 2.11 / Triton 3.6 and only the image's packages."""
    python = VENV / "bin" / "python"
    recipe = hashlib.sha256(json.dumps([PINNED, COMMON, IMAGE]).encode()).hexdigest()[:16]
    stamp = VENV / ".recipe"
    if python.exists() and stamp.exists() and stamp.read_text() == recipe:
        return python
    print(f"building the dry-run virtualenv in {VENV} (torch 2.11.0 is the CUDA build here: several GB, once)",
          flush=True)
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    _pip(python, "install", *PINNED, *COMMON)
    installed = json.loads(subprocess.run([str(python), "-m", "pip", "list", "--format=json"], check=True,
                                          capture_output=True, text=True).stdout)
    image = {_canonical(n) for n in IMAGE}
    extra = [p["name"] for p in installed if _canonical(p["name"]) not in image]
    if extra:  # pulled in as dependencies here, absent on the GPU machine
        _pip(python, "uninstall", "-y", *extra)
    stamp.write_text(recipe)
    return python


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "runs" / "gpu-dryrun").resolve()
    python = virtualenv()
    versions = subprocess.run([str(python), "-c", "import torch, triton; print(torch.__version__, triton.__version__)"],
                              check=True, capture_output=True, text=True).stdout.split()
    print(f"dry run on torch {versions[0]}, Triton {versions[1]} ({python})", flush=True)
    bundle = REPO / ".gpu-bundle"
    if not list(bundle.glob("*.whl")):
        raise SystemExit(f"no bundle in {bundle}: run `make gpu-bundle` first")
    with tempfile.TemporaryDirectory() as site:  # as on the GPU machine: no index, no dependencies, a target
        # (picked as for the GPU machine's Python 3.12: one bundled wheel, multiprocess, is per Python release)
        _pip(python, "install", "--no-index", "--no-deps", "--no-compile", "--upgrade", "--target", site,
             "--python-version", "3.12", "--only-binary=:all:", *map(str, sorted(bundle.glob("*.whl"))))
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env.update(PYTHONPATH=site, PYTHONUNBUFFERED="1", PATH=f"{python.parent}:{env.get('PATH', '')}")
        run = subprocess.run([str(python), str(REPO / "benchmarks" / "gpu_check.py"), str(out), "--cpu",
                              *sys.argv[2:]], cwd=REPO, env=env)
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
