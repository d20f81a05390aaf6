"""Rectified flow for joint video/action denoising: noise levels, the training loss, and the samplers (Euler,
FlowUniPC, classifier-free guidance, the DiT step cache).

Conventions: t in [0, 1] is a noise level before the shift, sigma = shift*t / (1 + (shift-1)*t) the one
used to mix, x_sigma = (1 - sigma) x + sigma eps, the model predicts the velocity eps - x, and receives
timesteps sigma * 1000. Clean context tokens have timestep 0.

Schedules (per chunk):
  - coupled: video and actions of a chunk share t ~ U(0, 1) (DreamZero's released recipe);
  - flash (DreamZero-Flash): video t ~ Beta(7, 1) (mostly noisy; DreamZero writes it as 1 - eta in its
    signal-level convention), action t ~ U(0, 1), so one-step action denoising works while video is noisy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wam.platform.config import FlowSection, SamplerSection
from wam.trainer.model.model import WamInputs

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


class StepRandomness:
    """All randomness of one training step, derived from (seed, step, rank) alone.

    torchtitan does not checkpoint the global RNG, so a resumed run must not depend on it. NumPy draws
    the (small) noise levels, a torch.Generator the noise tensors; both come from one SeedSequence.
    """

    def __init__(self, seed: int, step: int, rank: int, microbatch: int = 0):
        self._key = [seed, step, rank, microbatch]
        sequence = np.random.SeedSequence(self._key)
        self.numpy = np.random.Generator(np.random.PCG64(sequence))
        self._torch_seed = int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))

    def torch(self, device: torch.device | str = "cpu") -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(self._torch_seed)
        return generator

    def dropped(self, count: int, p: float) -> np.ndarray:
        """Which of `count` prompts prompt dropout replaces, each with probability p: a stream of its own, so
        the noise levels and noise are the same with and without dropout."""
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([*self._key, 1]))).uniform(size=count) < p


def drop_prompts(prompts: list[str], cfg: FlowSection, randomness: StepRandomness) -> list[str]:
    """Prompt dropout (flow.prompt_dropout), which trains the unconditional branch classifier-free guidance uses."""
    if cfg.prompt_dropout == 0:
        return prompts
    dropped = randomness.dropped(len(prompts), cfg.prompt_dropout)
    return [cfg.dropout_prompt if drop else prompt for prompt, drop in zip(prompts, dropped, strict=True)]


def sample_noise_levels(cfg: FlowSection, batch: int, chunks: int,
                        rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-shift noise levels (video, action), each (batch, chunks) float32 in [0, 1]."""
    if cfg.schedule == "coupled":
        t = rng.uniform(size=(batch, chunks))
        video, action = t, t
    elif cfg.schedule == "flash":
        a, b = cfg.flash_video_beta
        video = rng.beta(a, b, size=(batch, chunks))
        action = rng.uniform(size=(batch, chunks))
    else:
        raise ValueError(f"unknown noise schedule {cfg.schedule!r}; choose coupled or flash")
    return torch.as_tensor(video, dtype=torch.float32), torch.as_tensor(action, dtype=torch.float32)


@dataclass
class NoisedBatch:
    """Model inputs of one teacher-forcing step and what the loss compares the outputs with."""

    inputs: WamInputs
    target_video: torch.Tensor  # noise - clean, (B, z, K*F, h, w)
    target_actions: torch.Tensor  # (B, K, A, action_dim)
    sigma_video: torch.Tensor  # (B, K) after the shift
    sigma_action: torch.Tensor


