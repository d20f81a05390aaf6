"""Continuous batching: one thread denoises the chunks of every session in flight, a step at a time, together.

A session's request becomes a ChunkJob (its noise, solvers and DiT step cache), after the frames its robot saw are
written into its KV cache: those writes (observe) also run on the engine's thread, up to `max_batch` sessions' in
one forward, before the next step (so robots' threads do not contend with the engine for the host, and a small
model's prefill is not one forward per robot). The engine's thread takes up to
`max_batch` jobs, oldest first, and runs each denoising step of all of them as one forward (predict_many:
sessions at different chunks, their KV caches padded to one length, a mask per row). A job that arrives joins
at the next step; a finished one leaves at once and the oldest waiting job takes its place, so no session waits
for a whole batch to drain. Compiled, the forward runs under torch.compile (CUDA graphs on CUDA), warmed up for
every batch size and chunk position it will see, sessions at one chunk and at different chunks, before the engine
reports ready; the warm-up's sessions are then let go.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from wam.trainer.guidance_peer import PeerLost
from wam.trainer.inference import Chunk, ChunkJob, ChunkRollout, Denoiser, advance_jobs
from wam.trainer.model.model import Observation

log = logging.getLogger("wam.serve")
_STARTED: weakref.WeakSet[DenoiseEngine] = weakref.WeakSet()  # their threads hold them while they run


@atexit.register
def _stop_started_engines() -> None:
    """A process that exits while an engine's thread runs torch's native code aborts ("terminate called without an
    active exception"): a script or server that ends without stopping its engine would, mid warm-up or mid chunk."""
    for engine in list(_STARTED):
        engine.stop()


class EngineUnavailable(RuntimeError):
    """The engine cannot denoise (its warm-up failed, or its guidance peer is gone); the message says why."""


@dataclass
class _Observing:
    observations: list[Observation]
    start: Callable[[], ChunkJob] | None = None  # the chunk to denoise once they are written
    submitted: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)


@dataclass
class _Entry:
    job: ChunkJob
    submitted: float
    future: Future = field(default_factory=Future)


