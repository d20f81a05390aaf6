"""The policy server against the public openpi-client: closed loop, sessions, bad requests, the KV cache
against the uncached computation, action post-processing, and the whole local pipeline."""

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

from wam.platform.config import load_config, resolve_preset
from wam.platform.errors import ConfigError, UserError
from wam.platform.policy_client import API_KEY_ENV, PolicyClient, run_async
from wam.trainer.data.transforms import normalize
from wam.trainer.flow import euler_step
from wam.trainer.model import WamInputs
from wam.trainer.quantize.load import load_quantized
from wam.trainer.quantize.quantizer import quantize_checkpoint
from wam.trainer.serve import actions as post
from wam.trainer.serve.memory import serving_memory
from wam.trainer.serve.policy import PolicyRuntime
from wam.trainer.serve.roboarena import server_config
from wam.trainer.serve.server import CUT_OFF, PolicyServer, serve_in_background

from conftest import (
    alert_metrics,
    alert_rules,
    dashboard_queries,
    free_port,
    prometheus,
    randomized_model,
    wait_for,
    waiting_together,
    wam_cli,
    write_checkpoint,
    write_run_config,
)

WRIST_PROFILE = {"cameras": ["observation.images.wrist_left"], "layout": "single", "state_keys": ["observation.state"],
                 "action_keys": ["action"], "relative_dims": [], "gripper_dims": [7], "gripper_threshold": 0.3}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from wam.trainer.data.synth_dataset import SynthOptions, synthesize

    folder = tmp_path_factory.mktemp("serve")
    dataset = synthesize(folder / "data", SynthOptions(episodes=2, seed=5))
    # a second robot kind in the same model: one wrist camera, absolute joint commands, its own statistics
    other = synthesize(folder / "wrist-data", SynthOptions(episodes=2, seed=6))
    config = write_run_config(folder, "policy", sample={"num_chunks": 2, "actions_per_chunk": 24},
                              data={"source": "lerobot", "profiles": {"wrist": WRIST_PROFILE},
                                    "datasets": [{"uri": str(dataset), "profile": "droid"},
                                                 {"uri": str(other), "profile": "wrist"}]},
                              # the SIGTERM test's chunk (2000 steps) takes 10 s idle, a minute on a busy machine:
                              # it is to be answered, not cut off at the drain timeout
                              serving={"max_request_mb": 2, "drain_timeout_s": 600})
    cfg = load_config(config)
    preset = resolve_preset(cfg)
    model = randomized_model(preset.arch, preset.sample, seed=11)
    checkpoint = write_checkpoint(folder / "checkpoints", cfg, model)
    quantized = quantize_checkpoint(checkpoint).out
    runtime = PolicyRuntime(load_quantized(quantized))
    server = PolicyServer(runtime)
    with serve_in_background(server) as port:
        yield {"cfg": cfg, "dataset": dataset, "runtime": runtime, "server": server, "uri": f"ws://127.0.0.1:{port}",
               "port": port, "quantized": quantized}


def robot_observations(runtime, seed, chunks=2, prompt="put the red block on the blue one", embodiment=None):
    """A first observation and the following ones (each chunk's frames), as a robot of `embodiment` (default: the
    one served at /) would send them."""
    rng = np.random.default_rng(seed)
    embodiment = runtime.embodiments[embodiment] if embodiment else runtime.default_embodiment
    meta = runtime.metadata(embodiment)
    low, high = embodiment.stats.state_q01, embodiment.stats.state_q99  # states like the ones it was trained on
    state = lambda: rng.uniform(low, high).astype(np.float32)  # noqa: E731
    frames = lambda n: rng.integers(0, 256, (n, 48, 64, 3), dtype=np.uint8)  # noqa: E731
    first = {**{c: frames(1)[0] for c in meta["cameras"]}, "observation.state": state(), "prompt": prompt}
    later = [{**{c: frames(meta["frames_per_chunk"]) for c in meta["cameras"]}, "observation.state": state(),
              "prompt": prompt} for _ in range(chunks - 1)]
    return [first, *later]


def test_openpi_client_drives_the_server_end_to_end(served):
    client = WebsocketClientPolicy(served["uri"])
    meta = client.get_server_metadata()
    assert meta["embodiment"] == "droid" and meta["action_units"] == "robot" and meta["compute_path"] == "fp32-dequantized"
    assert meta["control_hz"] == 15 and meta["chunk_seconds"] == pytest.approx(1.6)  # DROID: 24 actions at 15 Hz
    assert meta["cameras"] == ["observation.images.wrist_left", "observation.images.exterior_1_left",
                               "observation.images.exterior_2_left"]
    for i, obs in enumerate(robot_observations(served["runtime"], seed=1, chunks=3)):
        reply = client.infer(obs)
        assert reply["actions"].shape == (24, meta["action_dims"]) and np.isfinite(reply["actions"]).all()
        assert set(np.unique(reply["actions"][:, 7])) <= {0.0, 1.0}  # the gripper dim is binarised
        assert reply["chunk"] == i and reply["window_chunk"] == i % 2 and reply["new_window"] == (i % 2 == 0)
        assert {"infer_ms", "queue_ms", "encode_ms", "denoise_ms"} <= set(reply["server_timing"])
    assert client.infer({"reset": True}) == {"reset": True}
    with urllib.request.urlopen(f"http://127.0.0.1:{served['port']}/healthz") as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{served['port']}/readyz") as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{served['port']}/metrics") as r:
        metrics = r.read().decode()
    assert re.search(r"wam_policy_requests_total [1-9]", metrics) and "wam_policy_request_seconds_bucket" in metrics
    assert 'wam_policy_info{compute_path="fp32-dequantized",preset="tiny",step="5"} 1.0' in metrics
    # what the chart's alerts read (tests/test_k8s_manifests.py): a chunk's duration, a latency bucket ending there
    assert 'wam_policy_chunk_seconds{embodiment="droid"} 1.6' in metrics
    assert 'wam_policy_request_seconds_bucket{embodiment="droid",le="1.6"}' in metrics
    read = alert_metrics("wam_policy_")
    assert read and all(f"# TYPE {name} " in metrics for name in read)


