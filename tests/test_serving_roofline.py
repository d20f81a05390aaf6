"""The serving roofline (`wam plan --serve`): its arithmetic, its memory against the caches the model allocates."""

import dataclasses
import json

import pytest
import torch
import yaml

from tests.conftest import REPO, random_inputs, randomized_model, wam_cli
from wam.app.console import console
from wam.app.plan import serving_plan, show_serving
from wam.platform.accelerators import ACCELERATORS
from wam.platform.config import load_config
from wam.platform.presets import get_preset
from wam.platform.serving_roofline import KV_BYTES, ServingLoad, chunk_time, kv_cache_bytes, sessions_that_fit

DREAMZERO = ServingLoad(passes=8, rows=2)  # 8 of 16 UniPC steps run the transformer, guidance: 2 rows


def batching_gain(preset, acc, sessions: int) -> float:
    """Throughput of `sessions` robots batched over serving them one chunk at a time, at best."""
    one, many = (chunk_time(preset.arch, preset.sample, acc, DREAMZERO, n) for n in (1, sessions))
    return many.chunks_per_s / one.chunks_per_s


def test_a_compute_bound_forward_gains_nothing_from_batching():
    """At the 14B width one session's forward already keeps the tensor cores busy: 8 robots batched take 8 times
    as long per chunk, the throughput of serving them one at a time."""
    p, h200 = get_preset("dreamzero-14b"), ACCELERATORS["h200"]
    one, eight = (chunk_time(p.arch, p.sample, h200, DREAMZERO, n) for n in (1, 8))
    assert one.bound == eight.bound == "compute"
    assert eight.seconds == pytest.approx(8 * one.seconds, rel=0.01)
    assert batching_gain(p, h200, 8) == pytest.approx(1, abs=0.01)
    # FP8 matmuls at twice the bf16 peak: less than twice as fast (attention stays bf16)
    bf16 = chunk_time(p.arch, p.sample, h200, DREAMZERO, 1, "bf16-dequantized")
    assert 1.5 < bf16.seconds / one.seconds < 2


def test_a_memory_bound_forward_shares_the_weights_read():
    p, h100 = get_preset("tiny"), ACCELERATORS["h100"]
    one = chunk_time(p.arch, p.sample, h100, DREAMZERO, 1)
    assert one.bound == "memory"
    gains = [batching_gain(p, h100, n) for n in (2, 4, 8)]
    assert 1 < gains[0] < gains[1] < gains[2] < 8
    slower = dataclasses.replace(h100, hbm_bytes_per_s=h100.hbm_bytes_per_s / 2)
    assert chunk_time(p.arch, p.sample, slower, DREAMZERO, 1).memory_s == pytest.approx(2 * one.memory_s)


def test_no_quantized_path_on_a_chip_without_it():
    p = get_preset("tiny")
    with pytest.raises(ValueError, match="h100 has no nvfp4 matmuls; use fp8"):
        chunk_time(p.arch, p.sample, ACCELERATORS["h100"], DREAMZERO, 1, "nvfp4")


def test_sessions_that_fit_count_what_the_compiled_engine_gathers():
    cache = 10
    assert sessions_that_fit(95, cache, max_batch=8) == 9  # eager: the caches alone
    # compiled: the caches in one pool, and per forward one block's share of a batch's gathered twice (keys + new)
    assert sessions_that_fit(95, cache, max_batch=8, compiled=True, blocks=5) == 6  # 60 + 2 x 6 x 2
    assert sessions_that_fit(95, cache, max_batch=2, compiled=True, blocks=5) == 8  # 80 + 2 x 2 x 2
    assert sessions_that_fit(95, cache, max_batch=8, compiled=True, blocks=1) == 3  # 30 + 2 x 3 x 10
    assert sessions_that_fit(5, cache, max_batch=8) == 0


def test_sessions_that_fit_count_what_a_session_holds_and_a_batch_and_a_request_allocate():
    cache = 10
    assert sessions_that_fit(95, cache, max_batch=8, held=2) == 7  # 7 x 12
    assert sessions_that_fit(95, cache, max_batch=8, activations=3) == 7  # 7 x 13
    assert sessions_that_fit(95, cache, max_batch=2, activations=3) == 8  # 80 + 2 x 3: a batch holds 2 at most
    assert sessions_that_fit(95, cache, max_batch=8, transient=20) == 7  # 70 + 20: one request's work, once
    # all of them: 7 x 11 + 2 x 2 x 2 gathered + 2 x 2 + 5 = 94, 6 sessions 83
    assert sessions_that_fit(94, cache, max_batch=2, compiled=True, blocks=5, held=1, activations=2, transient=5) == 7
    assert sessions_that_fit(93, cache, max_batch=2, compiled=True, blocks=5, held=1, activations=2, transient=5) == 6


