"""`wam eval --sim`: closed-loop episodes in simulation against a served policy, as a real robot runs them.

Each environment worker (a process: MuJoCo and its renderer are per process) connects to `wam serve` through
the public openpi-client, one session per worker, and plays episodes: the first request carries the cameras'
views, the state and the instruction; the robot executes the returned chunk; the next request carries the
frames it saw meanwhile (every `frame_stride`-th control step: what the session writes into its KV cache in
place of the predicted ones) and the state after it. With `asynchronous`, the next chunk is computed while the
current one executes (the request carries no frames; they follow with the request after). An episode ends at
its first successful step or at the step limit; its task progress is how much of the distance to the goal at
reset was covered (1 on success). A server that drops mid-episode fails that episode with the reason; the
worker reconnects for the next one.

Each episode is fixed by its seed (positions drawn by the environment's reset) and the server's session reset
(the same noise as a new connection), so a run is deterministic for a seed on CPU whatever the worker count.
"""

from __future__ import annotations

import multiprocessing
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from wam.platform.errors import UserError
from wam.trainer.sim import metaworld_suite as mw

SUITES = (mw.SUITE,)
EVAL_KEY = 1  # episode seeds are drawn with this key too: never the positions `wam sim record` trained on
POLICY_ROW, EXPERT_ROW, UNTRAINED_ROW = "policy", "expert", "untrained"  # the rows of a report


@dataclass
class SimOptions:
    tasks: list[str]
    episodes: int = 10  # per task
    suite: str = mw.SUITE
    seed: int = 0
    asynchronous: bool = False
    workers: int = 2  # environment processes, each one session of the server
    max_steps: int | None = None  # default: the task's own limit (500)
    height: int = 128  # rendered views (render at the size the demonstrations were recorded at)
    width: int = 128
    videos: int = 1  # episodes per task kept as MP4 (the cameras next to the predicted video)

    def check(self) -> None:
        """Every input checked before a server starts or an environment is built."""
        if self.suite not in SUITES:
            raise UserError(f"unknown simulation suite {self.suite!r}; available: {', '.join(SUITES)}")
        if not self.tasks:
            raise UserError("name at least one task (--tasks)")
        for name, value, low in (("--episodes", self.episodes, 1), ("--workers", self.workers, 1),
                                 ("--videos", self.videos, 0), ("--max-steps", self.max_steps or 1, 1)):
            if value < low:
                raise UserError(f"{name} must be at least {low}, got {value}")
        if min(self.height, self.width) < 16 or self.height % 2 or self.width % 2:
            raise UserError(f"--height and --width must be even and at least 16, got {self.height}x{self.width}")
        mw.check_tasks(self.tasks)


@dataclass
class EpisodeResult:
    task: str
    episode: int
    seed: int
    success: bool = False
    progress: float = 0.0  # share of the distance to the goal at reset covered (1 on success)
    steps: int = 0
    chunk_ms: list[float] = field(default_factory=list)  # round trip of each chunk
    error: str = ""  # why the episode could not finish (a server that dropped, a refused request)
    video: list[tuple[dict[str, np.ndarray], np.ndarray | None]] | None = None  # per chunk: real frames, predicted


@dataclass
class _Episode:
    task: str
    task_number: int
    episode: int
    video: bool


def episodes_of(options: SimOptions) -> list[_Episode]:
    return [_Episode(task, n, i, i < options.videos) for n, task in enumerate(options.tasks)
            for i in range(options.episodes)]


# -- one worker process -----------------------------------------------------------------------------------

_worker: dict = {}  # the process's environments by task and its policy client


def _start_worker(uri: str | None, options: SimOptions) -> None:
    _worker.update(uri=uri, options=options, envs={}, client=None)


def _env(task: str, cameras: tuple[str, ...]) -> mw.MetaWorldTask:
    options = _worker["options"]
    if task not in _worker["envs"]:
        _worker["envs"][task] = mw.MetaWorldTask(task, cameras, options.height, options.width)
    return _worker["envs"][task]


def _client():
    from wam.platform.policy_client import PolicyClient

    if _worker["client"] is None:
        client = PolicyClient(_worker["uri"], control_hz=mw.FPS)
        cameras = [key.rsplit(".", 1)[-1] for key in client.metadata["cameras"]]
        if set(cameras) - set(mw.CAMERAS) or len(client.metadata["state_keys"]) != 1:
            client.close()
            raise UserError(f"the server serves embodiment {client.metadata['embodiment']!r} (cameras "
                            f"{client.metadata['cameras']}); --sim {mw.SUITE} needs a model trained on the "
                            f"{mw.SUITE} profile (`wam sim record` data)")
        _worker["client"] = client
    return _worker["client"]


def _drop_client() -> None:
    client, _worker["client"] = _worker["client"], None
    if client is not None:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - the connection is already gone
            pass