# RoboArena's PolicyServerConfig: its evaluation client reads these fields, its test script builds the dataclass from
# exactly them
ROBOARENA_CONFIG = {"image_resolution", "needs_wrist_camera", "n_external_cameras", "needs_stereo_camera",
                    "needs_session_id", "action_space"}


def test_a_roboarena_client_drives_the_droid_policy_one_frame_a_call(served, tmp_path):
    """serving.protocol roboarena, as RoboArena's DROID evaluation client (v1.4; not on PyPI, so its exchange is made
    here as it makes it: websockets, openpi-client's msgpack-numpy, an "endpoint" per request, the current frame of
    each camera at the size the server asks for, joint and gripper positions). It gets RoboArena's config, (24, 8)
    chunks, each from a new context window, the same actions as the openpi protocol gives the same observation in
    the profile's own keys, a bad request's text without losing the session, and "reset successful". Its recorded
    session is served again over the same protocol, and shows what its cameras sent."""
    from websockets.sync.client import connect

    from wam.trainer.serve.recorder import read_recording
    from wam.trainer.serve.rerun import rerun, robot_view

    runtime = served["runtime"]
    server = PolicyServer(runtime, protocol="roboarena", record=str(tmp_path / "recordings"))
    with serve_in_background(server) as port, connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
        config = msgpack_numpy.unpackb(ws.recv())
        assert set(config) == ROBOARENA_CONFIG
        assert config["needs_wrist_camera"] and config["n_external_cameras"] == 2 and not config["needs_session_id"]
        assert config["action_space"] == "joint_position" and len(config["image_resolution"]) == 2
        h, w = config["image_resolution"]
        rng = np.random.default_rng(7)
        stats = runtime.default_embodiment.stats

        def request(**extra):
            state = rng.uniform(stats.state_q01, stats.state_q99)
            return {"observation/joint_position": state[:7], "observation/cartesian_position": rng.normal(size=6),
                    "observation/gripper_position": state[7:], "prompt": "put the red block on the blue one",
                    **{f"observation/exterior_image_{i}_left": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                       for i in (1, 2)},
                    "observation/wrist_image_left": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), **extra}

        sent = [request(endpoint="infer") for _ in range(2)]
        replies = []
        for obs in sent:
            ws.send(msgpack_numpy.packb(obs))
            replies.append(msgpack_numpy.unpackb(ws.recv()))
        for reply in replies:
            assert reply["actions"].shape == (24, 8) and np.isfinite(reply["actions"]).all()
            assert reply["new_window"] and reply["window_chunk"] == 0  # one frame a call: each opens a window
        ws.send(msgpack_numpy.packb(request()))  # no endpoint
        assert re.match(r'bad request: a RoboArena request names its "endpoint"', ws.recv())
        ws.send(msgpack_numpy.packb({"endpoint": "reset", "session_id": "A"}))
        assert ws.recv() == "reset successful"
        ws.send(msgpack_numpy.packb(request(endpoint="infer")))
        assert msgpack_numpy.unpackb(ws.recv())["chunk"] == 2
        assert metric(port, 'wam_policy_errors_total{reason="bad_request"}') == 1
        with pytest.raises(InvalidStatus, match="404"):  # the wrist robot's profile has no RoboArena keys
            connect(f"ws://127.0.0.1:{port}/wrist")
        with pytest.raises(UserError, match=r"speaks RoboArena's protocol .* serve the model with --protocol openpi"):
            PolicyClient(f"ws://127.0.0.1:{port}")  # wam client's
    server.recorder.flush()
    sessions = [read_recording(folder) for folder in (tmp_path / "recordings" / "droid").iterdir()]
    assert sorted(len(exchanges) for _, exchanges in sessions) == [0, 5]  # wam client's session asked nothing
    description, exchanges = max(sessions, key=lambda session: len(session[1]))
    assert description["protocol"] == "roboarena"
    again = rerun(description, exchanges)
    assert [r.kind for r in again] == ["chunk", "chunk", "error", "reset", "chunk"] and all(r.same for r in again)
    frames, _ = robot_view(description, exchanges)
    assert frames.shape[0] == 4  # the current frame of each request with cameras (the bad one's too)
    # the first call's observation in the droid profile's own keys, over openpi: the same chunk
    first = sent[0]
    openpi = WebsocketClientPolicy(served["uri"])
    same = openpi.infer({"observation.images.wrist_left": first["observation/wrist_image_left"],
                         "observation.images.exterior_1_left": first["observation/exterior_image_1_left"],
                         "observation.images.exterior_2_left": first["observation/exterior_image_2_left"],
                         "observation.state": np.concatenate([first["observation/joint_position"],
                                                              first["observation/gripper_position"]]),
                         "prompt": first["prompt"]})
    np.testing.assert_allclose(same["actions"], replies[0]["actions"], atol=1e-5)
    # what a server whose / is the wrist robot's would refuse to start with
    with pytest.raises(ConfigError, match=r"embodiment wrist cannot be served over RoboArena's protocol .* its cameras "
                                          r"arrive as \['observation.images.wrist_left'\].* action_space is not declared"):
        server_config(runtime.embodiments["wrist"], runtime.canvas)


