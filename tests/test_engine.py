"""The serving engine: one forward over KV caches at different chunks, continuous batching (each session's chunk
equal to serving it alone, oldest first, a finished chunk's place taken at the next step), the compiled step
equal to the eager one through a real server, and what the server reports about it."""

import dataclasses
import gc
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from prometheus_client import generate_latest
from torch._dynamo.utils import counters

from wam.platform.config import SamplerSection, load_config, resolve_preset
from wam.platform.errors import ConfigError, UserError
from wam.platform.policy_client import PolicyClient
from wam.trainer.inference import Denoiser
from wam.trainer.model import WamInputs
from wam.trainer.model.kv_cache import KVCache
from wam.trainer.model.model import Prediction
from wam.trainer.quantize.load import choose_path, compute_path, load_quantized
from wam.trainer.serve.engine import DenoiseEngine
from wam.trainer.serve.policy import PolicyRuntime, load_runtime
from wam.trainer.serve.server import PolicyServer, serve_in_background

from conftest import (
    GUIDED_SAMPLER,
    quantized_synthetic_model,
    randomized_model,
    seeded_generator,
    session_rollout,
    wait_for,
)


@pytest.fixture(scope="module")
def model():
    preset = resolve_preset(load_config(None, []))
    return randomized_model(preset.arch, preset.sample, seed=3), preset


def close(a, b, tol=1e-4) -> bool:
    return (a - b).abs().max().item() < tol


@pytest.mark.parametrize("static, positions", [(False, (0, 2, 3, 1)), (True, (0, 2, 3, 1)), (True, (2, 2, 2, 2))])
def test_one_forward_over_caches_at_different_chunks_equals_each_alone(model, static, positions):
    # static at one chunk position: nothing padded, so attention runs unmasked but for the state rows
    net, preset = model
    pooled = Denoiser(net, compiled=True, cache_rows=5) if static else None  # a static batch reads a KVPool
    items = []
    for seed, (observed, batch) in enumerate(zip(positions, (1, 2, 1, 1), strict=True)):
        r, _ = session_rollout(model, SamplerSection(), seed, observed, batch, denoiser=pooled)
        x = WamInputs.random(preset.arch, preset.sample, batch=batch, seed=10 + seed)
        f = preset.sample.frames_per_chunk
        items.append(Prediction(r.cache, x.noisy_video[:, :, :f], x.noisy_actions[:, 0], x.state[:, 0],
                                x.video_t[:, 0], x.action_t[:, 0]))
    together = net.predict_many(items, static=static)
    for item, out in zip(items, together, strict=True):
        alone = net.predict(*item)
        assert out.video.shape == alone.video.shape and close(out.video, alone.video)
        assert close(out.actions, alone.actions)
    assert not close(together[0].actions, together[3].actions)  # the rows are not all the same


def test_the_compiled_forward_reads_the_sessions_caches_in_place_from_their_pool(model):
    """The graph's only inputs of keys and values are the pool's own tensors (static addresses: CUDA graphs copy no
    cache); the batch's rows are gathered inside it, and its outputs are those of each session alone."""
    net, preset = model
    arch = preset.arch
    denoiser = Denoiser(net, compiled=True, cache_rows=4)
    graphs = []

    def recording(graph, inputs):  # what dynamo hands the compiler: every tensor the compiled blocks read
        graphs.append(inputs)
        return graph.forward

    denoiser.blocks = torch.compile(net.run_blocks, backend=recording)
    sessions = [session_rollout(model, GUIDED_SAMPLER, seed, observed, denoiser=denoiser)
                for seed, observed in enumerate([3, 1])]
    jobs = [r.start(state, seeded_generator(i)) for i, (r, state) in enumerate(sessions)]
    together = denoiser([p for job in jobs for p in job.passes])
    pool = denoiser.pool
    kv = [t for t in graphs[-1] if isinstance(t, torch.Tensor) and t.shape[-2:] == (arch.num_heads, arch.head_dim)]
    assert sorted(t.data_ptr() for t in kv) == sorted(t.data_ptr() for t in (pool.k, pool.v, *pool.text, *pool.image))
    assert all(t._dynamo_static_input_type for t in (pool.k, pool.v, *pool.text, *pool.image))
    eager = Denoiser(net)
    for job, out in zip(jobs, together, strict=True):
        alone = eager(job.passes)[0]
        assert close(out.video, alone.video) and close(out.actions, alone.actions)


