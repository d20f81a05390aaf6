"""`wam plan`: the traced step against the same step run for real, and what the plan derives from it."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import wam_cli, write_run_config
from wam.platform.accelerators import ACCELERATORS
from wam.platform.config import load_config
from wam.platform.plan import Collective, TracedStep, fewest_gpus, recipe_time, step_time


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    return write_run_config(tmp_path_factory.mktemp("plan"), "plan", training={"batch_size": 2})


def test_traced_memory_matches_a_real_run(tiny_config, tmp_path):
    """The trace (fake tensors, fake process group) and the real step (gloo, 1 and 2 processes) agree on peak tensor
    memory within 10%, and on the collectives."""
    import wam.trainer.model.model  # noqa: F401  (torchtitan loaded before the CPU shim, as in a busy test worker)
    from wam.trainer.titan.plan import trace

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    real = {n: subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                                 "-m", "wam.trainer.titan.plan", str(tiny_config),
                                 str(tmp_path / f"real{n}.json")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
            for n in (1, 2)}
    cfg = load_config(tiny_config)
    traced = {n: trace(cfg, n, attention="sdpa") for n in (1, 2)}  # the kernel a CPU runs
    for n, proc in real.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        measured = TracedStep.from_json((tmp_path / f"real{n}.json").read_text())
        error = traced[n].peak_bytes / measured.peak_bytes - 1
        print(f"{n} process(es): traced {traced[n].peak_bytes} B, measured {measured.peak_bytes} B, error {error:+.2%}")
        assert abs(error) < 0.10
        assert traced[n].collectives == measured.collectives
        assert traced[n].traced and not measured.traced
    # FSDP over 2 ranks halves the sharded states of 1.
    assert traced[2].memory["optimizer_state"] == pytest.approx(traced[1].memory["optimizer_state"] / 2, rel=0.02)
    # What the model caches per token layout (RoPE angles, masks) outlives the trace: a real forward of the same
    # layout in this process afterwards is real, not made of the trace's fake tensors.
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    from tests.conftest import randomized_model
    from wam.platform.config import resolve_preset
    from wam.trainer.model import WamInputs

    preset = resolve_preset(cfg)
    with torch.no_grad():
        out = randomized_model(preset.arch, preset.sample)(WamInputs.random(preset.arch, preset.sample, batch=1))
    assert not any(isinstance(t, FakeTensor) for t in (out.video, out.actions)) and torch.isfinite(out.video).all()


def _step(**changes) -> TracedStep:
    gib = 1024**3
    base = TracedStep(world_size=8, micro_batch=1, grad_accumulation=1, dp_replicate=1, activation_checkpointing="full",
                      memory={"parameters": 8 * gib, "gradients": 8 * gib, "optimizer_state": 16 * gib,
                              "gathered_parameters": gib, "gradient_buffers": gib, "activations": 10 * gib,
                              "temporaries": gib},
                      peak_bytes=44 * gib, ops=[[10**15, 10**9, 100]],
                      collectives=[Collective("allgather_base", 10**9, 8, 80)],
                      model_flops_per_sample=10**17, samples_per_step=8, trace_seconds=1.0)
    return dataclasses.replace(base, **changes)


def test_plan_scales_sharded_states_and_crosses_the_nvlink_domain():
    step = _step()
    assert step.total_at(16) == pytest.approx(step.total_at(8) - 16 * 1024**3)  # 32 GiB of states, half as many
    h100, gb200 = ACCELERATORS["h100"], ACCELERATORS["gb200"]
    inside, outside = step_time(step, h100, 8), step_time(step, h100, 16)  # one node; two nodes over InfiniBand
    assert outside.communication_s > 8 * inside.communication_s
    assert step_time(step, gb200, 64).communication_s < outside.communication_s  # NVL72: 64 GPUs on NVLink
    assert step_time(step, h100).compute_s == pytest.approx(100 * 10**15 / h100.peak_bf16_flops)
    assert fewest_gpus(step, h100) == min(n for n in range(1, 100) if step.total_at(n) <= 0.9 * 80 * 1024**3)
    at_512 = recipe_time(step, h100, 512)
    assert at_512.busy_gpus == 128 and at_512.grad_accumulation == 1  # batch 128: one sample per busy GPU
    assert recipe_time(step, h100, 8).grad_accumulation == 16


def test_plan_refuses_an_unknown_accelerator(tiny_config):
    result = wam_cli("plan", tiny_config, "--accelerator", "a100", "--gpus", "8")
    assert result.returncode == 2
    assert "--accelerator 'a100' is not known; choose one of h100, h200, gb200" in result.stderr


def test_plan_asks_for_gpus_to_plan_training(tiny_config):
    result = wam_cli("plan", tiny_config, "--accelerator", "h100")
    assert result.returncode == 2
    assert "--gpus is required to plan training" in result.stderr


def test_admission_uses_the_traced_plan_and_names_the_gpus_needed(tmp_path, monkeypatch):
    """check_memory (`wam train`, the operator's validate) reads the traced step of the config when one is cached,
    and says how many GPUs it needs; without one it falls back to the static estimate and says so."""
    from wam.platform import plan
    from wam.platform.config import check_memory, resolve_preset
    from wam.platform.errors import ConfigError

    monkeypatch.setenv("WAM_PLAN_CACHE", str(tmp_path))
    cfg = load_config(None, ["model.preset=dreamzero-14b", "training.processes=8", "training.batch_size=3",
                             "training.activation_checkpointing=full"])  # a setting no shipped plan covers
    with pytest.raises(ConfigError, match="by the static memory estimate"):
        check_memory(cfg, 1.0, "one test GPU")
    step = _step()
    plan.store(plan.cache_key(resolve_preset(cfg), cfg.training), step)
    with_text_encoder = plan.with_encoders(step, resolve_preset(cfg).arch, cfg.data.source)
    assert with_text_encoder.frozen_encoder_bytes == 2 * 5_680_910_336  # umT5-XXL in bf16 (latents: no VAE, CLIP)
    check_memory(cfg, with_text_encoder.total_at(8) / 1024**3 + 0.1, "one test GPU")  # fits
    needed = plan.fewest_ranks(plan.with_encoders(step, resolve_preset(cfg).arch, cfg.data.source), 40 * 1024**3)
    with pytest.raises(ConfigError, match=rf"by the memory of its traced training step .* it needs at least {needed} GPUs"):
        check_memory(cfg, 40.0, "one test GPU")
    # `wam model info` shows the traced step next to the static estimate, and the fewest GPUs by it.
    info = wam_cli("model", "info", "dreamzero-14b", "--gpus", "8", "--batch-per-gpu", "3", "--json",
                   env={"WAM_PLAN_CACHE": str(tmp_path)})
    assert info.returncode == 0, info.stderr
    reported = json.loads(info.stdout)
    assert reported["traced_memory_gib_per_gpu"] == {"full": pytest.approx(with_text_encoder.total_at(8) / 1024**3)}
    assert reported["min_gpus"] == {"gpu_memory_gib": 80.0, "by": "traced step",
                                    "count": plan.fewest_ranks(with_text_encoder, 0.9 * 80 * 1024**3)}


def test_largest_micro_batch_grows_activations_only():
    from wam.platform.plan import largest_micro_batch

    step, h200 = _step(), ACCELERATORS["h200"]
    b = largest_micro_batch(step, h200, 8)
    fixed = step.total_at(8) - 11 * 1024**3  # all but activations + temporaries (11 GiB per sample)
    assert fixed + b * 11 * 1024**3 <= 0.9 * 141 * 1024**3 < fixed + (b + 1) * 11 * 1024**3


def test_plan_says_compile_is_not_traced_and_what_to_try(tiny_config, tmp_path, monkeypatch):
    """A config that compiles its blocks gets an eager trace (dynamo does not run under torch's memory tracker),
    and `wam plan` says so rather than presenting it as the compiled program's memory; a plan that does not fit
    says which setting to trace next."""
    from wam.platform import plan
    from wam.platform.config import resolve_preset

    monkeypatch.setenv("WAM_PLAN_CACHE", str(tmp_path))
    cfg = load_config(tiny_config)
    too_big = _step(world_size=1, activation_checkpointing="none")
    too_big.memory["activations"] = 100 * 1024**3  # per rank whatever the rank count
    plan.store(plan.cache_key(resolve_preset(cfg), cfg.training), too_big)  # skips the trace
    compiled = wam_cli("plan", tiny_config, "--accelerator", "h100", "--gpus", "8", "--set", "training.compile=true")
    assert compiled.returncode == 0, compiled.stderr
    shown = " ".join(compiled.stdout.split())
    assert "training.compile" in shown and "not traced" in shown
    assert "fits NO (" in shown and "try --set training.activation_checkpointing=full" in shown
    eager = wam_cli("plan", tiny_config, "--accelerator", "h100", "--gpus", "8", "--json")
    assert eager.returncode == 0, eager.stderr
    assert json.loads(eager.stdout)["compile_traced"] is None