def test_two_concurrent_sessions_do_not_interfere(served):
    a_obs = robot_observations(served["runtime"], seed=2, chunks=3)
    b_obs = robot_observations(served["runtime"], seed=3, chunks=3, prompt="open the drawer")
    client = WebsocketClientPolicy(served["uri"])
    alone = [client.infer(o)["actions"] for o in a_obs]
    results = {}

    def run(name, observations):
        c = WebsocketClientPolicy(served["uri"])
        results[name] = [c.infer(o)["actions"] for o in observations]

    vae, started, spans = served["runtime"].encoders.vae, {}, []  # when each VAE encoder call starts and ends
    hooks = [vae.encoder.register_forward_pre_hook(
                 lambda *_: started.__setitem__(threading.get_ident(), time.perf_counter())),
             vae.encoder.register_forward_hook(
                 lambda *_: spans.append((started.pop(threading.get_ident()), time.perf_counter())))]
    threads = [threading.Thread(target=run, args=(n, o)) for n, o in (("a", a_obs), ("b", b_obs))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for hook in hooks:
            hook.remove()
    # batched with b's chunks (the engine), a's equal its chunks alone up to float rounding
    assert all(np.allclose(x, y, atol=1e-4) for x, y in zip(alone, results["a"], strict=True))
    assert not np.allclose(results["a"][0], results["b"][0], atol=1e-4)
    # the two robots' frames went through the VAE in turn (the admission counts one request's work at a time)
    spans.sort()
    assert len(spans) >= 6 and all(end <= start for (_, end), (start, _) in pairwise(spans))


def test_work_arriving_while_the_encoder_is_busy_shares_one_call(served):
    """Robots whose work arrives while another request holds the encoders share a batched call: two robots' new
    context windows (first frames, image-to-video channels), then one robot's first chunk's frames and the other's
    second (their causal streams at different points). Each robot's chunks equal those it is served alone."""
    runtime = served["runtime"]
    a_obs = robot_observations(runtime, seed=31, chunks=2)
    b_obs = robot_observations(runtime, seed=32, chunks=3, prompt="open the drawer")

    def served_alone(observations: list[dict]) -> list[np.ndarray]:
        session = runtime.session()
        return [session.infer(o)["actions"] for o in observations]

    alone = {"a": served_alone(a_obs), "b": served_alone(b_obs)}
    robots = {"a": runtime.session(), "b": runtime.session()}
    for name, first in (("a", a_obs[0]), ("b", b_obs[0])):  # each prompt's features encoded once, then a new episode
        robots[name].infer(first)
        robots[name].infer({"reset": True})
    got: dict[str, list[np.ndarray]] = {"a": [], "b": []}

    def together(requests: dict[str, dict]) -> list[int]:
        """The robots' requests, sent while another request holds the encoders; the batch of each VAE call."""
        results, calls = waiting_together(runtime.frame_encoder, [lambda k=k, o=o: robots[k].infer(o)["actions"]
                                                                  for k, o in requests.items()])
        for i, k in enumerate(requests):
            got[k].append(results[i])
        return calls

    windows = together({"a": a_obs[0], "b": b_obs[0]})
    got["b"].append(robots["b"].infer(b_obs[1])["actions"])
    chunks = together({"a": a_obs[1], "b": b_obs[2]})
    assert set(windows) == {2} and chunks[0] == 2, (windows, chunks)  # (b's window then full: a new one, alone)
    assert runtime.metadata()["engine"]["encode_batch"] == runtime.max_batch > 1
    for k in ("a", "b"):
        assert all(np.allclose(x, y, atol=1e-4) for x, y in zip(alone[k], got[k], strict=True)), k


def test_one_server_drives_robots_of_different_embodiments_in_shared_forwards(served):
    """A model trained on two robots serves both from one server: each robot picks its embodiment by the path and
    gets its metadata; its chunks, batched with the other robot's, equal those of a server of its embodiment alone."""
    runtime, uri, port = served["runtime"], served["uri"], served["port"]
    with contextlib.ExitStack() as robots:  # every session closed after: the module's server admits 16

        def robot(path: str) -> PolicyClient:
            client = PolicyClient(uri + path)
            robots.callback(client.close)
            return client

        meta = {path: robot(path).metadata for path in ("", "/droid", "/wrist")}
        assert meta[""]["embodiment"] == meta["/droid"]["embodiment"] == "droid" and meta[""]["gripper_dims"] == [7]
        wrist = meta["/wrist"]
        assert wrist["embodiment"] == "wrist" and wrist["cameras"] == ["observation.images.wrist_left"]
        assert wrist["embodiments"] == ["droid", "wrist"] and wrist["safety"] != meta[""]["safety"]  # own statistics
        with pytest.raises(InvalidStatus) as err:
            WebsocketClientPolicy(f"{uri}/franka")
        assert err.value.response.status_code == 404 and "/droid, /wrist" in err.value.response.body.decode()

        observations = {"droid": robot_observations(runtime, seed=21, chunks=3),
                        "wrist": robot_observations(runtime, seed=22, chunks=3, prompt="open the drawer",
                                                    embodiment="wrist")}
        policy = load_quantized(served["quantized"])
        policy.config.serving.cpu_threads = 1
        only_wrist = PolicyRuntime(policy, embodiment="wrist").session()  # a server of wrist robots alone
        droid_alone = robot("")
        alone = {"droid": [droid_alone.infer(o).actions for o in observations["droid"]],
                 "wrist": [only_wrist.infer(o)["actions"] for o in observations["wrist"]]}
        barrier, together = threading.Barrier(2), {}

        def run(name):
            client, together[name] = robot(f"/{name}"), []
            for obs in observations[name]:
                barrier.wait(120)  # both robots ask at once
                together[name].append(client.infer(obs).actions)

        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(run, name) for name in observations]:
                done.result(300)
        for name in observations:
            assert all(np.allclose(x, y, atol=1e-4) for x, y in zip(alone[name], together[name], strict=True)), name

        # Whether those chunks overlapped in time is the machine's to say (a DROID robot's three cameras take longer
        # to encode than the wrist robot's one); the engine's shared forward is checked with both chunks queued: the
        # second joins at the first's next step. Each equals its robot's chunk denoised alone.
        def sessions_after_one_chunk() -> dict:
            sessions = {name: runtime.session(runtime.embodiments[name]) for name in observations}
            for name, session in sessions.items():
                session.infer(observations[name][0])
            return sessions

        state = torch.zeros(1, runtime.arch.state_dim)
        solo = {name: runtime.engine.run(s.rollout.start(state, s.generator)) for name, s in sessions_after_one_chunk().items()}
        jobs = {name: s.rollout.start(state, s.generator) for name, s in sessions_after_one_chunk().items()}
        shared = {name: future.result(300) for name, future in [(n, runtime.engine.submit(j)) for n, j in jobs.items()]}
        assert [solo[name].batch for name in observations] == [1, 1] and [job.batch for job in jobs.values()] == [2, 2]
        for name in observations:
            assert torch.allclose(shared[name].actions, solo[name].actions, atol=1e-4), name
        assert not torch.allclose(shared["droid"].actions, shared["wrist"].actions, atol=1e-4)
    assert metric(port, 'wam_policy_request_seconds_count{embodiment="wrist"}') >= 3
    assert metric(port, 'wam_policy_chunk_seconds{embodiment="wrist"}') == pytest.approx(1.6)
    wait_for(lambda: metric(port, 'wam_policy_sessions{embodiment="wrist"}') == 0, timeout=60)