def test_a_pooled_cache_gives_its_rows_back_when_collected_and_a_full_pool_says_so(model):
    net, preset = model
    s = preset.sample
    shape = {"max_chunks": s.num_chunks, "frames_per_chunk": s.frames_per_chunk,
             "actions_per_chunk": s.actions_per_chunk, "latent_hw": (s.latent_height, s.latent_width)}
    pool = net.new_pool(3, **shape)
    first, second = net.new_cache(2, pool=pool, **shape), net.new_cache(1, pool=pool, **shape)
    assert (first.pooled.start, second.pooled.start, pool.free_rows) == (0, 2, 0)
    first.layers[1].k.fill_(1)  # a cache's tensors are its rows of the pool
    assert pool.k[1, :2].eq(1).all() and pool.k[1, 2].eq(0).all()
    with pytest.raises(RuntimeError, match="all 3 rows of the compiled engine's KV-cache pool are taken; no 1 free"
                                           ".*serving.max_sessions"):
        pool.take(1, wait_s=0.2)
    del first
    assert pool.free_rows == 2
    third = net.new_cache(2, pool=pool, **shape)
    assert third.pooled.start == 0 and pool.free_rows == 0
    held = [second]
    del second
    threading.Timer(0.3, held.clear).start()  # a session closing while another waits for its rows
    assert pool.take(1, wait_s=60) == 2
    with pytest.raises(ValueError, match="the KV pool holds .* tokens a row, this cache needs"):
        net.new_cache(1, pool=pool, **{**shape, "max_chunks": 1})


def test_the_engine_batches_sessions_oldest_first_and_each_chunk_equals_serving_it_alone(model):
    sessions = [session_rollout(model, GUIDED_SAMPLER, seed, observed) for seed, observed in enumerate([0, 3, 1, 2, 1])]
    alone = [r.act(state, seeded_generator(i)) for i, (r, state) in enumerate(sessions)]
    engine = DenoiseEngine(Denoiser(model[0]), max_batch=3)
    jobs = [r.start(state, seeded_generator(i)) for i, (r, state) in enumerate(sessions)]
    futures = [engine.submit(job) for job in jobs]  # all waiting before the engine runs: the order is known
    engine.start()
    chunks = [f.result(timeout=300) for f in futures]
    for chunk, ref in zip(chunks, alone, strict=True):
        assert close(chunk.actions, ref.actions) and close(chunk.video, ref.video)
        assert chunk.dit_steps == ref.dit_steps == 3 and chunk.forwards == ref.forwards
    # the three oldest denoised together, the two others after them, together
    assert [c.batch for c in chunks] == [3, 3, 3, 2, 2]
    waited = [c.queue_s for c in chunks]
    assert min(waited[3:]) > max(waited[:3])  # the two youngest waited for the oldest three's chunk
    assert engine.forwards == 3 * 2 and engine.chunk_steps == 3 * 3 + 3 * 2  # 3 DiT passes per chunk


def test_a_finished_chunk_is_replaced_at_the_next_step_not_after_the_batch(model):
    """Continuous batching: with room for two, a short job's place goes to a waiting one while a long one runs."""
    long, short = SamplerSection(steps=6), SamplerSection(steps=2)
    (a, sa), (b, sb), (c, sc) = (session_rollout(model, sampler, seed, 1) for seed, sampler in enumerate([long, short, short]))
    engine = DenoiseEngine(Denoiser(model[0]), max_batch=2)
    done = []
    futures = [engine.submit(r.start(state, seeded_generator(0))) for r, state in ((a, sa), (b, sb), (c, sc))]
    for name, f in zip("abc", futures, strict=True):
        f.add_done_callback(lambda _, name=name: done.append(name))
    engine.start()
    results = [f.result(timeout=300) for f in futures]
    assert done == ["b", "c", "a"]  # c joined a at a's third step and finished before it
    assert results[2].batch == 2 and engine.forwards == 6
    assert close(results[2].actions, c.act(sc, seeded_generator(0)).actions)