class DenoiseEngine:
    def __init__(self, denoiser: Denoiser, max_batch: int, cpu_threads: int | None = None):
        """cpu_threads (an engine on the CPU): torch's intra-op threads; None: measured in the engine's thread before
        it reports ready, at the warm-up rollout's forward (the faster of one thread and torch's default: every core,
        or OMP_NUM_THREADS)."""
        self.denoiser, self.max_batch, self.cpu_threads = denoiser, max_batch, cpu_threads
        self._default_threads = torch.get_num_threads()
        self.thread_timings_ms: dict[int, float] = {}  # a forward's time at each thread count tried (measured)
        self.ready = threading.Event()
        self.failure: str | None = None  # why the engine cannot serve, once it cannot
        self.forwards = 0  # batched forwards run, and the chunks they served (their mean batch)
        self.chunk_steps = 0
        self.observe_forwards = 0  # batched observes run
        # the engine thread's own time in forwards and in the sessions' solver steps (host time: on a GPU it is
        # launching, not the kernels; where launches bound a small model, it is where the time goes)
        self.forward_s = self.solver_s = 0.0
        self.observe_s = 0.0  # ... and in the sessions' batched observes
        self._waiting: deque[_Entry] = deque()
        self._observing: deque[_Observing] = deque()
        self._wake = threading.Condition()
        self._warmups: tuple[ChunkRollout | None, ChunkRollout | None] = (None, None)
        self._thread: threading.Thread | None = None

    def start(self, warmup: ChunkRollout | None = None, behind: ChunkRollout | None = None) -> None:
        """Start the engine's thread; with `warmup` (a rollout with a first frame) it first chooses its CPU threads
        (on the CPU) and, compiled, runs one step at every batch size up to max_batch and chunk position (compiling
        each), and only then sets `ready`. `behind`: a second such rollout, left at its first chunk, so that batches
        of sessions at different chunks (keys padded, the dense mask: other compiled graphs) are compiled then too,
        not while robots wait."""
        self._warmups = (warmup, behind)  # let go once warmed up, so their KV caches are freed
        self._thread = threading.Thread(target=self._loop, daemon=True, name="wam-engine")
        self._thread.start()
        _STARTED.add(self)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop serving (as `fail`) and wait up to timeout_s for the engine's thread to end; a warm-up stops at its
        next forward. (At exit, engines not stopped are stopped.)"""
        self.fail("the server is shutting down")
        if self._thread is not None:
            self._thread.join(timeout_s)

    def fail(self, reason: str) -> None:
        """Stop serving: waiting and later chunks fail with `reason`."""
        with self._wake:
            self.failure = reason
            waiting, self._waiting = [*self._waiting, *self._observing], deque()
            self._observing = deque()
            self._wake.notify()  # an idle engine thread ends
        for entry in waiting:
            entry.future.set_exception(EngineUnavailable(reason))

    def submit(self, job: ChunkJob) -> Future:
        """Queue `job`; its future resolves to its Chunk once denoised together with the other sessions' jobs."""
        return self._queue(self._waiting, _Entry(job, time.perf_counter()))

    def run(self, job: ChunkJob) -> Chunk:
        """Denoise `job` (blocks the calling session)."""
        return self.submit(job).result()

    def observe(self, observations: list[Observation]) -> None:
        """Write a session's `observations` (ChunkRollout.observations) into its caches on the engine's thread,
        batched with other sessions' (blocks the calling session until written)."""
        if observations:
            self._queue(self._observing, _Observing(observations)).result()

    def act(self, observations: list[Observation], start: Callable[[], ChunkJob]) -> Chunk:
        """Write a session's `observations` (none: run `start()` at once) and then denoise the chunk `start()`
        begins, made on the engine's thread once they are written: one request, so the chunk joins the step
        right after the write (as two, the engine would run a step while the session hands in its chunk)."""
        if not observations:
            return self.run(start())
        return self._queue(self._observing, _Observing(observations, start)).result()

    def _queue(self, queue: deque, entry: _Entry | _Observing) -> Future:
        """Put `entry` on `queue` (chunks or frames waiting for the engine) and wake the engine; its future."""
        with self._wake:
            if self.failure:
                raise EngineUnavailable(self.failure)
            queue.append(entry)
            self._wake.notify()
        return entry.future

    def _warm(self, rollout: ChunkRollout, behind: ChunkRollout | None) -> None:
        """One forward at each row count and chunk position the denoiser will see (the rollout observes blank
        chunks to reach each position), each also batched with a chunk of `behind` (at the first chunk):
        compiling happens here, not for the first robot."""
        device = rollout.model.patch_embedding.weight.device
        state = torch.zeros(1, rollout.model.arch.state_dim, device=device)
        batches = sorted({min(self.max_batch, 1 << i) for i in range(self.max_batch.bit_length() + 1)})
        lagging = behind.start(state).passes if behind is not None else []
        started = time.perf_counter()
        while not self.failure:  # (stopped)
            job = rollout.start(state)
            for chunks in batches:
                self.denoiser(job.passes * chunks)
                if lagging and chunks > 1 and rollout.next_chunk > 0:  # sessions at different chunks
                    self.denoiser(lagging + job.passes * (chunks - 1))
            if rollout.next_chunk + 1 >= rollout.max_chunks:
                break
            rollout.observe(torch.zeros_like(job.video[:1]))
        log.info("engine warmed up for batches of up to %d chunks at %d chunk positions%s in %.1f s", self.max_batch,
                 rollout.max_chunks, " (sessions at one and at different chunks)" if lagging else "",
                 time.perf_counter() - started)

    def _choose_threads(self, rollout: ChunkRollout | None, repeats: int = 5) -> None:
        """Set torch's intra-op threads for this thread and those the sessions start later: cpu_threads, or the
        faster at `rollout`'s forward (eager: compiled code keeps the count it is compiled with) of one thread and
        torch's default. Where several threads run torch's ops, as a server's do, OpenMP stops its idle workers from
        spinning and each small op waits for them to wake: a small model's forward in the engine's thread can take
        several times as long with 2 threads as with 1 (benchmarks/serve.py --threads-choice)."""
        if self.cpu_threads is None and rollout is not None:
            job, eager = rollout.start(torch.zeros(1, rollout.model.arch.state_dim)), Denoiser(rollout.model)
            for threads in sorted({1, self._default_threads}):
                torch.set_num_threads(threads)
                times = []
                for _ in range(repeats + 1):  # the first warms up
                    if self.failure:  # stopped
                        return
                    started = time.perf_counter()
                    eager(job.passes)  # a guidance peer's passes too
                    times.append(time.perf_counter() - started)
                self.thread_timings_ms[threads] = 1000 * sorted(times[1:])[repeats // 2]
            self.cpu_threads = min(self.thread_timings_ms, key=self.thread_timings_ms.get)
            log.info("the engine runs on %d CPU thread(s): a forward takes %s", self.cpu_threads, ", ".join(
                f"{ms:.1f} ms at {n}" for n, ms in self.thread_timings_ms.items()))
        if self.cpu_threads is not None:
            torch.set_num_threads(self.cpu_threads)

    def _loop(self) -> None:
        (warmup, behind), self._warmups = self._warmups, (None, None)
        try:
            if self.denoiser.model.patch_embedding.weight.device.type == "cpu":
                self._choose_threads(warmup)
            if warmup is not None and self.denoiser.compiled and not self.failure:
                self._warm(warmup, behind)
            del warmup, behind
        except Exception as err:  # noqa: BLE001 - the server reports it unready with this reason
            log.exception("engine warm-up failed")
            self.fail(f"the engine's warm-up failed: {type(err).__name__}: {err}")
            return
        self.ready.set()
        active: list[_Entry] = []
        while True:
            with self._wake:
                while not active and not self._waiting and not self._observing and not self.failure:
                    self._wake.wait()
                if self.failure:
                    reason = self.failure
                    break
                observing = [self._observing.popleft() for _ in range(min(self.max_batch, len(self._observing)))]
            if observing:  # first: each lets a robot's next chunk join the batch
                started = time.perf_counter()
                self._write(observing)
                self.observe_s += time.perf_counter() - started
            with self._wake:
                while len(active) < self.max_batch and self._waiting:  # oldest first
                    entry = self._waiting.popleft()
                    entry.job.queue_s = time.perf_counter() - entry.submitted
                    active.append(entry)
            if active:
                active = self._step(active)
        for entry in active:
            entry.future.set_exception(EngineUnavailable(reason))

    def _write(self, batch: list[_Observing]) -> None:
        """Every session's observations in `batch` in one forward; if that fails, each session's alone, so that
        only its own error reaches a session (nothing is written before every observation is checked)."""
        try:
            self.denoiser.model.observe_many([item for entry in batch for item in entry.observations])
            self.observe_forwards += 1
        except Exception as err:  # noqa: BLE001 - the sessions get the error, the engine goes on
            if len(batch) == 1:
                batch[0].future.set_exception(err)
                return
            for entry in batch:
                self._write([entry])
            return
        for entry in batch:
            if entry.start is None:
                entry.future.set_result(None)
                continue
            try:
                job = entry.start()
            except Exception as err:  # noqa: BLE001 - the session gets the error
                entry.future.set_exception(err)
                continue
            with self._wake:  # in the order of submission among the waiting chunks
                if self.failure:  # failed while writing: nothing will take it from the queue
                    entry.future.set_exception(EngineUnavailable(self.failure))
                    continue
                at = next((i for i, waiting in enumerate(self._waiting) if waiting.submitted > entry.submitted),
                          len(self._waiting))
                self._waiting.insert(at, _Entry(job, entry.submitted, entry.future))

    def _step(self, active: list[_Entry]) -> list[_Entry]:
        """One denoising step of every active job in one forward; returns the jobs still denoising."""
        started = time.perf_counter()
        try:
            outputs = self.denoiser([item for entry in active for item in entry.job.passes])
        except Exception as err:  # noqa: BLE001 - the sessions of this batch get the error, the engine goes on
            for entry in active:
                entry.future.set_exception(err)
            if isinstance(err, PeerLost):  # ... unless guidance cannot run any more
                self.fail(str(err))
            return []
        self.forwards += bool(outputs)
        self.chunk_steps += len(active) if outputs else 0
        solving = time.perf_counter()
        self.forward_s += solving - started
        jobs, per_job, start = [entry.job for entry in active], [], 0
        for job in jobs:
            job.batch = max(job.batch, len(active))
            per_job.append(outputs[start:start + len(job.passes)])
            start += len(job.passes)
        advance_jobs(jobs, per_job)  # every session's solver step in one go
        # steps the DiT cache skips need no forward: take them now, so sessions out of phase still meet in every
        # forward (and a chunk ends sooner)
        while skipping := [job for job in jobs if job.passes == [] and not job.done]:
            advance_jobs(skipping, [[] for _ in skipping])
        remaining = []
        for entry in active:
            if entry.job.done:
                entry.future.set_result(entry.job.chunk())
            else:
                remaining.append(entry)
        self.solver_s += time.perf_counter() - solving
        return remaining