def test_malformed_requests_get_an_error_and_the_server_keeps_serving(served):
    client = WebsocketClientPolicy(served["uri"])
    good = robot_observations(served["runtime"], seed=4)[0]
    camera = served["runtime"].default_embodiment.profile.cameras[0]
    bad = {
        "missing state": {k: v for k, v in good.items() if k != "observation.state"},
        "missing prompt": {k: v for k, v in good.items() if k != "prompt"},
        "float image": {**good, camera: good[camera].astype(np.float32)},
        "wrong image shape": {**good, camera: good[camera][..., :2]},
        "wrong state size": {**good, "observation.state": np.zeros(3, np.float32)},
        "NaN state": {**good, "observation.state": np.full_like(good["observation.state"], np.nan)},
        "not a map": [1, 2, 3],
    }
    for name, obs in bad.items():
        with pytest.raises(RuntimeError, match="bad request") as err:
            client.infer(obs)
        assert len(str(err.value)) > 40, name
    for raw in (b"\xc1\xff garbage", b"\x92\x01"):  # not msgpack, then trailing data
        client._ws.send(raw)
        assert client._ws.recv().startswith("bad request: cannot decode")
    client._ws.send("a text frame")
    assert "binary msgpack" in client._ws.recv()
    assert client.infer(good)["actions"].shape[0] == 24  # the same session still works
    assert WebsocketClientPolicy(served["uri"]).infer(good)["actions"].shape[0] == 24
    # larger than serving.max_request_mb: refused from its frame header, before its bytes are buffered; the
    # connection closes (websockets cannot skip a message), every other session goes on
    with pytest.raises(ConnectionClosedError, match=r"1009 \(message too big\).*exceeds limit of 2000000 bytes"):
        client.infer({**good, "padding": np.zeros(3_000_000, np.uint8)})
    assert WebsocketClientPolicy(served["uri"]).infer(good)["actions"].shape[0] == 24


def test_kv_cached_serving_equals_the_uncached_computation(served):
    runtime = served["runtime"]
    session = runtime.session()
    observations = robot_observations(runtime, seed=6, chunks=2)
    served_chunks, states = [], []
    for obs in observations:
        session.infer(obs)
        served_chunks.append(session.returned[-1].normalised)
        q01, q99 = session.embodiment.state_range
        states.append(torch.zeros(runtime.arch.state_dim))
        states[-1][:len(q01)] = torch.as_tensor(normalize(obs["observation.state"].astype(np.float64), q01, q99))
    # The uncached computation: every denoising step is one full teacher-forcing forward over the whole
    # sequence so far (the first frame, the real frames of earlier chunks, the noisy chunk).
    from wam.trainer.data.transforms import tile

    profile = session.embodiment.profile
    views = [torch.from_numpy(np.concatenate([observations[0][c][None]] + [o[c] for o in observations[1:]]))
             .permute(0, 3, 1, 2) for c in profile.cameras]
    pixels = tile(views, profile.layout, runtime.canvas).permute(1, 0, 2, 3)[None].float() / 127.5 - 1
    model, encoders, s = runtime.policy.model, runtime.encoders, runtime.sample
    latents = encoders.vae.encode(pixels)
    latents = torch.cat([latents, torch.zeros_like(latents[:, :, 1:1 + s.frames_per_chunk])], dim=2)  # never seen
    first = pixels[:, :, 0]
    text = encoders.text([observations[0]["prompt"]])
    image = encoders.image(first) if encoders.image is not None else None
    g = torch.Generator().manual_seed(served["cfg"].seed)
    f, a, k = s.frames_per_chunk, s.actions_per_chunk, len(observations)
    sigmas = session.rollout.video_sigmas, session.rollout.action_sigmas
    for c in range(k):
        video = torch.randn(1, model.arch.out_dim, f, s.latent_height, s.latent_width, generator=g)
        acts = torch.randn(1, a, model.arch.action_dim, generator=g)
        for i in range(len(sigmas[0]) - 1):
            sv, sa = sigmas[0][i].item(), sigmas[1][i].item()
            zeros = torch.zeros(1, c)
            inputs = WamInputs(
                video=latents[:, :, :1 + (c + 1) * f],
                noisy_video=torch.cat([torch.zeros_like(latents[:, :, 1:1 + c * f]), video], dim=2),
                noisy_actions=torch.cat([torch.zeros(1, c, a, model.arch.action_dim), acts[:, None]], dim=1),
                state=torch.stack(states[:c + 1])[None], video_t=torch.cat([zeros, torch.full((1, 1), sv * 1000)], 1),
                action_t=torch.cat([zeros, torch.full((1, 1), sa * 1000)], 1), text=text, image=image,
                i2v_cond=encoders.i2v_condition(first, 1 + (c + 1) * f) if model.arch.i2v_concat else None)
            with torch.no_grad():
                out = model(inputs)
            video = euler_step(video, out.video[:, :, c * f:], sv, sigmas[0][i + 1].item())
            acts = euler_step(acts, out.actions[:, c], sa, sigmas[1][i + 1].item())
        assert torch.allclose(acts[0], served_chunks[c], atol=1e-4), (c, (acts[0] - served_chunks[c]).abs().max())


def test_async_execution_computes_ahead_and_reports_the_deadline(served):
    client = PolicyClient(served["uri"])  # at the server's rate: its data's 15 Hz
    observations = robot_observations(served["runtime"], seed=8, chunks=4)
    later = iter(observations[1:])
    executed = []

    def execute(actions):
        executed.append(actions)
        return next(later)

    results = list(run_async(client, observations[0], execute, chunks=4))
    client.close()
    assert len(results) == 4 and len(executed) == 3
    assert all(r.budget_ms == pytest.approx(1000 * 24 / 15) for r in results)
    assert all(isinstance(r.met_deadline, bool) and r.server_timing["queue_ms"] >= 0 for r in results)
    assert [r.new_window for r in results] == [True, False, True, False]  # 2-chunk windows restart


