"""Sampling as DreamZero samples: FlowUniPC against diffusers' UniPC, classifier-free guidance (batched and
sequential passes, the unconditional branch's own KV cache), the DiT step cache (static and dynamic schedules,
an exact KV cache), prompt dropout in training, the sampler settings refused where they enter, and the DreamZero
preset served through `wam serve` to the public openpi-client."""

import dataclasses
import re
import urllib.request

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from wam.platform.config import (
    DREAMZERO_NEGATIVE_PROMPT,
    FlowSection,
    SamplerSection,
    load_config,
    resolve_preset,
)
from wam.platform.errors import ConfigError
from wam.trainer.flow import (
    DREAMZERO_DIT_STEPS,
    DitStepCache,
    FlowUniPC,
    StepRandomness,
    drop_prompts,
    noise_batch,
    unipc_schedule,
)
from wam.trainer.inference import ChunkRollout
from wam.trainer.model import WamInputs
from wam.trainer.quantize.quantizer import quantize_checkpoint

from conftest import free_port, randomized_model, wait_for, wam_cli, write_checkpoint, write_run_config


def field(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """An analytic, nonlinear velocity field: the solvers see the same function of (sample, sigma)."""
    return torch.sin(3 * x) * sigma + torch.cos(2 * torch.tensor(sigma)) * x - 0.5


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_flow_unipc_equals_diffusers_unipc_for_flow_matching(steps, shift):
    schedule = unipc_schedule(steps, shift)
    reference = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=shift, predict_x0=True, solver_type="bh2",
                                        lower_order_final=True, final_sigmas_type="zero")
    # Wan's grid before the shift (from its float32 largest training sigma); diffusers shifts it with flow_shift.
    reference.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1])
    assert torch.equal(schedule.sigmas, reference.sigmas)
    assert torch.equal(schedule.timesteps.long(), reference.timesteps)
    ours = theirs = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(steps))
    solver = FlowUniPC(schedule.sigmas)
    for i, t in enumerate(reference.timesteps):
        sigma = schedule.sigmas[i].item()
        last = ours
        ours = solver.step(i, field(ours, sigma), ours)
        theirs = reference.step(field(theirs, sigma), t, theirs).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the final step is first order onto sigma 0: the clean-sample estimate itself
    torch.testing.assert_close(ours, last - schedule.sigmas[-2] * field(last, schedule.sigmas[-2].item()))


@pytest.mark.parametrize("final_sigma", [0.0, 0.5])
def test_flow_unipc_trajectories_out_of_phase_stepped_together_equal_each_alone(final_sigma):
    """The serving engine steps every batched session's solver at once (step_many): sessions at different steps,
    of 1 or 2 rows, with histories of every order, give exactly the bits each gets stepped alone."""
    schedule = unipc_schedule(16, 5.0, final_sigma)
    starts = [torch.randn(rows, 3, 5, generator=torch.Generator().manual_seed(rows * 7 + k))
              for k, rows in enumerate([1, 2, 1, 1])]
    offsets = [0, 1, 3, 9]  # each trajectory this many steps ahead of the first
    alone, together = [FlowUniPC(schedule.sigmas) for _ in starts], [FlowUniPC(schedule.sigmas) for _ in starts]
    ours, theirs = list(starts), list(starts)
    for k, (offset, solver) in enumerate(zip(offsets, together, strict=True)):  # the lead-in, one at a time
        for i in range(offset):
            sigma = schedule.sigmas[i].item()
            ours[k] = alone[k].step(i, field(ours[k], sigma), ours[k])
            theirs[k] = solver.step(i, field(theirs[k], sigma), theirs[k])
    for step in range(16 - max(offsets)):
        steps = [offset + step for offset in offsets]
        velocities = [field(x, schedule.sigmas[i].item()) for x, i in zip(theirs, steps, strict=True)]
        theirs = FlowUniPC.step_many(together, steps, velocities, theirs, batched=True)
        ours = [solver.step(i, field(x, schedule.sigmas[i].item()), x)
                for solver, i, x in zip(alone, steps, ours, strict=True)]
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)