def noise_batch(video: torch.Tensor, actions: torch.Tensor, state: torch.Tensor, text: torch.Tensor,
                cfg: FlowSection, randomness: StepRandomness, image: torch.Tensor | None = None,
                i2v_cond: torch.Tensor | None = None, windows: tuple[int, ...] | None = None) -> NoisedBatch:
    """Draw per-chunk noise levels and noise, and noise the chunks' video frames and actions.

    video (B, z, 1 + K*F, h, w) clean latents (frame 0 stays clean context); actions (B, K, A, action_dim).
    Packed windows (`windows`: chunks of each, see WamInputs): every window's first frame stays clean.
    """
    b, k = actions.shape[:2]
    firsts = len(windows) if windows is not None else 1
    frames = video.shape[2] - firsts
    t_video, t_action = sample_noise_levels(cfg, b, k, randomness.numpy)
    sigma_v = shift_sigma(t_video, cfg.shift).to(video.device)
    sigma_a = shift_sigma(t_action, cfg.shift).to(video.device)
    generator = randomness.torch(video.device)
    clean = video[:, :, _chunk_frames(windows, frames // k)] if windows is not None else video[:, :, 1:]
    noise_v = torch.randn(clean.shape, generator=generator, device=video.device)
    noise_a = torch.randn(actions.shape, generator=generator, device=video.device)
    sigma_frames = sigma_v.repeat_interleave(frames // k, dim=1)[:, None, :, None, None]  # (B, 1, K*F, 1, 1)
    inputs = WamInputs(
        video=video, noisy_video=(1 - sigma_frames) * clean + sigma_frames * noise_v,
        noisy_actions=add_noise(actions, noise_a, sigma_a), state=state,
        video_t=sigma_v * NUM_TRAIN_TIMESTEPS, action_t=sigma_a * NUM_TRAIN_TIMESTEPS,
        text=text, image=image, i2v_cond=i2v_cond, windows=windows,
    )
    return NoisedBatch(inputs, noise_v - clean, noise_a - actions, sigma_v, sigma_a)


def _chunk_frames(windows: tuple[int, ...], frames_per_chunk: int) -> torch.Tensor:
    """Indices of the chunk frames (all but each window's first frame) along a packed video's frame axis."""
    firsts = torch.tensor([0, *windows[:-1]]).cumsum(0) * frames_per_chunk + torch.arange(len(windows))
    keep = torch.ones(len(windows) + sum(windows) * frames_per_chunk, dtype=torch.bool)
    keep[firsts] = False
    return keep.nonzero().squeeze(1)


def add_noise(x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x + sigma noise, with sigma broadcast over x's trailing dims."""
    sigma = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
    return (1 - sigma) * x + sigma * noise


class LossWeighting:
    """Per-timestep loss weight. `bell` is DreamZero's w(T) = exp(-2((T - 500)/1000)^2) minus its minimum
    (at T = 0 and 1000), normalised to mean 1 over the training distribution of T = 1000*sigma."""

    def __init__(self, kind: str, shift: float):
        self.kind = kind
        if kind == "bell":
            t = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000  # uniform pre-shift levels
            self._norm = self._bell(shift_sigma(t, shift)).mean().item()
        elif kind != "uniform":
            raise ValueError(f"unknown loss weighting {kind!r}; choose uniform or bell")

    @staticmethod
    def _bell(sigma: torch.Tensor) -> torch.Tensor:
        return torch.exp(-2 * (sigma - 0.5) ** 2) - math.exp(-0.5)

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.kind == "uniform":
            return torch.ones_like(sigma)
        return (self._bell(sigma.double()) / self._norm).to(sigma.dtype)


@dataclass
class FlowLoss:
    """Weighted squared-error sums and their element counts, so a trainer can normalise by the global
    (all-rank) counts; `total()` normalises locally."""

    video_sum: torch.Tensor
    video_count: torch.Tensor
    action_sum: torch.Tensor
    action_count: torch.Tensor
    video_weight: float
    action_weight: float

    def total(self, video_count: torch.Tensor | None = None, action_count: torch.Tensor | None = None) -> torch.Tensor:
        vc = self.video_count if video_count is None else video_count
        ac = self.action_count if action_count is None else action_count
        return (self.video_weight * self.video_sum / vc.clamp(min=1)
                + self.action_weight * self.action_sum / ac.clamp(min=1))

    @property
    def video(self) -> torch.Tensor:
        return self.video_sum / self.video_count.clamp(min=1)

    @property
    def action(self) -> torch.Tensor:
        return self.action_sum / self.action_count.clamp(min=1)


def flow_loss(pred_video: torch.Tensor, pred_actions: torch.Tensor, target_video: torch.Tensor,
              target_actions: torch.Tensor, sigma_video: torch.Tensor, sigma_action: torch.Tensor,
              action_dim_mask: torch.Tensor, has_actions: torch.Tensor, weighting: LossWeighting,
              video_weight: float = 1.0, action_weight: float = 1.0) -> FlowLoss:
    """Video + action velocity MSE.

    pred/target_video (B, z, K*F, h, w); pred/target_actions (B, K, A, action_dim); sigma_* (B, K);
    action_dim_mask (B, action_dim) marks real (not padded) action dims; has_actions (B,) is False for
    video-only episodes, which then train the video loss only (packed windows give both per chunk: (B, K,
    action_dim) and (B, K)). Video error is averaged per latent frame, action error over the real dims of each
    action; both are weighted by their chunk's timestep weight. Every frame and action counted is a real one.
    """
    b, _, frames, _, _ = pred_video.shape
    chunks = sigma_video.shape[1]
    per_frame = (pred_video.float() - target_video.float()).square().mean(dim=(1, 3, 4))  # (B, K*F)
    frame_weight = weighting(sigma_video).repeat_interleave(frames // chunks, dim=1)
    video_sum = (per_frame * frame_weight).sum()
    video_count = torch.tensor(float(b * frames), device=pred_video.device)

    dims = action_dim_mask.float()
    dims = dims[:, None, None, :] if dims.ndim == 2 else dims[:, :, None, :]  # (B, 1 or K, 1, action_dim)
    sq = (pred_actions.float() - target_actions.float()).square()
    per_action = (sq * dims).sum(-1) / dims.sum(-1).clamp(min=1)  # (B, K, A)
    has = has_actions.float()
    has = (has[:, None] if has.ndim == 1 else has).expand(b, chunks)  # (B, K)
    action_sum = (per_action * (has * weighting(sigma_action))[:, :, None]).sum()
    action_count = has.sum() * per_action.shape[2]
    return FlowLoss(video_sum, video_count, action_sum, action_count, video_weight, action_weight)


def sampling_sigmas(steps: int, shift: float, final_sigma: float = 0.0) -> torch.Tensor:
    """steps+1 decreasing noise levels from 1 (pure noise) to `final_sigma` on the shifted grid."""
    if steps < 1:
        raise ValueError(f"need at least one denoising step, got {steps}")
    sigmas = shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    return (final_sigma + (1 - final_sigma) * sigmas).float()


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Follow dx/dsigma = velocity from sigma to sigma_next."""
    return x + (sigma_next - sigma) * velocity


# -- sampling: schedules, solvers, guidance, the DiT step cache ------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """The noise levels of one denoising trajectory: sigmas (steps + 1,) float32, decreasing to the final
    level, and the timesteps (steps,) the model is given at each step."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor


def euler_schedule(steps: int, shift: float, final_sigma: float = 0.0) -> Schedule:
    sigmas = sampling_sigmas(steps, shift, final_sigma)
    return Schedule(sigmas, sigmas[:-1] * NUM_TRAIN_TIMESTEPS)


def unipc_schedule(steps: int, shift: float, final_sigma: float = 0.0) -> Schedule:
    """Wan2.1's FlowUniPC grid, which DreamZero samples on: `steps` levels evenly spaced from the largest
    training sigma (1 - 1/1000, as Wan's scheduler holds it in float32) towards 0, shifted in float64, then 0
    appended and all kept in float32; timesteps are sigma * 1000 truncated to integers. A final_sigma > 0
    maps [sigma_0, 0] onto [sigma_0, final_sigma], as DreamZero's decoupled video inference does."""
    if steps < 1:
        raise ValueError(f"need at least one denoising step, got {steps}")
    top = float(np.float32(1 - 1 / NUM_TRAIN_TIMESTEPS))
    base = np.linspace(top, 0.0, steps + 1)[:-1]
    shifted = shift * base / (1 + (shift - 1) * base)
    sigmas = torch.from_numpy(np.append(shifted, 0.0).astype(np.float32))
    if final_sigma:
        sigmas = sigmas * (sigmas[0] - final_sigma) / sigmas[0] + final_sigma
        shifted = sigmas[:-1].numpy()
    return Schedule(sigmas, torch.from_numpy(shifted * NUM_TRAIN_TIMESTEPS).long().float())


class EulerSolver:
    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas

    def step(self, i: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return euler_step(sample, velocity, self.sigmas[i].item(), self.sigmas[i + 1].item())

    @staticmethod
    def step_many(solvers: list[EulerSolver], steps: list[int], velocities: list[torch.Tensor],
                  samples: list[torch.Tensor], batched: bool | None = None) -> list[torch.Tensor]:
        """`step` of several trajectories (one fused op each already: nothing to gain from batching them)."""
        return [s.step(i, v, x) for s, i, v, x in zip(solvers, steps, velocities, samples, strict=True)]


class FlowUniPC:
    """UniPC multistep on flow-matching sigmas, as Wan2.1's FlowUniPCMultistepScheduler (DreamZero's sampler)
    and diffusers' UniPCMultistepScheduler(use_flow_sigmas, prediction_type="flow_prediction") compute it:
    B(h) = e^h - 1 ("bh2"), updates on the clean-sample estimate x0 = x - sigma v, predictor order 1, 2, ..., 2,
    1 and a corrector at every step after the first; the coefficients stay float32. One trajectory: call
    `step` for i = 0, 1, ... in order. With a final sigma of 0 the last step is x - sigma v exactly, and its
    correction (which would need one more model evaluation) never happens."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas.float()
        self.alphas = 1 - self.sigmas
        self.lambdas = torch.log(self.alphas) - torch.log(self.sigmas)  # log-SNR; +inf at sigma 0
        self.x0: list[torch.Tensor] = []  # the last two clean-sample estimates, newest last
        self.start: torch.Tensor | None = None  # the sample the last predictor started from
        self.order = 0  # the last predictor's order
        self._scalars = _unipc_scalars(self.sigmas.numpy().tobytes())

    def step(self, i: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        x0 = sample - self.sigmas[i] * velocity
        if i > 0:
            sample = self._correct(i, x0)
        self._taken(i, x0, sample)
        return self._predict(i)

    def _taken(self, i: int, x0: torch.Tensor, start: torch.Tensor) -> None:
        self.x0 = [*self.x0[-1:], x0]
        self.order = min(2, len(self.sigmas) - 1 - i, i + 1)
        self.start = start

    @staticmethod
    def step_many(solvers: list[FlowUniPC], steps: list[int], velocities: list[torch.Tensor],
                  samples: list[torch.Tensor], batched: bool | None = None) -> list[torch.Tensor]:
        """`step` of several trajectories on one schedule, each at its own step with its own history (sessions
        batched by the serving engine). `batched` (default: on CUDA) runs one set of elementwise ops over all
        their rows instead of a set per trajectory, each row's coefficients gathered from the schedule's table:
        on a GPU every op of a session's step is a kernel launch on a few hundred KB, so launches are what a step
        costs; on a CPU batching saves Python's overhead but adds copies and broadcast operands, a loss at the
        14B's shapes (`benchmarks/serve.py --concurrency`). Each row's arithmetic is `step`'s, in the same
        order, so a float32 trajectory gets the same bits either way."""
        first = solvers[0]
        if batched is None:
            batched = samples[0].is_cuda
        if not batched or len(solvers) == 1 or any(s._scalars is not first._scalars for s in solvers[1:]):
            return [s.step(i, v, x) for s, i, v, x in zip(solvers, steps, velocities, samples, strict=True)]
        rows = [x.shape[0] for x in samples]
        sample = torch.cat(samples)
        velocity = torch.cat(velocities).to(sample.dtype)
        index = torch.repeat_interleave(torch.tensor(steps), torch.tensor(rows)).to(sample.device)
        table = first._table(sample.device)[index]  # (rows, columns)
        c = dict(zip(_TABLE_COLUMNS, table.view(*table.shape, *[1] * (sample.dim() - 1)).unbind(1), strict=True))

        def history(get) -> torch.Tensor:  # placeholders where a trajectory has none yet (branches not taken)
            parts = [get(s) for s in solvers]
            return torch.cat([torch.zeros_like(x) if p is None else p for p, x in zip(parts, samples, strict=True)])

        start = history(lambda s: s.start)
        p1, p2 = history(lambda s: s.x0[-1] if s.x0 else None), history(lambda s: s.x0[-2] if len(s.x0) > 1 else None)
        x0 = sample - c["sigma"] * velocity
        # _correct: the last predictor redone with x0 (order 1 or 2), on every step after the first
        x = c["ratio_c"] * start - c["alpha_b_h_c"] * p1
        d_t = x0 - p1
        second = x - c["alpha_b_h_c"] * (c["rho_1"] * ((p2 - p1) / c["rk_c"]) + c["rho_t"] * d_t)
        corrected = torch.where(c["second_c"] > 0, second, x - c["c1"] * d_t)
        sample = torch.where(c["corrects"] > 0, corrected, sample)
        # _predict from the corrected sample and the new x0 (order 1 or 2)
        x = c["ratio_p"] * sample - c["alpha_b_h_p"] * x0
        out = torch.where(c["second_p"] > 0, x - c["coef_p"] * (p1 - x0) / c["rk_p"], x)
        for solver, i, x0_rows, start_rows in zip(solvers, steps, x0.split(rows), sample.split(rows), strict=True):
            solver._taken(i, x0_rows, start_rows)
        return list(out.split(rows))

    def _table(self, device: torch.device) -> torch.Tensor:
        """(steps, len(_TABLE_COLUMNS)) float32 on `device`: each step's scalars (the very ones `step` uses) and
        branches, for step_many; built once per schedule and device."""
        def build() -> tuple[torch.Tensor]:
            rows, last = [], len(self.sigmas) - 1
            for i in range(last):
                order, previous = min(2, last - i, i + 1), min(2, last - i + 1, i)
                row = dict.fromkeys(_TABLE_COLUMNS, torch.ones(()))
                row["sigma"], row["corrects"] = self.sigmas[i], torch.tensor(float(i > 0))
                if i > 0:
                    row["ratio_c"], row["alpha_b_h_c"], b_h = self._memo(("base", i - 1, i), self._base_scalars(i - 1, i))
                    row["second_c"] = torch.tensor(float(previous == 2))
                    if previous == 1:
                        (row["c1"],) = self._memo(("correct-1", i), self._correct1_scalars(i, b_h))
                    else:
                        _, row["rho_1"], row["rho_t"], row["rk_c"] = self._memo(("correct-2", i),
                                                                                self._correct2_scalars(i, b_h))
                row["ratio_p"], row["alpha_b_h_p"], b_h = self._memo(("base", i, i + 1), self._base_scalars(i, i + 1))
                row["second_p"] = torch.tensor(float(order == 2))
                if order == 2:
                    row["coef_p"], row["rk_p"] = self._memo(("predict", i), self._predict_scalars(i, b_h))
                rows.append(torch.stack([row[k].float() for k in _TABLE_COLUMNS]))
            return (torch.stack(rows).to(device),)

        return self._memo(("table", str(device)), build)[0]

    def _memo(self, key: tuple, compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        if key not in self._scalars:
            self._scalars[key] = compute()
        return self._scalars[key]

    def _base_scalars(self, s: int, t: int) -> Callable[[], tuple[torch.Tensor, ...]]:
        def scalars() -> tuple[torch.Tensor, ...]:
            b_h = torch.expm1(self.lambdas[s] - self.lambdas[t])
            return self.sigmas[t] / self.sigmas[s], self.alphas[t] * b_h, b_h
        return scalars

    def _base(self, s: int, t: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first-order update from level s to t, and B(h) (its step size in x0 units)."""
        ratio, alpha_b_h, b_h = self._memo(("base", s, t), self._base_scalars(s, t))
        return ratio * x - alpha_b_h * self.x0[-1], b_h

    def _predict_scalars(self, i: int, b_h: torch.Tensor) -> Callable[[], tuple[torch.Tensor, ...]]:
        return lambda: (self.alphas[i + 1] * b_h * 0.5,
                        (self.lambdas[i - 1] - self.lambdas[i]) / (self.lambdas[i + 1] - self.lambdas[i]))

    def _predict(self, i: int) -> torch.Tensor:
        x, b_h = self._base(i, i + 1, self.start)
        if self.order == 1:
            return x
        coefficient, rk = self._memo(("predict", i), self._predict_scalars(i, b_h))
        return x - coefficient * (self.x0[-2] - self.x0[-1]) / rk

    def _correct(self, i: int, x0: torch.Tensor) -> torch.Tensor:
        """UniC: redo the last predictor (from level i-1 to i) with the new estimate x0 at level i."""
        x, b_h = self._base(i - 1, i, self.start)
        d_t = x0 - self.x0[-1]
        if self.order == 1:
            (coefficient,) = self._memo(("correct-1", i), self._correct1_scalars(i, b_h))
            return x - coefficient * d_t

        alpha_b_h, rho_1, rho_t, rk = self._memo(("correct-2", i), self._correct2_scalars(i, b_h))
        d_1 = (self.x0[-2] - self.x0[-1]) / rk
        return x - alpha_b_h * (rho_1 * d_1 + rho_t * d_t)

    def _correct1_scalars(self, i: int, b_h: torch.Tensor) -> Callable[[], tuple[torch.Tensor, ...]]:
        return lambda: (self.alphas[i] * b_h * 0.5,)

    def _correct2_scalars(self, i: int, b_h: torch.Tensor) -> Callable[[], tuple[torch.Tensor, ...]]:
        def scalars() -> tuple[torch.Tensor, ...]:
            hh = self.lambdas[i - 1] - self.lambdas[i]  # -h
            rk = (self.lambdas[i - 2] - self.lambdas[i - 1]) / -hh
            # UniC-2: [[1, 1], [rk, 1]] rho = b, b_k = k! x phi_{k+1}(x) / B(h) at x = -h (phi_k: e^x's remainders)
            phi_2 = torch.expm1(hh) / hh - 1
            b = torch.stack([phi_2 / b_h, 2 * (phi_2 / hh - 0.5) / b_h])
            rho = torch.linalg.solve(torch.stack([torch.ones(2), torch.stack([rk, torch.ones(())])]), b)
            return self.alphas[i] * b_h, rho[0], rho[1], rk
        return scalars


# FlowUniPC.step_many's table: per step, its sigma, whether it corrects, the correction's scalars and order, the
# prediction's scalars and order (1 where a scalar's branch is not taken)
_TABLE_COLUMNS = ("sigma", "corrects", "ratio_c", "alpha_b_h_c", "second_c", "c1", "rho_1", "rho_t", "rk_c",
                  "ratio_p", "alpha_b_h_p", "second_p", "coef_p", "rk_p")


@functools.lru_cache(maxsize=64)
def _unipc_scalars(schedule: bytes) -> dict[tuple, tuple[torch.Tensor, ...]]:
    """FlowUniPC's scalar coefficients, per sigma schedule (its float32 bytes): they depend on the sigmas and the
    step only, so every chunk of every session on one sampler shares them (computing them per chunk was most of a
    served step's solver time). Kept as the same float32 scalars, so the steps are bit-identical."""
    return {}


SCHEDULES = {"euler": euler_schedule, "unipc": unipc_schedule}
SOLVERS = {"euler": EulerSolver, "unipc": FlowUniPC}


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance; scale 1 is the conditional prediction itself."""
    return cond if scale == 1.0 else uncond + scale * (cond - uncond)


# DreamZero's static DiT step caches at 16 steps: the steps that run the transformer, by number of passes.
DREAMZERO_DIT_STEPS = {5: (0, 1, 2, 7, 12), 6: (0, 1, 5, 10, 14, 15), 7: (0, 1, 2, 6, 10, 14, 15),
                       8: (0, 1, 2, 6, 10, 13, 14, 15)}
# Dynamic schedule: when the last two computed video velocities agree above a threshold, skip that many steps.
DYNAMIC_SKIPS = ((0.95, 4), (0.93, 2))


def static_dit_steps(steps: int, passes: int, explicit: list[int] | tuple[int, ...] = ()) -> tuple[int, ...]:
    """The steps that run the transformer: `explicit` if given, DreamZero's table, else `passes` evenly spaced."""
    if explicit:
        return tuple(explicit)
    if passes >= steps:
        return tuple(range(steps))
    if steps == 16 and passes in DREAMZERO_DIT_STEPS:
        return DREAMZERO_DIT_STEPS[passes]
    return tuple(int(s) for s in np.linspace(0, steps - 1, passes).round())


def transformer_passes(sampler: SamplerSection) -> int:
    """Transformer forwards a chunk takes per branch: every step, or the static DiT step cache's; the dynamic
    cache decides as it goes (at most every step)."""
    if sampler.dit_cache == "static":
        return len(static_dit_steps(sampler.steps, sampler.dit_passes, sampler.dit_steps))
    return sampler.steps


class DitStepCache:
    """DreamZero's DiT step cache for one chunk: `run(i)` says whether step i runs the transformer; on the
    other steps the caller reuses the last computed velocities. `computed(video)` records a computed (guided)
    video velocity for the dynamic schedule: steps 0 and 1 always run; then a cosine similarity of the last
    two (per batch item, averaged) above 0.95 skips 4 steps, above 0.93 skips 2, each followed by a run."""

    def __init__(self, mode: str, steps: int, passes: int = 8, explicit: list[int] | tuple[int, ...] = ()):
        self.mode = mode
        self.static = set(static_dit_steps(steps, passes, explicit)) if mode == "static" else None
        if self.static is not None and 0 not in self.static:
            raise ValueError(f"the DiT step cache must run the first step (no velocity to reuse yet), got {explicit}")
        self.history: list[torch.Tensor] = []
        self.countdown = 0

    def run(self, i: int) -> bool:
        if self.mode == "none":
            return True
        if self.static is not None:
            return i in self.static
        if len(self.history) < 2:
            return True
        if self.countdown:
            self.countdown -= 1
            return self.countdown == 0
        similarity = F.cosine_similarity(self.history[-1], self.history[-2], dim=1).mean().item()
        skip = next((n for threshold, n in DYNAMIC_SKIPS if similarity > threshold), 0)
        self.countdown = skip
        return skip == 0

    def computed(self, video: torch.Tensor) -> None:
        if self.mode == "dynamic":
            self.history = [*self.history[-1:], video.flatten(1).float()]
