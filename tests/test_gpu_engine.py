"""GPU-only checks of the serving engine (marked `gpu`; they run wherever CUDA exists): the compiled step captured
in CUDA graphs equal to eager, batched sessions equal to each alone on the GPU, and FP8 matmuls on Hopper."""

import pytest
import torch
from torch._dynamo.utils import counters

from wam.platform.errors import ConfigError
from wam.trainer.inference import Denoiser
from wam.trainer.quantize.load import compute_path, load_quantized
from wam.trainer.serve.engine import DenoiseEngine

from conftest import GUIDED_SAMPLER, quantized_synthetic_model, seeded_generator, session_rollout

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return quantized_synthetic_model(tmp_path_factory.mktemp("gpu-engine"), "gpu-engine")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_cuda_graphs_and_batching_on_the_gpu_equal_eager_alone(quantized):
    folder, preset = quantized
    model = load_quantized(folder, "cuda", "bf16-dequantized").model
    denoiser = Denoiser(model, compiled=True, cache_rows=2 * 5)  # reduce-overhead: CUDA graphs over the KV pool
    sessions = [session_rollout((model, preset), GUIDED_SAMPLER, seed, observed, device="cuda", denoiser=denoiser)
                for seed, observed in enumerate([0, 3, 1])]
    eager, alone = Denoiser(model), []
    for i, (r, state) in enumerate(sessions):
        r.denoiser = eager  # each alone, eagerly (its caches stay rows of the pool)
        alone.append(r.act(state, seeded_generator(i, "cuda")))
    engine = DenoiseEngine(denoiser, max_batch=3)
    warm, behind = (session_rollout((model, preset), GUIDED_SAMPLER, 9, 0, device="cuda", denoiser=denoiser)[0]
                    for _ in range(2))
    engine.start(warm, behind)  # as wam serve warms it: sessions at one chunk and at different chunks
    assert engine.ready.wait(600) and engine.failure is None
    compiled = counters["stats"]["unique_graphs"]
    futures = [engine.submit(r.start(state, seeded_generator(i, "cuda"))) for i, (r, state) in enumerate(sessions)]
    for future, ref in zip(futures, alone, strict=True):
        chunk = future.result(timeout=300)
        assert relative(chunk.actions, ref.actions) < 3e-2 and relative(chunk.video, ref.video) < 3e-2
    assert counters["stats"]["unique_graphs"] == compiled  # the sessions at different chunks were warmed up for


def test_fp8_matmuls_are_chosen_on_hopper_and_close_to_bf16(quantized):
    folder, preset = quantized
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):  # no FP8 tensor cores: refused by name
        with pytest.raises(ConfigError, match="needs a CUDA GPU of compute capability >= 8.9"):
            load_quantized(folder, "cuda", "fp8")
        return
    if capability < (10, 0):
        assert compute_path(torch.device("cuda")) == "fp8"
    fp8 = load_quantized(folder, "cuda", "fp8")
    assert fp8.compute_path == "fp8" and "Float8" in type(fp8.model.blocks[0].ffn[0].weight).__name__
    bf16 = load_quantized(folder, "cuda", "bf16-dequantized").model
    outs = []
    for model in (fp8.model, bf16):
        r, state = session_rollout((model, preset), GUIDED_SAMPLER, 1, 2, device="cuda")
        outs.append(r.act(state, seeded_generator(0, "cuda")))
    assert relative(outs[0].actions, outs[1].actions) < 0.1 and relative(outs[0].video, outs[1].video) < 0.1
