"""Collating samples into the batches the trainer consumes: stacked tensors, prompts as strings."""

from __future__ import annotations

import torch

from wam.trainer.data.latent_episodes import Sample
from wam.trainer.data.lerobot import DataError
from wam.trainer.data.robot import RobotSample


def _stack_common(samples: list[Sample] | list[RobotSample]) -> dict:
    return {
        "actions": torch.stack([s.actions for s in samples]),
        "action_dims": torch.stack([s.action_dims for s in samples]),
        "has_actions": torch.tensor([s.has_actions for s in samples]),
        "state": torch.stack([s.state for s in samples]),
        "prompt": [s.prompt for s in samples],
    }


def collate_latents(samples: list[Sample]) -> dict:
    """Synthetic samples, already in latent space (video latents, image tokens, I2V channels)."""
    batch = {"video": torch.stack([s.video for s in samples]), **_stack_common(samples)}
    if samples[0].image is not None:
        batch["image"] = torch.stack([s.image for s in samples])
    if samples[0].i2v_cond is not None:
        batch["i2v_cond"] = torch.stack([s.i2v_cond for s in samples])
    return batch


def collate_robot(samples: list[RobotSample | DataError]) -> dict:
    """Robot samples as pixels; samples that failed (bad_samples: skip) are dropped and counted."""
    good = [s for s in samples if isinstance(s, RobotSample)]
    batch = {"skipped": len(samples) - len(good)}
    if good:
        batch.update(pixels=torch.stack([s.pixels for s in good]), **_stack_common(good))
    return batch