def test_action_postprocessing_steps():
    q01, q99 = np.array([-2.0, 0.0, 5.0]), np.array([2.0, 1.0, 5.0])
    x = np.random.default_rng(0).uniform(-3, 3, (10, 3))
    x[:, 2] = 5.0
    assert np.allclose(post.unnormalize(normalize(np.clip(x, q01, q99), q01, q99), q01, q99), np.clip(x, q01, q99))
    absolute = post.to_absolute(np.zeros((4, 3)), np.array([1.0, 2.0, 3.0]), (0, 2))
    assert np.array_equal(absolute, np.tile([1.0, 0.0, 3.0], (4, 1)))
    ramp = np.stack([np.linspace(0, 1, 24), np.linspace(1, -1, 24)], axis=1)
    assert np.allclose(post.smooth(ramp, 7, 3), ramp)  # polynomials pass unchanged, no time shift
    noisy = ramp + np.random.default_rng(1).normal(0, 0.05, ramp.shape)
    assert np.abs(post.smooth(noisy, 7, 3) - ramp).mean() < 0.8 * np.abs(noisy - ramp).mean()
    assert np.array_equal(post.smooth(noisy, 0, 3), noisy)
    assert np.array_equal(post.binarize(np.array([[0.2, 0.7], [0.6, 0.1]]), (1,), 0.5), [[0.2, 1.0], [0.6, 0.0]])


def test_pipeline_trains_quantizes_and_serves_to_a_real_client(tmp_path):
    from wam.trainer.data.synth_dataset import SynthOptions, synthesize

    train = synthesize(tmp_path / "train", SynthOptions(episodes=3))
    heldout = synthesize(tmp_path / "heldout", SynthOptions(episodes=2, seed=1))
    config = write_run_config(tmp_path, "pipe", sample={"num_chunks": 2, "actions_per_chunk": 24},
                              data={"source": "lerobot", "datasets": [{"uri": str(train), "profile": "droid"}],
                                    "workers": 1}, training={"steps": 4}, checkpoint={"interval": 2})
    port = __import__("conftest").free_port()
    result = wam_cli("pipeline", config, "--every", "--port", port, "--client-dataset", heldout, "--async")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cfg = load_config(config)
    quantized = sorted(p.name for p in (cfg.run_dir / "checkpoints/nvfp4").iterdir())
    assert quantized == ["step-2", "step-4"]
    assert re.search(r"2 chunks from ws://127.0.0.1:\d+ \(async", " ".join(result.stdout.split()))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(cfg.run_dir / 'mlflow.db').resolve()}")
    versions = client.search_model_versions("name='wam-pipe-nvfp4'")
    assert sorted(v.tags["step"] for v in versions) == ["2", "4"]
    run = client.get_run(versions[0].run_id)
    assert "nvfp4/relative_error_mean" in run.data.metrics
    report = json.loads((cfg.run_dir / "checkpoints/nvfp4/step-4/report.json").read_text())
    assert report["summary"]["layers_nvfp4"] > 0


# -- the safety envelope and the server's limits ---------------------------------------------------------------


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", r.read().decode(), re.M)
    return float(found.group(1)) if found else 0.0


def test_states_far_outside_the_training_range_are_refused(served):
    client = WebsocketClientPolicy(served["uri"])
    good = robot_observations(served["runtime"], seed=9)[0]
    for state, shown in ((np.full(8, 1e300), "dim 0 = 1e+300"), (np.full(8, 1e30, np.float32), "dim 0 = 1e+30"),
                         (good["observation.state"] - np.float32(5), "dim 0 = ")):
        with pytest.raises(RuntimeError, match=rf"bad request: the state is far outside .*{re.escape(shown)}") as err:
            client.infer({**good, "observation.state": state})
        assert "accepted" in str(err.value) and "serving.state_margin" in str(err.value)
    assert np.isfinite(client.infer(good)["actions"]).all()  # the session goes on


def test_served_actions_stay_inside_the_safety_envelope(served):
    """Random weights and adversarial frames: whatever the model proposes, what leaves the server is finite,
    within every dim's limits and moves at most the step limit per step (grippers may jump)."""
    client = WebsocketClientPolicy(served["uri"])
    meta = client.get_server_metadata()
    limits = meta["safety"]
    low, high, step = (np.asarray(limits[k], dtype=np.float64) for k in ("action_low", "action_high",
                                                                         "max_action_step"))
    assert limits["limits_from"] == "training data" and np.isfinite(step[:7]).all() and np.isinf(step[7])
    runtime, clipped = served["runtime"], 0
    observations = robot_observations(runtime, seed=10, chunks=2)
    for fill in (0, 255, None):
        frames = [{k: (np.full_like(v, fill) if fill is not None and k in meta["cameras"] else v) for k, v in o.items()}
                  for o in observations]
        client.infer({"reset": True})
        for obs in frames:
            reply = client.infer(obs)
            actions = reply["actions"].astype(np.float64)
            assert np.isfinite(actions).all() and (actions >= low - 1e-5).all() and (actions <= high + 1e-5).all()
            moves = np.abs(np.diff(np.concatenate([obs["observation.state"][None], actions]), axis=0))[:, :7]
            assert (moves <= step[:7] * (1 + 1e-5) + 1e-6).all()
            clipped += reply["safety"]["clipped_values"]
    assert clipped > 0, "random weights should have needed clipping somewhere"
    assert metric(served["port"], "wam_policy_clipped_values_total") >= clipped


