"""The rank-sharded, resumable loader that feeds torchtitan's Trainer.

Sample order is a function of (seed, epoch) alone: every epoch is a fresh permutation of the source,
rank r of W takes every W-th entry. The loader's state (epoch, position of the next sample the trainer
will get) is checkpointed under a rank-unique key, so a resumed run continues with exactly the next
samples, whatever the decoding workers had prefetched.

With data.packing, windows of 1..K chunks are taken in the same order, PACK_GROUP micro-batches' worth at a
time, and packed first-fit decreasing into sequences of at most batch_size K-chunk windows' tokens. The
packing is a function of the order alone; the state adds how many sequences of the current group the trainer
had, so resuming repeats the packing too.
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
import tyro
from torch.utils.data import DataLoader
from torchtitan.components.dataloader import BaseDataLoader

from wam.platform.config import DataSection
from wam.platform.layout import TokenLayout
from wam.platform.presets import SampleShape, WamArch
from wam.trainer.data.batch import collate_latents, collate_robot
from wam.trainer.data.latent_episodes import SyntheticLatents
from wam.trainer.data.robot import RobotSource


class EpochOrder:
    """Which source index each rank reads next; its state is two integers."""

    def __init__(self, size: int, seed: int, rank: int, world: int):
        if size < world:
            raise ValueError(f"the data source has {size} samples, fewer than the {world} data-parallel ranks")
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.position = 0, 0

    def _shard(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.size)[self.rank::self.world]

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            shard = self._shard()
            if self.position >= len(shard):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            out.append(int(shard[self.position]))
            self.position += 1
        return out

    def batches(self, n: int) -> Iterator[list[int]]:
        while True:
            yield self.take(n)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "world": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["world"] != self.world:
            raise ValueError(f"the checkpoint's data order is for {state['world']} data-parallel ranks, this run has "
                             f"{self.world}; resume with the same number of processes")
        self.epoch, self.position = state["epoch"], state["position"]


PACK_GROUP = 8  # packing looks this many micro-batches of windows ahead


def pack(indices: list[int], tokens: Callable[[int], int], budget: int) -> list[list[int]]:
    """First-fit decreasing: `indices` in as few bins of at most `budget` tokens as it finds (`tokens(index)`
    each), deterministic for the same input."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(indices, key=lambda i: -tokens(i)):  # stable: ties keep the order
        size = tokens(index)
        fit = next((b for b, free in enumerate(room) if size <= free), None)
        if fit is None:
            bins.append([])
            room.append(budget)
            fit = len(bins) - 1
        bins[fit].append(index)
        room[fit] -= size
    return bins


class WamDataLoader(BaseDataLoader):
    """Batches of training samples for this data-parallel rank, as (inputs, labels) for torchtitan.

    `labels` is a zero tensor with one entry per sequence token: torchtitan counts its elements for
    tokens/s and MFU, and the WAM loss does not use it. Robot samples are decoded by `workers` processes.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        arch: Annotated[WamArch, tyro.conf.Suppress]
        sample: Annotated[SampleShape, tyro.conf.Suppress]
        data: Annotated[DataSection, tyro.conf.Suppress] = field(default_factory=DataSection)  # the run's `data`
        seed: int = 0

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, local_batch_size: int, **_: Any):
        d = config.data
        min_chunks = d.min_chunks if d.packing else None
        if d.source == "synthetic":
            self.source = SyntheticLatents(config.arch, config.sample, d.episodes, config.seed, d.video_only_fraction,
                                           min_chunks)
            self.collate, self.workers = functools.partial(collate_latents, pack=d.packing), 0
        elif d.source == "lerobot":
            self.source = RobotSource(d.datasets, d.profiles, config.arch, config.sample, config.seed, d.decoder,
                                      d.bad_samples, d.crop_scale, d.epoch_samples, min_chunks)
            self.collate, self.workers = functools.partial(collate_robot, pack=d.packing), d.workers
        else:
            raise ValueError(f"unknown data source {d.source!r}")
        self.order = EpochOrder(len(self.source), config.seed, dp_rank, dp_world_size)
        self.rank, self.batch_size, self.delay_s, self.packing = dp_rank, local_batch_size, d.delay_s, d.packing
        self.packed = 0  # sequences of the current packing group the trainer has had
        s = config.sample
        self.window_tokens = [TokenLayout.teacher_forcing(k, s.frames_per_chunk, s.tokens_per_frame(config.arch),
                                                          s.actions_per_chunk).length for k in range(s.num_chunks + 1)]

    def _tokens(self, index: int) -> int:
        return self.window_tokens[self.source.chunks(index)]

    def _plan(self, order: EpochOrder) -> Iterator[tuple[list[int], int]]:
        """(source indices, order entries used up once the trainer has them) of each batch from the order's
        position, after the `packed` sequences of the current group the trainer already had."""
        if not self.packing:
            for indices in order.batches(self.batch_size):
                yield indices, self.batch_size
            return
        group, budget, skip = PACK_GROUP * self.batch_size, self.batch_size * self.window_tokens[-1], self.packed
        while True:
            bins = pack(order.take(group), self._tokens, budget)
            for b, indices in enumerate(bins[skip:], start=skip):
                yield indices, group if b == len(bins) - 1 else 0
            skip = 0

    def _batches(self) -> Iterator[tuple[dict, int]]:
        """Collated batches in order from the current position, each with the order entries it uses up (one plan,
        from a copy of the order: the workers prefetch ahead of what the trainer has had)."""
        for_workers, for_trainer = itertools.tee(self._plan(copy.deepcopy(self.order)))
        indices = (batch for batch, _ in for_workers)
        if self.workers == 0:
            collated = (self.collate([self.source[i] for i in batch]) for batch in indices)
        else:
            collated = DataLoader(self.source, batch_sampler=indices, num_workers=self.workers,
                                  collate_fn=self.collate, prefetch_factor=2)
        yield from zip(collated, (used for _, used in for_trainer), strict=True)

    def __iter__(self) -> Iterator[tuple[dict, torch.Tensor]]:
        skipped = 0
        for batch, used in self._batches():
            self.order.take(used)  # the trainer now has these samples
            self.packed = 0 if used else self.packed + 1
            skipped += batch.pop("skipped", 0)
            if "video" not in batch and "pixels" not in batch:
                continue  # every sample of the batch was bad and skipped
            batch["skipped"] = skipped
            skipped = 0
            if self.delay_s:
                time.sleep(self.delay_s)
            # one label per real token: torchtitan counts them for tokens/s
            shape = ((1, sum(self.window_tokens[k] for k in batch["windows"])) if self.packing
                     else (len(batch["prompt"]), self.window_tokens[-1]))
            yield batch, torch.zeros(shape, dtype=torch.int8)

    def state_dict(self) -> dict[str, Any]:
        return {f"rank{self.rank}": {**self.order.state_dict(), "packed": self.packed}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        key = f"rank{self.rank}"
        if key not in state_dict:
            raise ValueError(f"the checkpoint has no data-loader state for data-parallel rank {self.rank}; "
                             "resume with the same number of processes")
        self.order.load_state_dict(state_dict[key])
        self.packed = state_dict[key].get("packed", 0)
