"""A recorded LeRobot episode standing in for a robot: it drives a served policy through the public
openpi-client exactly as a robot loop would (first frame, then each chunk's real frames), and compares the
returned commands with the recorded actions. `make demo` and `wam client` use it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wam.platform.config import DatasetEntry, WamConfig, resolve_preset
from wam.platform.policy_client import ChunkResult, PolicyClient, run_async, run_sync
from wam.trainer.data.robot import RobotSource, WindowData


@dataclass
class ReplayStep:
    result: ChunkResult
    recorded: np.ndarray  # (A, dims) the actions the robot actually took


def replay(cfg: WamConfig, dataset: str, uri: str, windows: int = 1, asynchronous: bool = False,
           control_hz: float | None = None) -> list[ReplayStep]:
    client = PolicyClient(uri, control_hz)
    meta = client.metadata
    preset = resolve_preset(cfg)
    source = RobotSource([DatasetEntry(uri=dataset, profile=meta["embodiment"])], cfg.data.profiles, preset.arch,
                         preset.sample, cfg.seed)
    steps: list[ReplayStep] = []
    try:
        for index in np.linspace(0, len(source.windows) - 1, windows).round().astype(int):
            data = source.load(source.windows[index])
            steps += _replay_window(client, data, source.profiles[0].prompt.format(task=data.task), asynchronous)
            client.reset()
    finally:
        client.close()
    return steps


def _replay_window(client: PolicyClient, data: WindowData, prompt: str, asynchronous: bool) -> list[ReplayStep]:
    meta = client.metadata
    if len(meta["state_keys"]) != 1:
        raise ValueError("replay sends the recorded state under one key; this profile has several")
    state_key, cameras, f = meta["state_keys"][0], meta["cameras"], meta["frames_per_chunk"]
    k = len(data.state)
    horizon = len(data.actions) // k

    def observation(chunk: int, frames: slice) -> dict:
        return {**{c: data.views[c][frames] for c in cameras}, state_key: data.state[chunk].astype(np.float32),
                "prompt": prompt}

    executed = iter(range(1, k))

    def execute(actions: np.ndarray) -> dict:  # the robot "moves" and returns what it recorded meanwhile
        c = next(executed)
        return observation(c, slice(1 + f * (c - 1), 1 + f * c))

    run = run_async if asynchronous else run_sync
    return [ReplayStep(result, data.actions[c * horizon:(c + 1) * horizon])
            for c, result in enumerate(run(client, observation(0, slice(0, 1)), execute, k))]
