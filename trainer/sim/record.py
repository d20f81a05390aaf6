"""`wam sim record`: scripted-expert demonstrations in simulation, written as a LeRobot v3.0 dataset by the
project's own writer (wam.trainer.data.synth_dataset.write_dataset).

Each task's episodes are seeded from (seed, task, attempt): the reset draws object and goal positions,
the expert acts, optional Gaussian noise (std `action_noise`, clipped to [-1, 1]) perturbs every executed
action, and the episode ends `after_success` steps after its first successful one (the expert holds the goal
meanwhile, so a policy learns to stay there) or at the task's step limit. Failed episodes are
dropped and another attempt is made (up to 3x the requested number), or kept with success=false
(`keep_failed`). Each frame holds the cameras' views rendered before the action, the state (the 39-D
observation) and the executed 4-D action; each episode its task's instruction and `success`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wam.platform.errors import UserError
from wam.trainer.data.synth_dataset import DatasetSpec, Episode, SynthOptions, write_dataset
from wam.trainer.sim import metaworld_suite as mw

SUITES = (mw.SUITE,)
DEFAULT_CAMERAS = ("corner", "gripperPOV")


@dataclass
class RecordOptions:
    tasks: list[str]
    episodes: int = 10  # kept episodes per task
    suite: str = mw.SUITE
    seed: int = 0
    action_noise: float = 0.0
    cameras: list[str] = field(default_factory=lambda: list(DEFAULT_CAMERAS))
    height: int = 128
    width: int = 128
    max_steps: int | None = None  # default: the task's own limit (500)
    after_success: int = 0  # steps recorded after the first success
    keep_failed: bool = False
    codec: str = "h264"


@dataclass
class TaskSummary:
    task: str
    instruction: str
    attempts: int = 0
    kept: int = 0
    successes: int = 0
    lengths: list[int] = field(default_factory=list)


def check(options: RecordOptions) -> None:
    """Every input checked before anything is simulated or rendered."""
    if options.suite not in SUITES:
        raise UserError(f"unknown simulation suite {options.suite!r}; available: {', '.join(SUITES)}")
    if not options.tasks:
        raise UserError("name at least one task (--tasks)")
    if options.episodes < 1:
        raise UserError(f"--episodes must be at least 1, got {options.episodes}")
    if options.max_steps is not None and options.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {options.max_steps}")
    if options.after_success < 0:
        raise UserError(f"--after-success is a number of steps, got {options.after_success}")
    if options.action_noise < 0:
        raise UserError(f"--action-noise is a standard deviation, got {options.action_noise}")
    if options.height % 2 or options.width % 2 or min(options.height, options.width) < 16:
        raise UserError(f"--height and --width must be even and at least 16 (H.264), got {options.height}x{options.width}")
    if not options.cameras:
        raise UserError("name at least one camera (--cameras)")
    mw.check_cameras(options.cameras)
    mw.check_tasks(options.tasks)


def record(out: str | Path, options: RecordOptions, progress=None) -> list[TaskSummary]:
    """Record the demonstrations, write them to `out` (a new or empty folder) and summarise them per task."""
    check(options)
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} is not empty")
    episodes: list[Episode] = []
    task_ids: dict[str, int] = {}
    summaries = []
    for task_number, task in enumerate(options.tasks):
        text = mw.instruction(task)
        task_ids.setdefault(text, len(task_ids))
        summary = TaskSummary(task, text)
        env = mw.MetaWorldTask(task, tuple(options.cameras), options.height, options.width)
        try:
            limit = min(options.max_steps or env.max_steps, env.max_steps)
            while summary.kept < options.episodes and summary.attempts < 3 * options.episodes:
                seed = mw.episode_seed(options.seed, task_number, summary.attempts)
                episode, success = _rollout(env, seed, limit, options, task_ids[text], text)
                summary.attempts += 1
                summary.successes += success
                if success or options.keep_failed:
                    episode.meta = {"success": success, "sim_task": task, "seed": seed}
                    episodes.append(episode)
                    summary.kept += 1
                    summary.lengths.append(len(episode.state))
                if progress:
                    progress(task, summary)
        finally:
            env.close()
        summaries.append(summary)
    if not episodes:
        raise UserError("no episode succeeded, nothing to write (--keep-failed keeps failed ones)")
    spec = DatasetSpec(cameras=tuple(f"observation.images.{c}" for c in options.cameras), fps=mw.FPS,
                       state_names=mw.STATE_NAMES, action_names=mw.ACTION_NAMES, robot_type="metaworld_sawyer")
    write_dataset(root, episodes, task_ids, SynthOptions(version="v3.0", codec=options.codec, height=options.height,
                                                         width=options.width, episodes_per_file=50), spec)
    return summaries


def _rollout(env: mw.MetaWorldTask, seed: int, limit: int, options: RecordOptions, task_index: int,
             text: str) -> tuple[Episode, bool]:
    rng = np.random.default_rng(seed)
    obs = env.reset(seed)
    views: dict[str, list[np.ndarray]] = {c: [] for c in env.cameras}
    states, actions, success, noise = [], [], False, options.action_noise
    succeeded_at = None
    for step in range(limit):
        for camera, view in env.render().items():
            views[camera].append(view)
        action = np.clip(env.expert_action(obs), -1.0, 1.0)  # what the env executes
        if noise:
            action = np.clip(action + rng.normal(0.0, noise, action.shape), -1.0, 1.0).astype(np.float32)
        states.append(obs)
        actions.append(action)
        obs, succeeded, _ = env.step(action)
        if succeeded and succeeded_at is None:
            succeeded_at, success = step, True
        if succeeded_at is not None and step - succeeded_at >= options.after_success:
            break
    n = len(states)
    frames = {f"observation.images.{c}": np.stack(v) for c, v in views.items()}
    return Episode(frames, np.stack(states), np.stack(actions), np.full(n, task_index, dtype=np.int64), [text]), success
