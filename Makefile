# WAM Platform. `make setup` is idempotent; `make test` and `make demo` run it first, so each works as
# the first command on a fresh checkout (Debian, Python 3.11).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
UV := $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python --constraint $(VENV)/torch-constraint.txt
# Debian packages the tests need: the FFmpeg libraries torchcodec links against (PyAV and DALI bundle
# their own), bubblewrap, which runs the operator's containers under their pods' rules, Mesa's EGL,
# through which MuJoCo renders the simulations' cameras offscreen (MUJOCO_GL=egl), and Prometheus for its
# promtool, which checks and unit-tests the chart's alerts (the server itself is not started).
SYSTEM_PACKAGES := libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8 \
	bubblewrap libegl-mesa0 prometheus

.PHONY: setup test test-fast demo lint bench gpu-bundle gpu-dryrun generate plans clean

setup: $(STAMP) $(BIN)/helm

# A real helm (v4.3.1, pinned by hash) renders and lints the chart in the tests.
$(BIN)/helm: helm/install_helm.py | $(STAMP)
	$(BIN)/python helm/install_helm.py $(BIN)

$(STAMP): pyproject.toml Makefile
	@if [ -n "$(SYSTEM_PACKAGES)" ]; then \
	  missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	# torch first and exactly, through pip, which reads the machine's own configuration: the CPU build here.
	# Then uv (the same resolution, a third of pip's time with the bytecode compiled), held to that exact
	# torch build, so that no dependency can upgrade it to a CUDA build.
	$(BIN)/python -m pip install -qq torch==2.13.0 uv==0.13.9
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(UV) -e ".[trainer,operator,dev]"
	# The public openpi client, unchanged; --no-deps because it pins numpy<2 (its dependencies are in
	# the trainer extra and it runs on numpy 2).
	$(UV) --no-deps openpi-client==0.1.2
	$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" \
	  || (echo "torch was replaced by a resolver; run 'make clean setup'" && exit 1)
	touch $(STAMP)

# Two pytest-xdist workers: about a third of a serial run waits (process start-up, servers, sleeps) while
# the other worker computes. A module runs on one worker (its fixtures are built once), the longest
# modules first (tests/conftest.py orders them). TEST_WORKERS=0 runs serially.
PYTEST := $(BIN)/python -m pytest -q -n $(or $(TEST_WORKERS),2) --dist loadfile --no-loadscope-reorder

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

# Synthesizes robot datasets (LeRobot v3.0), trains the tiny preset from scratch on one (2 CPU processes,
# FSDP2), exports the final checkpoint, rolls the trained policy out chunk by chunk on held-out episodes
# next to an untrained one, then hands the final checkpoint off: NVFP4 quantization, the policy server,
# and a held-out episode driving it through the public openpi-client.
demo: setup
	rm -rf runs/demo runs/demo-data
	$(BIN)/wam data synth runs/demo-data/train --episodes 12 --seed 0
	$(BIN)/wam data synth runs/demo-data/heldout --episodes 3 --seed 1
	$(BIN)/wam train configs/demo.yaml
	$(BIN)/wam export runs/demo/checkpoints runs/demo/model.safetensors --dtype float32
	$(BIN)/wam demo --weights runs/demo/model.safetensors --dataset runs/demo-data/heldout
	$(BIN)/wam pipeline configs/demo.yaml --port 8765 --client-dataset runs/demo-data/heldout

# ruff, and the layers' import contracts (pyproject.toml [tool.importlinter]): app -> trainer | operators ->
# platform, lazy imports included. tests/test_packaging.py runs both in `make test`.
lint: setup
	$(BIN)/ruff check app platform trainer operators tests benchmarks helm
	$(BIN)/lint-imports --no-cache

# The chart's TrainJob CRD and values.schema.json, generated from the API types (a test checks both are
# up to date).
generate: setup
	$(BIN)/python -m wam.platform.crd > helm/wam-platform/crds/trainjobs.wam.dev.yaml
	$(BIN)/python -m wam.operators.chart > helm/wam-platform/values.schema.json

# Traced training steps shipped with the package (platform/plans/): what the operator's admission check and
# `wam model info` read where no `wam plan` ran (the operator image has no torch). Minutes per 14B trace.
plans: setup
	WAM_PLAN_CACHE=platform/plans $(BIN)/wam plan configs/dreamzero-14b.yaml --accelerator h100 --gpus 64 --fresh \
		--set training.activation_checkpointing=full --set training.batch_size=1

bench: setup
	$(BIN)/python benchmarks/model.py
	$(BIN)/python benchmarks/attention.py

# The GPU check (benchmarks/gpu_check.py) on a GPU machine that brings its own torch and Triton and has no
# network: gpu-bundle writes the pure-Python wheels it lacks to .gpu-bundle/ and prints the command to run
# there; gpu-dryrun proves that command starts on torch 2.11 / Triton 3.6 (a virtualenv outside the checkout,
# built once: several GB) through every section's CPU mode. Neither is part of `make test`.
gpu-bundle: setup
	$(BIN)/python benchmarks/gpu_bundle.py

gpu-dryrun: gpu-bundle
	$(PYTHON) benchmarks/gpu_dryrun.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