def _run_episode(job: _Episode) -> EpisodeResult:
    options: SimOptions = _worker["options"]
    seed = mw.episode_seed(options.seed, job.task_number, job.episode, EVAL_KEY)
    result = EpisodeResult(job.task, job.episode, seed, video=[] if job.video else None)
    if _worker["uri"] is None:
        env = _env(job.task, tuple(mw.CAMERAS[:1]))
        _expert_episode(env, result, options)
        return result
    try:
        client = _client()
        env = _env(job.task, tuple(key.rsplit(".", 1)[-1] for key in client.metadata["cameras"]))
        client.reset()
        _policy_episode(client, env, result, options)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the episode fails with its reason; the evaluation goes on
        result.error = f"{type(err).__name__}: {err}"[:300]
        result.success = False
        _drop_client()
    return result


def _limit(env: mw.MetaWorldTask, options: SimOptions) -> int:
    return min(options.max_steps or env.max_steps, env.max_steps)


def _expert_episode(env: mw.MetaWorldTask, result: EpisodeResult, options: SimOptions) -> None:
    obs = env.reset(result.seed)
    start = env.distance(obs)
    distance = start
    for _ in range(_limit(env, options)):
        obs, result.success, distance = env.step(np.clip(env.expert_action(obs), -1.0, 1.0))
        result.steps += 1
        if result.success:
            break
    result.progress = _progress(result.success, start, distance)


def _progress(success: bool, start: float, end: float) -> float:
    return 1.0 if success or start <= 0 else float(np.clip(1.0 - end / start, 0.0, 1.0))


def _policy_episode(client, env: mw.MetaWorldTask, result: EpisodeResult, options: SimOptions) -> None:
    meta = client.metadata
    keys = {camera: key for key, camera in zip(meta["cameras"], env.cameras, strict=True)}
    state_key, stride, prompt = meta["state_keys"][0], meta["frame_stride"], mw.instruction(result.task)
    want_video = result.video is not None
    obs = env.reset(result.seed)
    start = distance = env.distance(obs)
    limit = _limit(env, options)

    def request(views: dict[str, np.ndarray], state: np.ndarray, with_frames: bool = True) -> dict:
        frames = {keys[c]: v for c, v in views.items()} if with_frames else {}
        return {**frames, state_key: state, "prompt": prompt, "return_video": want_video}

    def execute(actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Run a chunk; the frames seen every `stride` steps and the state after it."""
        nonlocal obs, distance
        seen: dict[str, list[np.ndarray]] = {c: [] for c in env.cameras}
        for action in actions:
            obs, result.success, distance = env.step(np.clip(action, -1.0, 1.0))
            result.steps += 1
            if result.steps % stride == 0:
                for camera, view in env.render().items():
                    seen[camera].append(view)
            if result.success or result.steps >= limit:
                break
        return {c: np.stack(v) for c, v in seen.items() if v}, obs

    first = request(env.render(), obs)
    current = client.infer(first)
    ahead = client.submit(request({}, obs, with_frames=False)) if options.asynchronous else None
    try:
        while True:
            result.chunk_ms.append(current.round_trip_ms)
            views, state = execute(current.actions)
            if want_video:
                result.video.append((views, current.predicted_video))
            if result.success or result.steps >= limit:
                break
            if ahead is None:  # synchronous: the frames of the executed chunk come with the next request
                current = client.infer(request(views, state))
            else:  # the chunk computed meanwhile is executed next; its frames follow with the one after
                current = ahead.result()
                ahead = client.submit(request(views, state))
    finally:  # also when the server fails the episode: how far it got counts
        result.progress = _progress(result.success, start, distance)
        if ahead is not None:  # the session's socket is free again before the next episode resets it
            ahead.exception()


# -- the run ----------------------------------------------------------------------------------------------

def run_episodes(uri: str | None, options: SimOptions,
                 progress: Callable[[EpisodeResult], None] | None = None) -> list[EpisodeResult]:
    """Every task's episodes against the server at `uri` (None: the tasks' scripted experts), in `workers`
    processes; results in task and episode order."""
    jobs = episodes_of(options)
    workers = min(options.workers, len(jobs))
    results: list[EpisodeResult] = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(uri, options)) as pool:
        for result in pool.map(_run_episode, jobs):  # in submission order
            results.append(result)
            if progress:
                progress(result)
    return results


def summarize(results: list[EpisodeResult]) -> dict:
    """Per task and overall: success rate, task progress, episode length, per-chunk latency, failures."""
    def stats(rows: list[EpisodeResult]) -> dict:
        latencies = sorted(ms for r in rows for ms in r.chunk_ms)
        return {"episodes": len(rows), "success_rate": sum(r.success for r in rows) / len(rows),
                "progress": statistics.fmean(r.progress for r in rows),
                "episode_length": statistics.fmean(r.steps for r in rows),
                "chunk_ms_p50": _quantile(latencies, 0.5), "chunk_ms_p99": _quantile(latencies, 0.99),
                "errors": sum(bool(r.error) for r in rows)}

    tasks = list(dict.fromkeys(r.task for r in results))
    return {"overall": stats(results), "tasks": {t: stats([r for r in results if r.task == t]) for t in tasks},
            "episodes": [{k: v for k, v in asdict(r).items() if k not in ("video", "chunk_ms")} for r in results]}


def _quantile(values: list[float], q: float) -> float | None:
    return None if not values else float(np.quantile(values, q))
