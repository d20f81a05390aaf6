"""A served WAM policy: one shared model and encoders, one closed-loop Session per connected robot.

A session's first call (and any call with a new prompt) starts a context window: the first frame is
encoded and prefilled into the session's KV cache, then the first chunk is denoised. Each later call brings
the REAL frames the robot saw while executing the oldest returned chunk; they are VAE-encoded (continuing
the session's causal encoder stream) and written into the cache in place of the prediction. A call without
frames asks for one chunk ahead (asynchronous execution): the chunk being executed enters the cache with its
predicted video until its real frames arrive on the next call. A full context window restarts from the
newest real frame.

A request with `"return_video": true` also gets the chunk's predicted video, decoded by the VAE from the newest
known latent frame on: (frames_per_chunk, H, W, 3) uint8, the cameras tiled as the model sees them (what a
person compares with the real frames; decoding costs time, so only on request).

Observations use the LeRobot feature names of the session's embodiment (wam.trainer.serve.embodiments: a robot
picks it by the websocket path): each camera an (H, W, 3) or (T, H, W, 3) uint8 array, each state key a float
vector in robot units, and "prompt". Actions come back in that robot's units: un-normalised, relative dims made
absolute, smoothed, the profile's grippers binarised.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from wam.platform.accounting import GIB
from wam.platform.config import (
    COMPILE_MODES,
    ServingSection,
    guided,
    negative_prompt,
    resolve_preset,
    served_sampler,
)
from wam.platform.errors import ConfigError
from wam.platform.plan import HEADROOM
from wam.platform.serving_roofline import kv_cache_bytes, rows_per_device, sessions_that_fit
from wam.trainer.data.transforms import normalize, tile
from wam.trainer.flow import static_dit_steps
from wam.trainer.guidance_peer import GuidancePeer
from wam.trainer.inference import Chunk, ChunkRollout, Denoiser
from wam.trainer.model.encoders import FrozenEncoders
from wam.trainer.model.vae import StreamState
from wam.trainer.quantize.load import QuantizedPolicy, load_quantized
from wam.trainer.serve.embodiments import ServedEmbodiment, served_embodiments
from wam.trainer.serve.encoding import BatchedEncoder
from wam.trainer.serve.engine import DenoiseEngine
from wam.trainer.serve.memory import ServingMemory, serving_memory
from wam.trainer.serve.safety import SafetyReport, require_finite

log = logging.getLogger("wam.serve")
PROMPT_KEY = "prompt"
RESET_KEY = "reset"
VIDEO_KEY = "return_video"
MAX_FRAME_SIDE = 4096


class RequestError(ValueError):
    """A request the client must fix; the message says what and how."""


@dataclass
class _Returned:
    """A chunk sent to the robot whose real frames have not arrived yet."""

    index: int  # chunk index in the context window
    video: torch.Tensor  # (1, z, F, h, w) predicted latents: the cache's stand-in until the real ones come
    actions: np.ndarray  # (A, dims) robot-unit actions as returned
    normalised: torch.Tensor  # (A, action_dim) the model's output
    safety: SafetyReport  # what the envelope clipped


class PolicyRuntime:
    """What all sessions share: the model, the frozen encoders, the engine, and the embodiments served (each with
    its post-processing and safety envelope)."""

    def __init__(self, policy: QuantizedPolicy, device: torch.device | str = "cpu", steps: int | None = None,
                 embodiment: str | None = None, sampler: str | None = None, max_batch: int | None = None,
                 compile: str | None = None, devices: int | None = None):
        """steps and sampler (a preset name) override the config's serving.steps and serving.sampler; at either
        level the steps refine the preset. max_batch, compile and devices override serving.max_batch,
        serving.compile and serving.devices."""
        self.policy, self.device = policy, torch.device(device)
        cfg = policy.config
        preset = resolve_preset(cfg)
        self.arch, self.sample = preset.arch, preset.sample
        self.sampler_preset = sampler or cfg.serving.sampler
        self.sampler = served_sampler(cfg, sampler, steps)
        self.encoders = FrozenEncoders.of_config(cfg, self.device)
        self.negative_text = None  # the unconditional prompt's features: encoded once, shared by all sessions
        self.guidance_note = ""
        if guided(self.sampler):
            self.negative_text = self.encoders.text([negative_prompt(self.sampler, cfg.flow)]).to(self.device)
            if cfg.flow.prompt_dropout == 0:
                self.guidance_note = ("guidance asked of a model trained without prompt dropout (flow.prompt_dropout "
                                      "0): its unconditional branch was trained only if its initial weights had one")
                log.warning(self.guidance_note)
        self.canvas = self.sample.canvas(self.arch)
        self.pixel_frames_per_chunk = self.encoders.vae.cfg.temporal_stride * self.sample.frames_per_chunk
        s = cfg.serving
        self.embodiments = served_embodiments(policy.embodiments, self.arch, self.sample.actions_per_chunk, s)
        self.default_embodiment = self._embodiment(embodiment or s.embodiment)  # a robot's at the path /
        self.max_batch = max_batch or s.max_batch
        if not 1 <= self.max_batch <= s.max_sessions:
            raise ConfigError(f"max_batch must be in [1, serving.max_sessions = {s.max_sessions}], got {self.max_batch}")
        mode = compile or s.compile
        self.compiled = mode == "on" or (mode == "auto" and self.device.type == "cuda")
        self.devices, self.peer = devices or s.devices, None
        # what the admission counted besides the caches (None where the memory is not counted)
        self.session_bytes, self.max_sessions, self.memory = self._session_capacity(s)
        # One request's own work (its VAE, a context window's first frame prefilled) at a time: counted once by the
        # admission (on a GPU the requests' kernels share one stream anyway: running them in turn costs no throughput)
        self.encoding = threading.Lock()
        self.max_batch = min(self.max_batch, self.max_sessions)
        # sessions' work waiting for the encoders (chunks' frames, new windows) goes through them together: as many
        # as the request's work counted holds, each its encoding and a copy of its stream's history (every waiting
        # one, up to max_batch, where the memory is not counted)
        m = self.memory
        self.encode_batch = (self.max_batch if m is None else
                             max(1, min(self.max_batch, m.request // (m.encode + m.stream))))
        self.frame_encoder = BatchedEncoder(self.encoders, self.encoding, self.encode_batch)
        rows = rows_per_device(self.sampler, self.devices)
        self.engine = DenoiseEngine(Denoiser(policy.model, self.compiled, self.max_sessions * rows), self.max_batch,
                                    s.cpu_threads)
        if self.devices == 2:
            self.peer = self._guidance_peer()
            self.peer.on_lost(self.engine.fail)
        # blank frames' windows: the engine compiles on them before it reports ready (the second: sessions at
        # different chunks), and on the CPU chooses its threads on the first (unless serving.cpu_threads sets them)
        warm = [self.session() for _ in range((2 if self.max_batch > 1 else 1) if self.compiled else
                                              int(self.device.type == "cpu" and s.cpu_threads is None))]
        for session in warm:
            session._start_window(torch.zeros(1, 3, 1, *self.canvas, dtype=torch.uint8), "warm-up")
        self.engine.start(*(session.rollout for session in warm))

    def _session_capacity(self, s: ServingSection) -> tuple[int, int, ServingMemory | None]:
        """(bytes of one session's KV caches on this device, the sessions admitted, what else was counted):
        serving.max_sessions, fewer where they do not fit serving.session_memory_gib (default on a GPU: 90% of what
        is free now that the model is loaded; the CPU's memory is not counted unless it is set). Counted: each session's KV caches (compiled: one
        pool for all of them, made at the first session, and the batch's share of a block gathered in the forward)
        and its VAE stream's history, a full batch's activations and one request's own work (ServingMemory, traced
        on fake tensors). Checked here, so that a robot beyond it is refused as at capacity instead of running the
        device out of memory in the middle of other robots' chunks."""
        rows = rows_per_device(self.sampler, self.devices)
        cache = kv_cache_bytes(self.arch, self.sample, rows, self.policy.model.dtype.itemsize)
        if s.session_memory_gib is not None:
            budget, where = s.session_memory_gib * GIB, f"serving.session_memory_gib = {s.session_memory_gib:g}"
        elif self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
            budget, where = HEADROOM * free, f"{HEADROOM:.0%} of the {free / GIB:.1f} GiB free on {self.device}"
        else:
            return cache, s.max_sessions, None
        m = serving_memory(self.arch, self.sample, rows, self.policy.model.dtype, next(self.encoders.vae.parameters()).dtype)
        fits = sessions_that_fit(budget, cache, max_batch=self.max_batch, compiled=self.compiled,
                                 blocks=self.arch.num_layers, held=m.stream, activations=m.activations, transient=m.request)
        counted = (f"a session's KV cache takes {cache / GIB:.2f} GiB and its VAE stream {m.stream / GIB:.2f}, a "
                   f"forward {m.activations / GIB:.2f} more per session batched, a request's own work "
                   f"{m.request / GIB:.2f}")
        if fits < 1:
            raise ConfigError(f"one session does not fit {where} ({counted}); serve on a device with more memory, "
                              "with fewer chunks per window (sample.num_chunks) or without guidance, or raise "
                              "serving.session_memory_gib")
        if fits < s.max_sessions:
            log.warning("serving %d sessions, not serving.max_sessions = %d: %s; %d fit %s", fits, s.max_sessions,
                        counted, fits, where)
        return cache, min(fits, s.max_sessions), m

    def _embodiment(self, name: str | None) -> ServedEmbodiment:
        """The served embodiment `name` (None: the first); a model without robot data has only the synthetic one."""
        if not self.policy.embodiments or name is None:
            return next(iter(self.embodiments.values()))
        if name not in self.embodiments:
            raise ConfigError(f"embodiment {name!r} is not one this model was trained on: {', '.join(self.embodiments)}")
        return self.embodiments[name]

    def metadata(self, embodiment: ServedEmbodiment | None = None) -> dict:
        """Sent to every client on connect: the server's, and its robot's embodiment's (default: the one at /)."""
        return {
            "policy": "wam", "preset": self.policy.config.model.preset, "step": self.policy.step,
            "compute_path": self.policy.compute_path, "denoising_steps": self.sampler.steps,
            "engine": self.engine_description(),
            "sampler": self.sampler_description(),
            "actions_per_chunk": self.sample.actions_per_chunk, "frames_per_chunk": self.pixel_frames_per_chunk,
            "chunks_per_window": self.sample.num_chunks,
            "embodiments": list(self.embodiments),  # every one served here, each at /<name>
        } | (embodiment or self.default_embodiment).metadata(self.arch)

    def _guidance_peer(self) -> GuidancePeer:
        """Rank 1 for guidance in parallel: the next GPU, or a second process on the CPU."""
        if self.negative_text is None:
            raise ConfigError("devices 2 runs the conditional and unconditional passes of classifier-free guidance on "
                              "two devices, but the served sampler does not guide (guidance 1): serve a guided sampler "
                              "(e.g. --sampler dreamzero) or use 1 device")
        if self.device.type == "cuda":
            index = self.device.index or 0
            if torch.cuda.device_count() < index + 2:
                raise ConfigError(f"devices 2 needs GPUs {index} and {index + 1}; this machine has "
                                  f"{torch.cuda.device_count()}")
            peer_device = torch.device("cuda", index + 1)
        else:
            peer_device = torch.device("cpu")
        log.info("starting the guidance peer (unconditional pass) on %s", peer_device)
        return GuidancePeer.spawn(self.policy.uri, self.device, peer_device, self.policy.compute_path, self.compiled,
                                 self.max_sessions * rows_per_device(self.sampler, self.devices))

    def engine_description(self) -> dict:
        cuda = self.device.type == "cuda"
        return {"max_batch": self.max_batch, "encode_batch": self.encode_batch, "compiled": self.compiled,
                "cuda_graphs": self.compiled and cuda, "device": str(self.device), "devices": self.devices, "max_sessions": self.max_sessions,
                "session_memory_gib": self.session_bytes / GIB, "cpu_threads": self.engine.cpu_threads,
                # what the admission counted besides the KV caches (None: the memory is not counted, a CPU's)
                "memory_gib": None if self.memory is None else {k: v / GIB for k, v in self.memory._asdict().items()}}

    def sampler_description(self) -> dict:
        s = self.sampler
        dit_steps = (list(static_dit_steps(s.steps, s.dit_passes, s.dit_steps)) if s.dit_cache == "static"
                     else s.dit_cache if s.dit_cache == "dynamic" else list(range(s.steps)))
        return {"preset": self.sampler_preset, "solver": s.solver, "steps": s.steps, "shift": s.shift,
                "guidance": s.guidance, "action_guidance": s.action_guidance,
                "guidance_passes": "none" if self.negative_text is None else "parallel" if self.peer is not None
                else "batched" if s.guidance_batch else "sequential", "dit_cache": s.dit_cache, "dit_steps": dit_steps, "note": self.guidance_note}

    def session(self, embodiment: ServedEmbodiment | None = None) -> Session:
        """A robot's session (default: of the embodiment served at /)."""
        return Session(self, embodiment or self.default_embodiment)


def load_runtime(model: str, device: str = "auto", steps: int | None = None, embodiment: str | None = None,
                 sampler: str | None = None, max_batch: int | None = None, compile: str | None = None,
                 compute: str | None = None, devices: int | None = None) -> PolicyRuntime:
    """The runtime of a quantized model folder on `device` (auto: the GPU if there is one); compute names the
    matmuls' path (default serving.compute; auto: by the device's compute capability)."""
    if compile is not None and compile not in COMPILE_MODES:
        raise ConfigError(f"--compile {compile!r} is not one of {', '.join(COMPILE_MODES)}")
    chosen = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    return PolicyRuntime(load_quantized(model, chosen, compute), chosen, steps, embodiment, sampler, max_batch, compile,
                         devices)


class Session:
    def __init__(self, runtime: PolicyRuntime, embodiment: ServedEmbodiment):
        self.runtime, self.embodiment = runtime, embodiment
        self.rollout = ChunkRollout(runtime.policy.model, runtime.sampler, runtime.sample,
                                    negative_text=runtime.negative_text, denoiser=runtime.engine.denoiser,
                                    peer=runtime.peer)
        self.generator = torch.Generator(runtime.device).manual_seed(runtime.policy.config.seed)
        self.prompt: str | None = None  # the open context window's; None: the next call opens one
        self.text: tuple[str, torch.Tensor] | None = None  # a prompt and its umT5 features
        self.returned: list[_Returned] = []
        self.stream = StreamState()
        self.newest_frame: torch.Tensor | None = None  # (1, 3, 1, H, W) uint8
        self.newest_latent: torch.Tensor | None = None  # (1, z, 1, h, w): where a decoded prediction starts from
        self.chunks_served = 0

    def reset(self) -> None:
        """Forget the context; the next episode starts as on a new connection (the same noise included)."""
        self.close_window()
        self.generator.manual_seed(self.runtime.policy.config.seed)

    def close_window(self) -> None:
        """The next call opens a new context window from its frames (a client that sends one frame per call)."""
        self.prompt, self.returned, self.newest_frame = None, [], None

    # -- request parsing ------------------------------------------------------------------------------

    def _frames(self, obs: dict) -> torch.Tensor | None:
        """The cameras' frames tiled as in training: (1, 3, T, H, W) uint8, or None when none were sent."""
        profile = self.embodiment.profile
        sources = {c: profile.request_sources(c, obs) for c in profile.cameras}
        present = [c for c, keys in sources.items() if keys]
        if not present:
            return None
        if len(present) != len(profile.cameras):
            raise RequestError(f"send all cameras {list(profile.cameras)} or none; missing "
                               f"{sorted(set(profile.cameras) - set(present))}")
        views = []
        for (camera,) in sources.values():  # the request's key: the camera's own or its request_keys entry
            view = obs[camera]
            if not isinstance(view, np.ndarray) or view.dtype != np.uint8:
                raise RequestError(f"{camera} must be a uint8 numpy array (H, W, 3) or (T, H, W, 3), got "
                                   f"{getattr(view, 'dtype', type(view).__name__)}")
            view = view[None] if view.ndim == 3 else view
            if view.ndim != 4 or view.shape[-1] != 3 or not 0 < min(view.shape[1:3]) <= max(view.shape[1:3]) \
                    <= MAX_FRAME_SIDE or view.shape[0] < 1:
                raise RequestError(f"{camera} must be (H, W, 3) or (T, H, W, 3) RGB frames of at most "
                                   f"{MAX_FRAME_SIDE} pixels a side, got shape {view.shape}")
            views.append(torch.from_numpy(np.array(view)).permute(0, 3, 1, 2))
        if len({v.shape[0] for v in views}) != 1:
            raise RequestError(f"cameras sent different numbers of frames: {[v.shape[0] for v in views]}")
        canvas = tile(views, self.embodiment.profile.layout, self.runtime.canvas)  # (T, 3, H, W) uint8
        return canvas.permute(1, 0, 2, 3)[None]

    @staticmethod
    def _state_part(key: str, value) -> np.ndarray:
        """One request key's share of the state: a flat, finite array of numbers."""
        try:
            array = np.asarray(value)
        except ValueError:  # e.g. ragged nested lists
            raise RequestError(f"{key} must be a flat array of numbers, got {type(value).__name__} of uneven "
                               "length") from None
        if array.dtype.kind not in "fiu" or array.ndim > 1:
            raise RequestError(f"{key} must be a flat array of numbers, got dtype {array.dtype}, shape {array.shape}")
        if not np.isfinite(array.astype(np.float64)).all():
            raise RequestError(f"{key} holds NaN or inf at {np.flatnonzero(~np.isfinite(array)).tolist()[:8]}")
        return array.reshape(-1).astype(np.float64)

    def _state(self, obs: dict) -> np.ndarray:
        profile, parts = self.embodiment.profile, []
        for state_key in profile.state_keys:
            sources = profile.request_sources(state_key, obs)
            if sources is None:
                instead = f" (or {list(profile.request_keys[state_key])})" if state_key in profile.request_keys else ""
                raise RequestError(f"missing state {state_key!r}{instead}; the policy expects "
                                   f"{list(profile.state_keys)}")
            parts += [self._state_part(key, obs[key]) for key in sources]
        state = np.concatenate(parts)
        expected = len(self.embodiment.stats.state_q01) if self.embodiment.stats else None
        if expected is not None and len(state) != expected:
            raise RequestError(f"state has {len(state)} dims, the policy was trained on {expected}")
        if len(state) > self.runtime.arch.state_dim:
            raise RequestError(f"state has {len(state)} dims, the model takes at most {self.runtime.arch.state_dim}")
        far = self.embodiment.state_check.problems(state) if len(state) == len(self.embodiment.state_check.low) else ""
        if far:
            raise RequestError(f"the state is far outside what the policy was trained on: {far}. Check the robot's "
                               "units and joint order; serving.state_margin sets how far beyond the training range "
                               "is accepted")
        return state

    # -- the closed loop ------------------------------------------------------------------------------

    def _start_window(self, frame: torch.Tensor, prompt: str) -> None:
        """Prefill the cache with `frame` (1, 3, 1, H, W) uint8 as the first frame of a new context window."""
        encoders, runtime = self.runtime.encoders, self.runtime
        if self.text is None or self.text[0] != prompt:
            with runtime.encoding:
                self.text = prompt, encoders.text([prompt]).to(runtime.device)
        self.stream = StreamState()
        # with other sessions' new windows waiting at the same time
        first = runtime.frame_encoder.open_window(frame, self.stream, runtime.sample.window_frames)
        with runtime.encoding:
            self.rollout.reset(first.latents, self.text[1], first.image, first.i2v)  # a forward outside the engine
        self.prompt, self.returned, self.newest_frame, self.newest_latent = prompt, [], frame, first.latents[:, :, -1:]

    def _observe(self, frames: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The latents of the frames the robot saw while executing the oldest returned chunk, and that chunk's
        index: what to write into the cache in place of its prediction."""
        if not self.returned:
            raise RequestError("no returned chunk is waiting for its frames; frames come after a chunk was executed")
        expected = self.runtime.pixel_frames_per_chunk
        if frames.shape[2] != expected:
            raise RequestError(f"got {frames.shape[2]} frames per camera; send the {expected} frames the robot saw "
                               f"while executing the last chunk (every {self.embodiment.profile.video_stride}th control "
                               "step), or none to predict one chunk ahead")
        latents = self.runtime.frame_encoder.encode(frames, self.stream)
        self.newest_frame, self.newest_latent = frames[:, :, -1:], latents[:, :, -1:]
        return latents, self.returned.pop(0).index

    def _anchor(self, state: np.ndarray) -> np.ndarray:
        """The state the next chunk starts from: the robot's, or (one chunk ahead) where the chunk still being
        executed ends on the relative dims."""
        if not self.returned or self.embodiment.postprocess is None:
            return state
        anchor = state.copy()
        dims = list(self.embodiment.profile.relative_dims)
        anchor[dims] = self.returned[-1].actions[-1, dims]
        return anchor

    @torch.no_grad()
    def infer(self, obs: dict) -> dict:
        if not isinstance(obs, dict):
            raise RequestError(f"a request is a msgpack map of observations, got {type(obs).__name__}")
        if RESET_KEY in obs:
            if obs[RESET_KEY] is not True or len(obs) != 1:
                raise RequestError(f'a reset is exactly {{"{RESET_KEY}": true}}, got {obs!r}'[:300])
            self.reset()
            return {"reset": True}
        prompt = obs.get(PROMPT_KEY)
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(f"{PROMPT_KEY!r} must be a non-empty string")
        return_video = obs.get(VIDEO_KEY, False)
        if not isinstance(return_video, bool):
            raise RequestError(f"{VIDEO_KEY!r} must be true or false, got {return_video!r}"[:200])
        state = self._state(obs)
        frames = self._frames(obs)
        start = time.perf_counter()
        new_window = prompt != self.prompt
        writes: list[tuple[torch.Tensor, int]] = []  # (latents, chunk) to write into the cache first, in order
        if new_window:
            if frames is None:
                raise RequestError(f"the first call of a session or prompt needs the cameras {list(self.embodiment.profile.cameras)}")
            self._start_window(frames[:, :, -1:], prompt)
        else:
            if frames is not None:
                writes.append(self._observe(frames))
            elif not self.returned:
                raise RequestError("send the frames the robot saw while executing the last chunk")
            if len(self.returned) > 1:
                raise RequestError(f"at most one chunk can be predicted ahead; send the frames of chunk "
                                   f"{self.returned[0].index} of this window first")
            writes += [(ahead.video, ahead.index) for ahead in self.returned]  # stands in until its frames come
            if writes[-1][1] + 1 >= self.rollout.max_chunks:  # the window is full: a new one from the newest frame
                self._start_window(self.newest_frame, prompt)  # (what was to be written goes with the old one)
                new_window, writes = True, []
        encoded = time.perf_counter()
        chunk = self._act(self._anchor(state), writes)
        done = time.perf_counter()
        self.chunks_served += 1
        if len(self.returned) > 1:  # a chunk predicted ahead continues from the prediction before it
            self.newest_latent = self.returned[-2].video[:, :, -1:]
        reply = {"predicted_video": self._decoded(chunk.video)} if return_video else {}
        return reply | {"actions": self.returned[-1].actions, "chunk": self.chunks_served - 1,
                "window_chunk": self.returned[-1].index, "new_window": new_window,
                "safety": self.returned[-1].safety.to_reply(),
                "server_timing": {"encode_ms": (encoded - start) * 1000, "denoise_ms": (done - encoded) * 1000,
                                  "infer_ms": (done - start) * 1000, "denoising_steps": self.runtime.sampler.steps,
                                  "dit_steps": chunk.dit_steps, "transformer_passes": chunk.forwards,
                                  "queue_ms": chunk.queue_s * 1000, "batch": chunk.batch}}

    def _decoded(self, video: torch.Tensor) -> np.ndarray:
        """Predicted latents (1, z, F, h, w) -> (4F, H, W, 3) uint8 frames: decoded after the newest known latent
        frame (the causal decoder needs what came before; its own frame is dropped)."""
        with self.runtime.encoding:
            pixels = self.runtime.encoders.vae.decode(torch.cat([self.newest_latent, video.float()], dim=2))[0, :, 1:]
        return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()

    def _act(self, anchor: np.ndarray, writes: list[tuple[torch.Tensor, int]]) -> Chunk:
        """Write `writes` into the cache, then denoise the next chunk from `anchor`, through the engine."""
        runtime, embodiment = self.runtime, self.embodiment
        normalised = anchor if embodiment.state_range is None else normalize(anchor, *embodiment.state_range)
        state = torch.zeros(1, runtime.arch.state_dim, device=runtime.device)
        state[0, :len(normalised)] = torch.as_tensor(normalised, dtype=torch.float32)
        observations = [self.rollout.observations(latents, chunk) for latents, chunk in writes]
        for earlier in observations[:-1]:  # a chunk's frames before the prediction ahead of it
            runtime.engine.observe(earlier)
        chunk = runtime.engine.act(observations[-1] if observations else [],
                                   lambda: self.rollout.start(state, self.generator))
        raw = chunk.actions[0].float().cpu()
        require_finite(raw.numpy())  # before smoothing spreads it
        if embodiment.postprocess is None:
            actions = raw.numpy()[:, :len(embodiment.envelope.low)].astype(np.float32)
        else:
            actions = embodiment.postprocess(raw.numpy(), anchor)
        actions, report = embodiment.envelope.apply(actions, anchor)  # raises UnsafeOutput on NaN / inf
        self.returned.append(_Returned(chunk.index, chunk.video, actions, raw, report))
        return chunk