def test_dreamzero_grid_facts():
    schedule = unipc_schedule(16, 5.0)
    assert schedule.sigmas.dtype == torch.float32 and schedule.sigmas[-1] == 0
    assert schedule.sigmas[0].item() == pytest.approx(0.99980, abs=1e-5) and schedule.timesteps[0] == 999
    assert torch.equal(schedule.timesteps, (schedule.sigmas[:-1].double() * 1000).floor().float())
    final = unipc_schedule(16, 5.0, final_sigma=0.5).sigmas  # DreamZero's decoupled video inference
    assert final[0] == schedule.sigmas[0] and final[-1].item() == pytest.approx(0.5)


@pytest.fixture(scope="module")
def model(tiny):
    return randomized_model(tiny.arch, tiny.sample, seed=3)


def rollout(model, tiny, sampler: SamplerSection, negative: torch.Tensor | None = None) -> ChunkRollout:
    return ChunkRollout(model, sampler, tiny.sample, negative_text=negative)


def context(tiny, batch=2, seed=0):
    """A first frame and each chunk's real latents, states, the prompt (and image) features, a negative prompt."""
    inputs = WamInputs.random(tiny.arch, tiny.sample, batch, seed)
    negative = torch.randn(1, tiny.arch.text_len, tiny.arch.text_dim, generator=torch.Generator().manual_seed(seed + 1))
    return {"latents": inputs.video, "text": inputs.text, "image": inputs.image, "i2v": inputs.i2v_cond,
            "negative": negative, "states": inputs.state.transpose(0, 1)}


def start(r: ChunkRollout, ctx, text: torch.Tensor | None = None) -> None:
    r.reset(ctx["latents"][:, :, :1], ctx["text"] if text is None else text, ctx["image"], ctx["i2v"])


def roll(r: ChunkRollout, tiny, ctx, chunks=2, seed=0):
    """Act on `chunks` chunks, observing each one's real latents; returns the chunks."""
    f = tiny.sample.frames_per_chunk
    start(r, ctx)
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(chunks):
        out.append(r.act(ctx["states"][c], g))
        r.observe(ctx["latents"][:, :, 1 + c * f:1 + (c + 1) * f])
    return out


def test_guidance_as_one_batched_forward_equals_sequential_passes(model, tiny):
    ctx = context(tiny)
    guided = SamplerSection(solver="unipc", steps=3, guidance=4.0, action_guidance=2.0, negative_prompt="")
    batched = rollout(model, tiny, guided, ctx["negative"])
    sequential = rollout(model, tiny, dataclasses.replace(guided, guidance_batch=False), ctx["negative"])
    plain = roll(rollout(model, tiny, dataclasses.replace(guided, guidance=1.0, action_guidance=1.0)), tiny, ctx)
    for b, s, p in zip(roll(batched, tiny, ctx), roll(sequential, tiny, ctx), plain, strict=True):
        torch.testing.assert_close(b.video, s.video, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.actions, s.actions, rtol=1e-4, atol=1e-4)
        assert (b.forwards, s.forwards, p.forwards) == (3, 6, 3)
        assert (b.video - p.video).abs().max() > 1e-2 and (b.actions - p.actions).abs().max() > 1e-3  # it guides
    # the unconditional branch's cache: its clean context and the negative prompt's cross-attention K/V
    rows = ctx["text"].shape[0]
    uncond_cache = sequential.caches[1]
    layer, twin = batched.caches[0].layers[0], uncond_cache.layers[0]
    torch.testing.assert_close(layer.k[rows:, :layer.length], twin.k[:, :twin.length], rtol=1e-4, atol=1e-5)
    expected = model.blocks[0].cross_context(model.conditioning(ctx["negative"].expand(rows, -1, -1), ctx["image"]))
    for got, want in zip(uncond_cache.cross_context[0], expected, strict=True):
        if want is not None:
            torch.testing.assert_close(got, want)


