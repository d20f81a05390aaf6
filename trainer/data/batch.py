"""Collating samples into the batches the trainer consumes: stacked tensors, prompts as strings.

Packed (`pack=True`, data.packing): windows of different numbers of chunks one after another along the chunk
and frame axes, batch 1, longest first (so fewer distinct layouts recur), with `windows` their chunks and the
action masks per chunk (see WamInputs and flow_loss).
"""

from __future__ import annotations

import torch

from wam.trainer.data.latent_episodes import Sample
from wam.trainer.data.lerobot import DataError
from wam.trainer.data.robot import RobotSample


def _stack_common(samples: list[Sample] | list[RobotSample], pack: bool) -> dict:
    if pack:
        chunks = [len(s.state) for s in samples]
        return {
            "windows": tuple(chunks),
            "actions": torch.cat([s.actions for s in samples])[None],
            "action_dims": torch.cat([s.action_dims.expand(k, -1) for s, k in zip(samples, chunks, strict=True)])[None],
            "has_actions": torch.tensor([s.has_actions for s, k in zip(samples, chunks, strict=True)
                                         for _ in range(k)])[None],
            "state": torch.cat([s.state for s in samples])[None],
            "prompt": [s.prompt for s in samples],
        }
    return {
        "actions": torch.stack([s.actions for s in samples]),
        "action_dims": torch.stack([s.action_dims for s in samples]),
        "has_actions": torch.tensor([s.has_actions for s in samples]),
        "state": torch.stack([s.state for s in samples]),
        "prompt": [s.prompt for s in samples],
    }


def _frames(tensors: list[torch.Tensor], pack: bool) -> torch.Tensor:
    """(C, T, ...) per sample -> (B, C, T, ...), or packed along T: (1, C, sum T, ...)."""
    return torch.cat(tensors, dim=1)[None] if pack else torch.stack(tensors)


def _longest_first(samples: list, pack: bool) -> list:
    return sorted(samples, key=lambda s: -len(s.state)) if pack else samples


def collate_latents(samples: list[Sample], pack: bool = False) -> dict:
    """Synthetic samples, already in latent space (video latents, image tokens, I2V channels)."""
    samples = _longest_first(samples, pack)
    batch = {"video": _frames([s.video for s in samples], pack), **_stack_common(samples, pack)}
    if samples[0].image is not None:
        batch["image"] = torch.stack([s.image for s in samples])
    if samples[0].i2v_cond is not None:
        batch["i2v_cond"] = _frames([s.i2v_cond for s in samples], pack)
    return batch


def collate_robot(samples: list[RobotSample | DataError], pack: bool = False) -> dict:
    """Robot samples as pixels; samples that failed (bad_samples: skip) are dropped and counted."""
    good = _longest_first([s for s in samples if isinstance(s, RobotSample)], pack)
    batch = {"skipped": len(samples) - len(good)}
    if good:
        batch.update(pixels=_frames([s.pixels for s in good], pack), **_stack_common(good, pack))
    return batch