def test_a_checkpoint_whose_weights_overflow_never_sends_inf(served):
    policy = load_quantized(served["quantized"])
    with torch.no_grad():  # weights that overflow float32 in the action decoder
        for layer in (policy.model.action_decoder.layer1, policy.model.action_decoder.layer2):
            layer.weight.mul_(1e30)
    server = PolicyServer(PolicyRuntime(policy))
    with serve_in_background(server) as port:
        client = WebsocketClientPolicy(f"ws://127.0.0.1:{port}")
        for obs in robot_observations(served["runtime"], seed=11, chunks=2)[:1] * 2:
            with pytest.raises(RuntimeError, match="unsafe output: the policy produced non-finite actions in dims"):
                client.infer(obs)  # refused, the session reset: the next call starts again and is refused again
        assert metric(port, 'wam_policy_errors_total{reason="unsafe_output"}') == 2


def test_requests_that_used_to_break_a_session(served):
    client = WebsocketClientPolicy(served["uri"])
    good, *later = robot_observations(served["runtime"], seed=12, chunks=2)
    with pytest.raises(RuntimeError, match="bad request: observation.state must be a flat array"):
        client.infer({**good, "observation.state": [[1, 2], [3]]})
    with pytest.raises(RuntimeError, match='bad request: a reset is exactly {"reset": true}'):
        client.infer({"reset": "no"})
    # a reset starts the next episode exactly as a new connection would: its noise included
    new_connection = WebsocketClientPolicy(served["uri"])
    fresh = [new_connection.infer(obs)["actions"] for obs in [good, *later]]
    client.infer(good)  # draws noise
    assert client.infer({"reset": True}) == {"reset": True}
    again = [client.infer(obs)["actions"] for obs in [good, *later]]
    assert all(np.array_equal(a, b) for a, b in zip(fresh, again, strict=True))


def test_a_full_server_refuses_clearly_and_idle_sessions_are_reclaimed(served, tmp_path):
    """... and a real Prometheus scraping it with the chart's alerts raises WamPolicyRobotsRefused."""
    server = PolicyServer(served["runtime"], max_sessions=1, idle_timeout_s=1.0)
    good = robot_observations(served["runtime"], seed=13)[0]
    with serve_in_background(server) as port, prometheus(tmp_path, {"policy-0": port}, alert_rules()) as api:
        uri = f"ws://127.0.0.1:{port}"
        query = urllib.parse.quote('wam_policy_errors_total{reason="capacity"}')
        # scraped once with no robot refused yet (the series exists from the start, at 0)
        wait_for(lambda: api(f"/api/v1/query?query={query}")["result"], timeout=60)
        quiet = WebsocketClientPolicy(uri)
        with pytest.raises(ConnectionClosedError, match="1013 .*server at capacity: 1 sessions; retry later"):
            WebsocketClientPolicy(uri)  # openpi-client raises the reason while it waits for the metadata

        def refused_alert() -> list[dict]:
            """Prometheus firing WamPolicyRobotsRefused"""
            return [a for a in api("/api/v1/alerts")["alerts"]
                    if a["labels"]["alertname"] == "WamPolicyRobotsRefused" and a["state"] == "firing"]

        (alert,) = wait_for(refused_alert, timeout=60)
        assert alert["labels"]["pod"] == "policy-0" and "turned robots away" in alert["annotations"]["description"]
        for title, query in dashboard_queries().items():  # the chart's dashboard: every query runs (a bad one: 400)
            result = api(f"/api/v1/query?query={urllib.parse.quote(query)}")["result"]
            if "wam_policy_" in query and "kv_pool" not in query:  # and a server's have data (an eager one: no pool)
                assert result, title
        wait_for(lambda: server.active == 0, timeout=30)  # the quiet robot's session times out, its slot frees
        assert WebsocketClientPolicy(uri).infer(good)["actions"].shape[0] == 24
        with pytest.raises(ConnectionClosedOK, match="idle for 1 s"):
            quiet.infer(good)
        assert metric(port, "wam_policy_idle_sessions_closed_total") == 1


def test_a_robot_may_queue_for_a_session_of_a_full_server(served):
    """PolicyClient(capacity_wait_s): a full server's 1013 is tried again until a session frees; without it the robot
    gets the server's reason at once."""
    server = PolicyServer(served["runtime"], max_sessions=1, idle_timeout_s=3.0)
    with serve_in_background(server) as port:
        uri = f"ws://127.0.0.1:{port}"
        holder = WebsocketClientPolicy(uri)  # takes the only session, then idles out after 3 s
        with pytest.raises(ConnectionClosedError, match="1013 .*server at capacity"):
            PolicyClient(uri)
        started = time.monotonic()
        robot = PolicyClient(uri, capacity_wait_s=120)
        assert time.monotonic() - started > 1 and server.active == 1  # it waited for the holder's session to close
        good = robot_observations(served["runtime"], seed=19)[0]
        assert np.isfinite(robot.infer(good).actions).all()
        robot.close()
        with pytest.raises(ConnectionClosedOK, match="idle for 3 s"):
            holder.infer(good)


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            return r.status, r.read().decode().strip()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode().strip()
    except OSError:
        return 0, "unreachable"


def test_a_server_shutting_down_answers_the_request_in_flight_and_its_robot_reconnects(served, tmp_path):
    """SIGTERM (Kubernetes replacing the pod): /readyz turns unready, a new connection and an idle session are
    closed as going away, the request in flight is answered first and the process exits 0; the robot's next
    request goes, as a new session, to the server that takes the address over."""
    port, log = free_port(), tmp_path / "serve.log"
    uri = f"ws://127.0.0.1:{port}"
    with log.open("w") as out:  # 2000 steps: a chunk takes seconds, so it is surely in flight at the signal
        process = subprocess.Popen([str(Path(sys.executable).parent / "wam"), "serve", served["quantized"], "--port",
                                    str(port), "--device", "cpu", "--steps", "2000"], stdout=out, stderr=out)
    try:
        wait_for(lambda: readyz(port) == (200, "ready"), timeout=120)
        first, later = robot_observations(served["runtime"], seed=21)
        robot, resetting, idle = PolicyClient(uri, control_hz=15.0), PolicyClient(uri, control_hz=15.0), \
            WebsocketClientPolicy(uri)
        in_flight = robot.submit(first)
        wait_for(lambda: metric(port, "wam_policy_requests_in_flight") == 1, timeout=60)
        process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: readyz(port)[0] == 503 and readyz(port)[1], timeout=30).startswith("draining")
        going_away = r"1001 \(going away\) server shutting down: reconnect"
        with pytest.raises(ConnectionClosedOK, match=going_away):
            WebsocketClientPolicy(uri)  # routed here before the endpoints caught up: closed at once
        with pytest.raises(ConnectionClosedOK, match=going_away):
            idle.infer(first)  # a session with nothing in flight was closed at once
        answered = in_flight.result(timeout=300)
        assert np.isfinite(answered.actions).all() and not answered.reconnected
        assert process.wait(timeout=120) == 0, log.read_text()[-2000:]
        assert "drained: every session answered and closed" in log.read_text()
        # The replica that takes the address over: the robot's next request reconnects and starts a new window.
        with serve_in_background(PolicyServer(served["runtime"]), port=port):
            after = robot.infer(later)
            resetting.reset()  # its session was closed while idle: a reset connects anew
            fresh = resetting.infer(first)
        assert after.reconnected and after.new_window and np.isfinite(after.actions).all()
        assert not fresh.reconnected and fresh.new_window
        robot.close()
        resetting.close()
    finally:
        process.kill()
        process.wait()