def test_guidance_combines_conditional_and_unconditional_velocities(model, tiny):
    """One guided step against the two branches' predictions combined by hand."""
    ctx = context(tiny, batch=1)
    sampler = SamplerSection(steps=1, guidance=3.0, negative_prompt="")
    r = roll(rollout(model, tiny, sampler, ctx["negative"]), tiny, ctx, chunks=1)[0]
    cond, uncond = (rollout(model, tiny, SamplerSection(steps=1)) for _ in range(2))
    start(cond, ctx)
    start(uncond, ctx, ctx["negative"])
    g = torch.Generator().manual_seed(0)
    arch, s = tiny.arch, tiny.sample
    video = torch.randn(1, arch.out_dim, s.frames_per_chunk, s.latent_height, s.latent_width, generator=g)
    actions = torch.randn(1, s.actions_per_chunk, arch.action_dim, generator=g)
    t = torch.full((1,), 1000.0)
    c, u = (model.predict(x.cache, video, actions, ctx["states"][0], t, t) for x in (cond, uncond))
    torch.testing.assert_close(r.video, video - (u.video + 3.0 * (c.video - u.video)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.actions, actions - c.actions, rtol=1e-4, atol=1e-4)  # no guidance on actions


def test_dit_step_cache_runs_dreamzero_steps_reuses_velocities_and_keeps_the_kv_cache_exact(model, tiny):
    ctx = context(tiny, batch=1)
    base = SamplerSection(solver="unipc", steps=16)
    cached = rollout(model, tiny, dataclasses.replace(base, dit_cache="static", dit_passes=8))
    full = rollout(model, tiny, base)
    every = rollout(model, tiny, dataclasses.replace(base, dit_cache="static", dit_steps=list(range(16))))
    out, ref, all_steps = (roll(r, tiny, ctx, chunks=1) for r in (cached, full, every))
    assert [c.dit_steps for c in out] == [8] and [c.dit_steps for c in ref] == [16]
    for a, b in zip(all_steps, ref, strict=True):  # a schedule of every step is no cache at all
        assert torch.equal(a.video, b.video) and torch.equal(a.actions, b.actions)
    # skipped steps wrote nothing: the same committed context, bit for bit
    for layer, twin in zip(cached.cache.layers, full.cache.layers, strict=True):
        assert layer.length == twin.length and layer.pending == twin.pending
        assert torch.equal(layer.k[:, :layer.length], twin.k[:, :twin.length])
    # the reused velocity enters the solver like a fresh one: the same chunk by hand
    start(cached, ctx)
    g = torch.Generator().manual_seed(0)
    arch, s = tiny.arch, tiny.sample
    video = torch.randn(1, arch.out_dim, s.frames_per_chunk, s.latent_height, s.latent_width, generator=g)
    actions = torch.randn(1, s.actions_per_chunk, arch.action_dim, generator=g)
    solvers = FlowUniPC(cached.video_sigmas), FlowUniPC(cached.action_sigmas)
    for i in range(16):
        if i in DREAMZERO_DIT_STEPS[8]:
            t = cached.video_schedule.timesteps[i].expand(1)
            v = model.predict(cached.cache, video, actions, ctx["states"][0], t, t)
        video, actions = solvers[0].step(i, v.video, video), solvers[1].step(i, v.actions, actions)
    torch.testing.assert_close(video, out[0].video)
    torch.testing.assert_close(actions, out[0].actions)


def test_dynamic_dit_schedule_skips_while_velocities_agree():
    def run(similarities):
        cache, decisions = DitStepCache("dynamic", steps=len(similarities)), []
        previous = torch.tensor([[1.0, 0.0]])
        for i, similarity in enumerate(similarities):
            decisions.append(cache.run(i))
            if decisions[-1]:  # a velocity at this cosine similarity to the last computed one
                angle = np.arccos(similarity) + np.arctan2(previous[0, 1].item(), previous[0, 0].item())
                previous = torch.tensor([[np.cos(angle), np.sin(angle)]], dtype=torch.float32)
                cache.computed(previous)
        return decisions

    assert run([0.0, 0.0, 0.5, 0.5]) == [True] * 4  # dissimilar: every step runs
    assert run([0.0, 0.99, 0, 0, 0, 0, 0.5]) == [True, True, False, False, False, False, True]  # > 0.95: skip 4
    assert run([0.0, 0.94, 0, 0, 0.5]) == [True, True, False, False, True]  # > 0.93: skip 2, then a forced run
    assert DitStepCache("static", 16, passes=8).static == set(DREAMZERO_DIT_STEPS[8])
    assert DitStepCache("static", 8, passes=4).static == {0, 2, 5, 7}  # evenly spaced beyond DreamZero's tables


def test_prompt_dropout_is_deterministic_and_leaves_the_noise_alone():
    flow = FlowSection(prompt_dropout=0.3, dropout_prompt="")
    prompts = [f"task {i}" for i in range(2000)]
    dropped = drop_prompts(prompts, flow, StepRandomness(7, 3, 1))
    assert dropped == drop_prompts(prompts, flow, StepRandomness(7, 3, 1))  # resume repeats it exactly
    assert dropped != drop_prompts(prompts, flow, StepRandomness(7, 4, 1))
    assert abs(dropped.count("") / len(prompts) - 0.3) < 0.04
    assert drop_prompts(prompts, FlowSection(), StepRandomness(7, 3, 1)) == prompts
    video, actions, state, text = torch.zeros(1, 4, 5, 2, 2), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4), None
    a = StepRandomness(7, 3, 1)
    b = StepRandomness(7, 3, 1)
    drop_prompts(prompts, flow, b)
    x, y = (noise_batch(video, actions, state, text, flow, r) for r in (a, b))
    assert torch.equal(x.inputs.noisy_video, y.inputs.noisy_video) and torch.equal(x.sigma_action, y.sigma_action)