def test_kv_cache_bytes_are_what_the_model_allocates(tiny):
    a, s = tiny.arch, tiny.sample
    model, x = randomized_model(a, s), random_inputs(a, s, batch=2)
    cache = model.new_cache(2, s.num_chunks, s.frames_per_chunk, s.actions_per_chunk, (s.latent_height, s.latent_width))
    model.set_conditioning(cache, x.text, x.image, x.i2v_cond)
    tensors = [t for layer in cache.layers for t in (layer.k, layer.v)]
    tensors += [t for context in cache.cross_context for kv in (context.text, context.image) if kv is not None
                for t in kv]
    assert kv_cache_bytes(a, s, rows=2) == KV_BYTES * sum(t.numel() for t in tensors)


def test_the_admissions_trace_of_a_batched_forward_is_what_torchs_tracker_measures_on_a_real_one(tiny):
    """The activations the admission counts (wam.trainer.serve.memory, traced on fake tensors) are those torch's
    MemTracker measures on the real forward of the same sessions, told of the weights and of the caches the forward
    writes in place; they do not grow with the blocks (one runs at a time) and grow alike with every session."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from wam.trainer.model.model import Prediction
    from wam.trainer.serve.memory import forward_activations, held

    a, s = tiny.arch, tiny.sample
    h, w, model, caches = s.latent_height, s.latent_width, randomized_model(a, s), []
    with torch.no_grad():
        for seed in range(2):  # two guided sessions at their last chunk
            x = random_inputs(a, s, batch=2, seed=seed)
            cache = model.new_cache(2, s.num_chunks, s.frames_per_chunk, s.actions_per_chunk, (h, w))
            model.set_conditioning(cache, x.text, x.image, x.i2v_cond)
            model.observe(cache, torch.randn(2, a.latent_channels, 1, h, w))
            for chunk in range(s.num_chunks - 1):
                model.observe(cache, torch.randn(2, a.latent_channels, s.frames_per_chunk, h, w), chunk)
            caches.append(cache)
        items = [Prediction(c, torch.randn(2, a.out_dim, s.frames_per_chunk, h, w),
                            torch.randn(2, s.actions_per_chunk, a.action_dim), torch.randn(2, a.state_dim),
                            torch.rand(2), torch.rand(2)) for c in caches]
        # the layout's constants (masks, rotary tables: cached, whichever forward comes first makes them) made first
        forward_activations(a, s, 2, torch.float32, sessions=2)
        model.predict_many(items)
        tracker = MemTracker()
        tracker.track_external(model, *held(caches), *(t for item in items for t in item[1:]))
        with tracker:
            model.predict_many(items)
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    measured = sum(b for kind, b in peak.items() if str(kind).endswith("ACT"))
    traced = forward_activations(a, s, 2, torch.float32, sessions=2)
    # the trace also counts the step's inputs and the layout's constants, which the real forward found made
    assert measured <= traced.predict <= 1.05 * measured
    assert forward_activations(a, s, 2, torch.float32, sessions=2, blocks=4).predict == traced.predict
    assert forward_activations(a, s, 2, torch.float32, sessions=4).predict == 2 * traced.predict


def test_wam_plan_serve_reports_latency_batching_and_sessions_that_fit():
    result = wam_cli("plan", "configs/dreamzero-14b.yaml", "--accelerator", "h200", "--serve", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["compute"] == "fp8" and plan["sampler"]["transformer_passes"] == 8
    assert plan["sampler"]["rows_per_session"] == 2  # DreamZero's sampler guides
    memory, h200 = plan["memory_gib"], ACCELERATORS["h200"]
    # besides the weights and the encoders: one request's own work, and with each session (all in one batch: fewer
    # fit than serving.max_batch) its VAE stream and its share of a batched forward's activations
    room = 0.9 * h200.memory_gib - memory["weights"] - memory["frozen_encoders"] - memory["request"]
    besides = memory["vae_stream_per_session"] + memory["activations_per_batched_session"]
    assert 0.3 < memory["vae_stream_per_session"] < 1 and 0.3 < memory["activations_per_batched_session"] < 1
    # serving.compile auto compiles on a GPU: the caches in one pool, a block's share of a batch gathered twice (40)
    compiled = memory["per_session"] * (1 + 2 / 40) + besides
    assert plan["compiled"] and plan["sessions_that_fit"] == int(room // compiled) == 5
    result = wam_cli("plan", "configs/dreamzero-14b.yaml", "--accelerator", "h200", "--serve", "--json",
                     "--set", "serving.compile=off")
    eager = json.loads(result.stdout)
    assert eager["sessions_that_fit"] == int(room // (memory["per_session"] + besides)) == 5 < plan["max_batch"]
    assert int((room + memory["request"]) // memory["per_session"]) == 6  # the caches alone would admit one more
    # at DROID's 15 Hz a 24-action chunk runs 1.6 s: as many robots as are denoised together within it
    p, period = get_preset("dreamzero-14b"), eager["chunk_period_s"]
    fed, fp8 = eager["robots_kept_fed"], (lambda n: chunk_time(p.arch, p.sample, h200, DREAMZERO, n).seconds)
    assert period == pytest.approx(1.6) and eager["robots_kept_fed_limited_by"] == "latency"
    assert eager["control_hz_from"].startswith("DROID's (no robot data readable")  # the config names no data
    assert fp8(fed) <= period < fp8(fed + 1)
    eight = next(r for r in plan["rows"] if r["compute"] == "fp8" and r["sessions"] == 8)
    assert eight["batching_gain"] == pytest.approx(1, abs=0.01)
    with console.capture() as shown:  # what `wam plan --serve` prints of the same plan
        show_serving(plan)
    assert "5 sessions fit (90% of 141 GiB); serving.max_batch 8 does NOT fit" in " ".join(shown.get().split())



def test_wam_plan_serve_takes_the_robots_control_rate_from_their_data(tmp_path):
    """A chunk lasts as long as its actions take at the rate the robot's data was recorded at (what a quantized model
    records for its server): the fastest robot kind of the config sets the deadline; --control-hz overrides it."""
    datasets = []
    for name, fps in (("droid", 15), ("fast_arm", 30)):
        (tmp_path / name / "meta").mkdir(parents=True)
        (tmp_path / name / "meta" / "info.json").write_text(json.dumps({"fps": fps, "features": {}}))
        datasets.append({"uri": str(tmp_path / name), "profile": name})
    arm = {"cameras": ["observation.images.top"], "layout": "single", "state_keys": ["observation.state"],
           "action_keys": ["action"]}
    datasets.append({"uri": str(tmp_path / "elsewhere"), "profile": "other_arm"})  # not readable here: left out
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump({"model": {"preset": "dreamzero-14b"}, "data": {
        "source": "lerobot", "datasets": datasets, "profiles": {"fast_arm": arm, "other_arm": arm}}}))
    plan = serving_plan(load_config(config), "h200")  # what `wam plan --serve` shows (its wiring: the tests above)
    assert plan["control_hz"] == 30 and plan["chunk_period_s"] == pytest.approx(24 / 30)
    assert plan["control_hz_from"] == "the data's: droid 15 Hz, fast_arm 30 Hz"
    given = serving_plan(load_config(config), "h200", control_hz=10)  # --control-hz 10
    assert given["chunk_period_s"] == pytest.approx(2.4) and given["control_hz_from"] == "--control-hz"


def test_wam_plan_serve_plans_parallel_guidance_per_device_and_refuses_a_path_the_chip_lacks():
    two = serving_plan(load_config(REPO / "configs" / "dreamzero-14b.yaml", ["serving.devices=2"]), "h200")
    assert two["sampler"]["rows_per_session"] == 1  # each device runs one branch
    fp4 = wam_cli("plan", "configs/dreamzero-14b.yaml", "--accelerator", "h100", "--serve",
                  "--set", "serving.compute=nvfp4")
    assert fp4.returncode == 2
    assert "serving.compute = nvfp4: h100 has no nvfp4 matmuls; use auto (fp8 there)" in fp4.stderr