def test_a_request_still_running_at_the_drain_timeout_is_cut_off_and_ends(served):
    """A request still running when serving.drain_timeout_s runs out: its session is closed as going away, with a
    reason that fits a close frame (the robot's client sends the request again to the replica that takes over); it
    is counted as cut off, and the engine stops, so that the request ends instead of keeping the process alive."""
    runtime = PolicyRuntime(load_quantized(served["quantized"]))  # its own: the drain stops its engine
    server = PolicyServer(runtime, drain_timeout_s=0.5)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(120)
    listening = on_loop(server.start("127.0.0.1", 0))
    port = listening.sockets[0].getsockname()[1]
    try:
        robot = WebsocketClientPolicy(f"ws://127.0.0.1:{port}")
        with ThreadPoolExecutor(1) as pool:
            with runtime.encoding:  # the request waits for the encoders: surely still running at the timeout
                request = pool.submit(robot.infer, robot_observations(runtime, seed=23)[0])
                wait_for(lambda: metric(port, "wam_policy_requests_in_flight") == 1, timeout=60)
                assert on_loop(server.drain()) == 1
                with pytest.raises(ConnectionClosedOK, match=re.escape(f"1001 (going away) {CUT_OFF.format(0.5)}")):
                    request.result(60)
        wait_for(lambda: server.active == 0, timeout=60)  # released, the request met the stopped engine and ended
        assert metric(port, 'wam_policy_sessions_drained_total{how="cut"}') == 1
        assert metric(port, 'wam_policy_errors_total{reason="unavailable"}') == 1
    finally:
        loop.call_soon_threadsafe(listening.close)
        on_loop(listening.wait_closed())
        loop.call_soon_threadsafe(loop.stop)
        runtime.engine.stop()


def test_a_server_with_an_api_key_refuses_robots_without_it(served, monkeypatch):
    """Only a robot that sends the key (openpi-client's api_key; PolicyClient's from $WAM_POLICY_API_KEY) opens a
    session; the probes and metrics stay open, and the key never shows in what the server says."""
    server = PolicyServer(served["runtime"], api_key="s3cret-key")
    good = robot_observations(served["runtime"], seed=17)[0]
    with serve_in_background(server) as port:
        uri = f"ws://127.0.0.1:{port}"
        for key, path in ((None, ""), ("wrong-key", ""), (None, "/franka")):  # what is served is not said either
            with pytest.raises(InvalidStatus, match="HTTP 401") as refused:
                WebsocketClientPolicy(uri + path, api_key=key)
            assert b"needs its API key" in refused.value.response.body and b"s3cret" not in refused.value.response.body
        assert np.isfinite(WebsocketClientPolicy(uri, api_key="s3cret-key").infer(good)["actions"]).all()
        monkeypatch.setenv(API_KEY_ENV, "s3cret-key")
        robot = PolicyClient(uri, control_hz=15.0)
        assert np.isfinite(robot.infer(good).actions).all()
        robot.close()
        assert readyz(port) == (200, "ready")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
            text = r.read().decode()
        assert 'wam_policy_errors_total{reason="unauthorized"} 3.0' in text and "s3cret" not in text


def test_sessions_are_admitted_as_far_as_what_they_take_fits(served):
    """A robot beyond what the device holds is refused as at capacity, not run out of memory among the others: each
    session's KV caches and VAE stream, a full batch's activations and one request's own work are counted."""
    policy = load_quantized(served["quantized"])
    unbounded = PolicyRuntime(policy)  # the CPU's memory is not counted unless serving.session_memory_gib says so
    assert unbounded.max_sessions == policy.config.serving.max_sessions and unbounded.memory is None
    session = unbounded.session()
    for obs in robot_observations(unbounded, seed=14):  # a real session allocates what was budgeted for it
        session.infer(obs)
    held = [t for cache in session.rollout.caches for layer in cache.layers for t in (layer.k, layer.v)]
    held += [t for cache in session.rollout.caches for context in cache.cross_context
             for kv in (context.text, context.image) if kv is not None for t in kv]
    assert unbounded.session_bytes == sum(t.numel() * t.element_size() for t in held)
    rows = 2 if unbounded.negative_text is not None else 1
    m = serving_memory(unbounded.arch, unbounded.sample, rows, policy.model.dtype, torch.float32)
    # the VAE stream a real session keeps after a chunk's frames is the traced one
    assert sum(t.nbytes for t in session.stream.frames.values()) == m.stream > 0
    assert 0 < m.activations <= m.request  # one request's own work includes a first frame's prefill

    per_session = unbounded.session_bytes + m.stream + m.activations  # a batch holds all of them (max_batch 8)
    budget = 2.5 * per_session + m.request
    assert budget > 5 * unbounded.session_bytes  # the KV caches alone would admit more than twice as many
    policy.config.serving.session_memory_gib = budget / 2**30
    runtime = PolicyRuntime(policy)
    assert runtime.max_sessions == 2 and runtime.max_batch == 2 and runtime.memory == m
    with serve_in_background(PolicyServer(runtime)) as port:
        uri = f"ws://127.0.0.1:{port}"
        robots = [WebsocketClientPolicy(uri) for _ in range(2)]
        with pytest.raises(ConnectionClosedError, match="1013 .*server at capacity: 2 sessions; retry later"):
            WebsocketClientPolicy(uri)
        engine = robots[1].get_server_metadata()["engine"]
        assert engine["max_sessions"] == 2 and engine["memory_gib"]["stream"] == m.stream / 2**30
        assert metric(port, "wam_policy_max_sessions") == 2
    policy.config.serving.session_memory_gib = (per_session + m.request) * 0.99 / 2**30
    with pytest.raises(ConfigError, match=r"one session does not fit serving.session_memory_gib = .* \(a session's "
                                          r"KV cache takes .* GiB and its VAE stream .*, a forward .* more per session "
                                          r"batched, a request's own work .*\); serve on a device with more memory"):
        PolicyRuntime(policy)