@pytest.mark.parametrize(("overrides", "message"), [
    (["sampler.guidance=0.5"], r"sampler.guidance must be >= 1"),
    (["sampler.action_guidance=0"], r"sampler.action_guidance must be >= 1"),
    (["sampler.dit_cache=static", "sampler.dit_steps=[1,5]"], r"sampler.dit_steps must .* starting with 0"),
    (["sampler.dit_steps=[0,4,4]"], r"sampler.dit_steps must be increasing"),
    (["sampler.guidance=5"], r"need an unconditional prompt: set sampler.negative_prompt"),
    (["sampler.solver=heun"], r"sampler.solver = 'heun' is not one of euler, unipc"),
    (["serving.sampler=dreamzer0"], r"serving.sampler = 'dreamzer0' is not a sampler preset; choose dreamzero"),
    (["flow.prompt_dropout=1.0"], r"flow.prompt_dropout must be in \[0, 1\)"),
])
def test_bad_sampler_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_guidance_takes_the_dropout_prompt_of_a_model_trained_with_dropout():
    cfg = load_config(None, ["sampler.guidance=5", "flow.prompt_dropout=0.1"])
    assert cfg.sampler.negative_prompt is None and cfg.flow.dropout_prompt == ""
    assert load_config(None, ["serving.sampler=dreamzero"]).serving.sampler == "dreamzero"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny):
    """A quantized tiny model trained (here: randomised) without prompt dropout, its config naming no sampler."""
    from wam.trainer.data.synth_dataset import SynthOptions, synthesize

    folder = tmp_path_factory.mktemp("dreamzero-serve")
    dataset = synthesize(folder / "data", SynthOptions(episodes=2, seed=5))
    config = write_run_config(folder, "policy", sample={"num_chunks": 2, "actions_per_chunk": 24},
                              data={"source": "lerobot", "datasets": [{"uri": str(dataset), "profile": "droid"}]})
    cfg = load_config(config)
    preset = resolve_preset(cfg)
    checkpoint = write_checkpoint(folder / "checkpoints", cfg, randomized_model(preset.arch, preset.sample, seed=4))
    return {"folder": quantize_checkpoint(checkpoint).out, "config": config, "dataset": dataset}