def requests_to_a_new_engine(net, requests: list) -> tuple[DenoiseEngine, list]:
    """Each of `requests` (a function of the engine: a session's request) from its own thread, all waiting before
    the engine starts (so they are one batch); the engine, and what each returned or raised."""
    engine, results = DenoiseEngine(Denoiser(net), max_batch=4), [None] * len(requests)

    def request(i: int) -> None:
        try:
            results[i] = requests[i](engine)
        except Exception as err:  # noqa: BLE001 - the test reads it
            results[i] = err

    threads = [threading.Thread(target=request, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    wait_for(lambda: len(engine._observing) == len(requests))
    engine.start()
    for t in threads:
        t.join()
    return engine, results


def test_sessions_frames_are_written_in_one_forward_each_as_alone_and_a_bad_one_fails_alone(model):
    """The engine writes waiting sessions' observed frames (at different chunks) into their caches in one forward,
    each cache as observing alone writes it; a session whose frames are wrong gets its own error, and the others'
    are written; a chunk requested with its frames is denoised after them, as observing and acting alone."""
    net, preset = model
    f, observed = preset.sample.frames_per_chunk, (0, 2, 1, 1)
    frames, alone, together = [], [], []
    for seed, chunk in enumerate(observed):
        frames.append(WamInputs.random(preset.arch, preset.sample, seed=50 + seed).video[:, :, 1 + chunk * f:1 + (chunk + 1) * f])
        alone.append(session_rollout(model, GUIDED_SAMPLER, seed, chunk)[0])
        alone[-1].observe(frames[-1])
        together.append(session_rollout(model, GUIDED_SAMPLER, seed, chunk)[0])
    engine, results = requests_to_a_new_engine(net, [lambda e, r=r, x=x: e.observe(r.observations(x))
                                                     for r, x in zip(together[:2], frames, strict=False)])
    assert results == [None, None] and engine.observe_forwards == 1
    wrong = session_rollout(model, GUIDED_SAMPLER, 9, 1)[0]
    state = torch.zeros(1, preset.arch.state_dim)
    engine, results = requests_to_a_new_engine(net, [
        lambda e: e.observe(wrong.observations(frames[0][:, :, :1])),
        lambda e: e.observe(together[2].observations(frames[2])),
        lambda e: e.act(together[3].observations(frames[3]), lambda: together[3].start(state, seeded_generator(0)))])
    assert isinstance(results[0], ValueError) and "expected 2 latent frame(s), got 1" in str(results[0])
    assert wrong.next_chunk == 1 and engine.observe_forwards == 2  # the good ones, each alone after the batch failed
    for ref, r in zip(alone, together, strict=True):
        length = ref.cache.layers[0].length
        assert r.next_chunk == ref.next_chunk and r.cache.layers[0].length == length
        for mine, theirs in zip(r.cache.layers, ref.cache.layers, strict=True):
            assert close(mine.k[:, :length], theirs.k[:, :length]) and close(mine.v[:, :length], theirs.v[:, :length])
    reference = alone[3].act(state, seeded_generator(0))
    assert results[2].index == reference.index == 2 and close(results[2].actions, reference.actions)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return quantized_synthetic_model(tmp_path_factory.mktemp("engine"), "engine")[0]


def kv_caches_alive() -> int:
    gc.collect()
    return sum(type(o) is KVCache for o in gc.get_objects())  # type(): no deprecated proxy is touched


def synthetic_robot(runtime, seed: int, chunks: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    meta = runtime.metadata()
    state = lambda: rng.uniform(-1, 1, meta["state_dims"]).astype(np.float32)  # noqa: E731
    frames = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # noqa: E731
    first = {"observation.image": frames(1)[0], "observation.state": state(), "prompt": "push the block"}
    return [first, *({"observation.image": frames(meta["frames_per_chunk"]), "observation.state": state(),
                      "prompt": "push the block"} for _ in range(chunks - 1))]


def test_a_compiled_server_is_ready_only_after_its_warm_up_reports_its_engine_and_equals_eager(quantized):
    # guided (two rows a chunk) at DreamZero's sampler, compiled for one and two chunks; warms up in its thread
    caches_before = kv_caches_alive()
    runtime = PolicyRuntime(load_quantized(quantized), sampler="dreamzero", compile="on", max_batch=2)
    server = PolicyServer(runtime)
    seen = []
    with serve_in_background(server) as port:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz") as r:
                    seen.append((r.status, runtime.engine.ready.is_set(), r.read().decode()))
            except urllib.error.HTTPError as err:
                seen.append((err.code, runtime.engine.ready.is_set(), err.read().decode()))
            return seen[-1][0] == 200

        wait_for(ready, timeout=300)
        assert all(ok or (status, text) == (503, "warming up: compiling the denoising step\n")
                   for status, ok, text in seen) and seen[-1][1]
        assert kv_caches_alive() == caches_before  # the warm-up's sessions let go: their device memory is free
        assert runtime.engine.denoiser.pool.free_rows == runtime.engine.denoiser.cache_rows  # ... their pool rows
        client = WebsocketClientPolicy(f"ws://127.0.0.1:{port}")
        meta = client.get_server_metadata()
        assert meta["engine"] == {"max_batch": 2, "encode_batch": 2, "compiled": True, "cuda_graphs": False, "device": "cpu", "devices": 1,
                                  "max_sessions": 16, "session_memory_gib": runtime.session_bytes / 2**30,
                                  "cpu_threads": runtime.engine.cpu_threads, "memory_gib": None}
        observations = synthetic_robot(runtime, seed=1)
        compiled = counters["stats"]["unique_graphs"]
        replies = [client.infer(obs) for obs in observations]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
            metrics = r.read().decode()
        # a model of procedural latents has no robot, so no control rate: no chunk duration, and a robot client must
        # give its own
        assert meta["control_hz"] is None and "wam_policy_chunk_seconds" not in metrics
        with pytest.raises(UserError, match="does not know its robots' control rate"):
            PolicyClient(f"ws://127.0.0.1:{port}")
        # a session at its third chunk and one at its first, in one batch (keys padded, the dense mask)
        ahead, behind = runtime.session(), runtime.session()
        for obs in synthetic_robot(runtime, seed=2):
            ahead.infer(obs)
        behind.infer(synthetic_robot(runtime, seed=3, chunks=1)[0])
        state = torch.zeros(1, runtime.policy.model.arch.state_dim)
        jobs = [session.rollout.start(state) for session in (ahead, behind)]
        for future in [runtime.engine.submit(job) for job in jobs]:  # the second joins at the first's next step
            future.result()
    assert [job.batch for job in jobs] == [2, 2] and jobs[0].rollout.next_chunk != jobs[1].rollout.next_chunk
    assert counters["stats"]["unique_graphs"] == compiled  # every graph the robots needed was compiled in the warm-up
    assert ('wam_policy_engine_info{compiled="True",compute_path="fp32-dequantized",cuda_graphs="False",'
            'device="cpu",devices="1",max_batch="2"} 1.0') in metrics
    assert re.search(r'wam_policy_batch_chunks_bucket\{le="1.0"\} 3.0', metrics)
    # the robot's session (still connected when /metrics was read) holds its 2 rows of the 16 sessions' 32
    assert "wam_policy_kv_pool_free_rows 30.0" in metrics
    eager = PolicyRuntime(load_quantized(quantized), sampler="dreamzero", compile="off")
    assert eager.metadata()["engine"]["compiled"] is False
    session = eager.session()
    for reply, obs in zip(replies, observations, strict=True):
        assert reply["server_timing"]["batch"] == 1
        np.testing.assert_allclose(reply["actions"], session.infer(obs)["actions"], atol=1e-4)


def test_a_cpu_engine_runs_on_the_threads_it_measured_faster_or_on_those_set(quantized):
    """With several threads running torch's ops (a server's), a small model's forward can be several times slower
    on 2 threads than on 1: the engine times its forward at 1 thread and at torch's default in its own thread, keeps
    the faster before it reports ready, and the sessions' threads started later run on it too."""
    runtime = PolicyRuntime(load_quantized(quantized))
    wait_for(runtime.engine.ready.is_set, timeout=120)
    timings, chosen = runtime.engine.thread_timings_ms, runtime.engine.cpu_threads
    assert set(timings) == {1, torch.get_num_threads()} and chosen == min(timings, key=timings.get)
    assert runtime.metadata()["engine"]["cpu_threads"] == chosen
    later: list[int] = []  # a session's worker thread, started after the engine chose
    worker = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    assert later == [chosen]
    policy = load_quantized(quantized)
    policy.config.serving.cpu_threads = 1  # set: nothing measured
    fixed = PolicyRuntime(policy)
    wait_for(fixed.engine.ready.is_set, timeout=120)
    assert fixed.engine.cpu_threads == 1 and fixed.engine.thread_timings_ms == {}


def test_a_process_that_exits_while_its_engine_warms_up_ends_cleanly(quantized):
    """A script (or a server) that ends without stopping its engine, here in the middle of the engine's warm-up:
    the engine is stopped at exit, where its thread in torch's native code used to abort the process (134)."""
    script = ("import sys; from wam.trainer.quantize.load import load_quantized; "
              "from wam.trainer.serve.policy import PolicyRuntime; runtime = PolicyRuntime(load_quantized(sys.argv[1])); "
              "assert not runtime.engine.ready.is_set(), 'warmed up already'")
    ended = subprocess.run([sys.executable, "-c", script, quantized], capture_output=True, text=True, timeout=300)
    assert ended.returncode == 0 and "terminate called" not in ended.stderr, (ended.returncode, ended.stderr[-2000:])


def test_the_compute_path_follows_the_chip_and_a_path_the_chip_lacks_is_refused(quantized):
    everything = {"nvfp4", "fp8"}
    assert choose_path((10, 0), everything) == "nvfp4"  # Blackwell
    assert choose_path((10, 0), {"fp8"}) == "fp8"  # a torchao without NVFP4
    assert choose_path((9, 0), everything) == "fp8"  # Hopper
    assert choose_path((9, 0), set()) == "bf16-dequantized"  # no torchao
    assert choose_path((8, 0), everything) == "bf16-dequantized"  # Ampere: no FP8 tensor cores
    assert choose_path(None, everything) == compute_path(torch.device("cpu")) == "fp32-dequantized"
    for path, need in (("fp8", r"8\.9 \(Hopper or Ada\)"), ("nvfp4", r"10\.0 \(Blackwell\)")):
        with pytest.raises(ConfigError, match=rf"--compute = {path} needs a CUDA GPU of compute capability >= {need}; "
                                              "cpu has none; use auto"):
            load_runtime(quantized, "cpu", compute=path)
    with pytest.raises(ConfigError, match="--compute = 'fp2' is not one of auto, nvfp4, fp8"):
        load_runtime(quantized, "cpu", compute="fp2")
    runtime = load_runtime(quantized, "cpu", compute="bf16-dequantized", max_batch=1)  # named: runs on the CPU too
    assert runtime.metadata()["compute_path"] == "bf16-dequantized"
    assert runtime.policy.model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert 'compute_path="bf16-dequantized"' in generate_latest(PolicyServer(runtime).metrics.registry).decode()


def test_guidance_on_a_peer_process_equals_sequential_guidance_and_a_dead_peer_makes_the_server_unready(quantized):
    """devices 2 on the CPU: rank 1 a second process (gloo), the unconditional caches and passes there."""
    runtime = PolicyRuntime(load_quantized(quantized), sampler="dreamzero", devices=2)
    meta = runtime.metadata()
    assert meta["engine"]["devices"] == 2 and meta["sampler"]["guidance_passes"] == "parallel"
    sequential = PolicyRuntime(load_quantized(quantized), sampler="dreamzero")
    sequential.sampler = dataclasses.replace(sequential.sampler, guidance_batch=False)
    alone = sequential.session()
    observations = synthetic_robot(runtime, seed=2)
    with serve_in_background(PolicyServer(runtime)) as port:
        client = WebsocketClientPolicy(f"ws://127.0.0.1:{port}")
        for obs in observations:
            reply = client.infer(obs)
            assert reply["server_timing"]["transformer_passes"] == 16  # 8 DiT steps, two passes each
            np.testing.assert_allclose(reply["actions"], alone.infer(obs)["actions"], atol=1e-4)
        runtime.peer.process.kill()

        def unready() -> str | None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz")
            except urllib.error.HTTPError as err:
                return err.read().decode()
            return None

        reason = wait_for(unready, timeout=60)
        assert re.fullmatch(r"not serving: the guidance peer \(rank 1, pid \d+\) exited with code -9; classifier-free "
                            r"guidance cannot run; restart the server\n", reason)
        with pytest.raises(RuntimeError, match="server unavailable: the guidance peer"):
            client.infer(observations[1])