def test_a_served_embodiment_is_checked_against_what_the_model_was_trained_on(served):
    policy = load_quantized(served["quantized"])
    with pytest.raises(ConfigError, match=r"embodiment 'franka' is not one this model was trained on: droid, wrist"):
        PolicyRuntime(policy, embodiment="franka")
    policy.embodiments["wrist"]["profile"]["gripper_dims"] = [42]  # a policy.json edited by hand
    with pytest.raises(ConfigError, match=r"embodiment wrist: gripper_dims \[42\] do not exist: the actions have 8 "
                                          r"dims in the statistics .* quantize the checkpoint again"):
        PolicyRuntime(policy)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(), st.text(max_size=20),
                    st.binary(max_size=20), st.lists(st.floats(), max_size=9), st.lists(st.lists(st.integers(-2**63, 2**63 - 1), max_size=3),
                                                                                       max_size=3),
                    st.builds(lambda shape, dtype: np.zeros(shape, dtype),
                              st.lists(st.integers(0, 8), max_size=4).map(tuple),
                              st.sampled_from([np.uint8, np.float32, np.float64, np.int64, np.bool_])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300), fields=st.dictionaries(
    st.sampled_from(["prompt", "observation.state", "observation.images.wrist_left", "reset", "other"]), _VALUES,
    max_size=4))
def test_the_request_decoder_answers_anything_without_an_internal_error(served, raw, fields):
    """Random bytes and random observations: a reply or a `bad request`, never an internal error."""
    server, session = served["server"], served["runtime"].session()
    for message in (raw, msgpack_numpy.packb(fields)):
        reply = asyncio.run(server._reply(session, message, time.perf_counter()))
        assert isinstance(reply, bytes) or reply.startswith("bad request: "), reply


def test_a_recorded_session_is_served_again_as_the_robot_got_it(served, s3, monkeypatch, tmp_path):
    """serving.record (here an S3 bucket, as a pod records): each session's exchanges (requests as sent, replies as
    sent) land under its embodiment's folder, off the robots' path; `wam rerun` sends them to a fresh server of the
    model and finds the same actions, errors and resets, and says which reply differs where a recording does not
    match."""
    import av
    import fsspec
    from openpi_client import msgpack_numpy as mpn

    from wam.trainer.serve.recorder import read_recording
    from wam.trainer.serve.rerun import rerun

    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    record = "s3://wam-checkpoints/recordings"
    server = PolicyServer(served["runtime"], record=record)
    with serve_in_background(server) as port:
        robot = WebsocketClientPolicy(f"ws://127.0.0.1:{port}/wrist")
        first, *later = robot_observations(served["runtime"], seed=31, chunks=3, embodiment="wrist")
        robot.infer(first)
        with pytest.raises(Exception, match="bad request"):
            robot.infer({k: v for k, v in later[0].items() if k != "prompt"})
        for obs in later:
            robot.infer(obs)
        robot.infer({"reset": True})
        robot._ws.close()
        server.recorder.flush()
        assert metric(port, "wam_policy_recorded_files_total") == 1 + 5  # session.json and the five exchanges
    fs = fsspec.filesystem("s3")
    [folder] = fs.ls(f"{record}/wrist", refresh=True)
    folder = f"s3://{folder}"
    description, exchanges = read_recording(folder)
    assert description["embodiment"] == "wrist" and description["metadata"]["cameras"] == ["observation.images.wrist_left"]
    assert [type(e.reply) for e in exchanges] == [bytes, str, bytes, bytes, bytes]
    assert mpn.unpackb(exchanges[0].request)["prompt"] == first["prompt"]

    results = rerun(description, exchanges)
    assert [r.kind for r in results] == ["chunk", "error", "chunk", "chunk", "reset"]
    assert all(r.same for r in results) and max(r.deviation for r in results if r.deviation is not None) < 1e-4

    # a recording that does not match (its second chunk's actions moved) and has a gap (the bad request was
    # dropped while recording): the command says what is missing and which reply differs
    fs.rm(f"{folder}/000002.msgpack")
    second = f"{folder}/000003.msgpack"
    entry = msgpack.unpackb(fs.cat(second))
    reply = mpn.unpackb(entry["reply"])
    reply["actions"] = reply["actions"] + 0.01
    fs.pipe(second, msgpack.packb({**entry, "reply": mpn.packb(reply)}))
    done = wam_cli("rerun", folder, "--video", tmp_path / "view.mp4", env=s3)
    assert done.returncode == 1 and "1 of 4 replies differ from the recorded ones: [3]" in done.stderr, done.stderr
    assert "exchanges [2] were dropped while recording" in done.stderr
    assert "reset" in done.stdout and "1.00e-02" in done.stdout
    # the wrist camera's frames as the robot sent them: the first call's one and each later chunk's
    with av.open(str(tmp_path / "view.mp4")) as video:
        shown = [frame.to_ndarray(format="rgb24") for frame in video.decode(video=0)]
    assert len(shown) == 1 + 2 * len(later[0]["observation.images.wrist_left"]) and shown[0].shape == (48, 64, 3)