def test_wam_serve_with_the_dreamzero_preset_answers_openpi_client(quantized):
    import subprocess
    import sys
    from pathlib import Path

    from test_serve import robot_observations

    from wam.trainer.quantize.load import load_quantized
    from wam.trainer.serve.policy import PolicyRuntime

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "wam"), "serve", str(quantized["folder"]), "--port",
                               str(port), "--device", "cpu", "--sampler", "dreamzero"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = wait_for(lambda: _connect(f"ws://127.0.0.1:{port}"), timeout=120)
        meta = client.get_server_metadata()
        s = meta["sampler"]
        assert (s["preset"], s["solver"], meta["denoising_steps"], s["shift"], s["guidance"], s["action_guidance"]) \
            == ("dreamzero", "unipc", 16, 5.0, 5.0, 1.0)
        assert s["dit_cache"] == "static" and s["dit_steps"] == list(DREAMZERO_DIT_STEPS[8])
        assert "trained without prompt dropout" in s["note"]  # guidance asked of a model trained without it
        runtime = PolicyRuntime(load_quantized(quantized["folder"]), sampler="dreamzero")
        for obs in robot_observations(runtime, seed=1, chunks=2):
            timing = client.infer(obs)["server_timing"]
            assert (timing["denoising_steps"], timing["dit_steps"], timing["transformer_passes"]) == (16, 8, 8)
        client._ws.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
            assert "wam_policy_transformer_passes_total 16.0" in r.read().decode()  # 2 chunks x 8
        # `wam client` prints each chunk's transformer passes
        shown = wam_cli("client", f"ws://127.0.0.1:{port}", "--config", quantized["config"], "--dataset",
                        quantized["dataset"], timeout=300)
        assert shown.returncode == 0, shown.stderr
        rows = [line.split() for line in shown.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+", line)]
        assert "passes" in shown.stdout and [row[4] for row in rows] == ["8", "8"]  # chunk, trip, server, queue, passes
    finally:
        server.terminate()
        server.wait(30)
    assert "unipc 16 steps, guidance 5, DiT cache static" in server.stdout.read()


def _connect(uri: str) -> WebsocketClientPolicy | None:
    try:
        return WebsocketClientPolicy(uri)
    except Exception:  # noqa: BLE001 - not listening yet
        return None


def test_the_recorded_serving_preset_and_its_negative_prompt_reach_the_runtime(quantized):
    """The operator's handoff serves a quantized folder with its recorded config: serving.sampler there applies."""
    from wam.trainer.quantize.load import load_quantized
    from wam.trainer.serve.policy import PolicyRuntime

    policy = load_quantized(quantized["folder"])
    assert policy.config.serving.sampler is None and PolicyRuntime(policy).negative_text is None
    policy.config.serving.sampler = "dreamzero"
    runtime = PolicyRuntime(policy)
    assert runtime.sampler_description()["preset"] == "dreamzero" and runtime.sampler.steps == 16
    torch.testing.assert_close(runtime.negative_text, runtime.encoders.text([DREAMZERO_NEGATIVE_PROMPT]))
    policy.config.serving.steps = 4  # the config's steps refine its preset; a --sampler flag outranks both
    assert PolicyRuntime(policy).sampler.steps == 4 and PolicyRuntime(policy, sampler="dreamzero").sampler.steps == 16
    assert PolicyRuntime(policy, steps=2, sampler="dreamzero").sampler.steps == 2
    with pytest.raises(ConfigError, match=r"--sampler = 'fast' is not a sampler preset"):
        PolicyRuntime(policy, sampler="fast")


@pytest.mark.parametrize("example", ["dreamzero-14b-gb200.yaml", "dreamzero-14b-h100.yaml"])
def test_dreamzero_trainjobs_record_the_dreamzero_serving_preset(example):
    """What the operator's pods run (and so the checkpoints and the quantized folder record, which its serving
    Deployment serves) carries serving.sampler: dreamzero."""
    from pathlib import Path

    import yaml

    from wam.platform import trainjob

    manifest = yaml.safe_load((Path(__file__).parents[1] / "examples" / example).read_text())
    cfg = trainjob.training_config(trainjob.parse(manifest), trainjob.Platform())
    assert cfg.serving.sampler == "dreamzero" and cfg.flow.prompt_dropout == 0
    assert load_config(Path(__file__).parents[1] / "configs" / "dreamzero-14b.yaml").serving.sampler == "dreamzero"


def test_the_eval_sweep_compares_solvers_steps_guidance_and_the_cache():
    from wam.trainer.eval.evaluate import sweep_samplers

    sweep = sweep_samplers(load_config(None, ["flow.prompt_dropout=0.2"]), 5.0)
    assert len(sweep) == 24 and {(s.solver, s.steps, s.guidance, s.dit_cache) for s in sweep.values()} == {
        (solver, steps, g, cache) for solver in ("euler", "unipc") for steps in (4, 8, 16) for g in (1.0, 5.0)
        for cache in ("none", "static")}
    assert all(s.dit_passes == s.steps // 2 for s in sweep.values())
    assert {s.guidance for s in sweep_samplers(load_config(None, []), 5.0).values()} == {1.0}  # no unconditional prompt
    with pytest.raises(ConfigError, match="--sweep-guidance must be >= 1"):
        sweep_samplers(load_config(None, []), 0.5)
