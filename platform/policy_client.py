"""Robot-side helpers over the public `openpi-client`: timed calls, and asynchronous chunk execution.

Synchronous: execute chunk k, send its frames, wait for chunk k+1. Asynchronous: while the robot executes
chunk k, chunk k+1 is already being computed (the request carries no frames; the server stands in chunk
k's predicted video until its real frames come with the following request). Each step records the round
trip and the server's compute and queue time, and whether the next chunk was ready before the current one
finished: the deadline a robot loop must meet.

A server that shuts down (a model rollout, a scale-down) answers the request in flight and closes the session with
code 1001 (going away); the client then reconnects to the same address (the Service: another replica, or the new
one) for up to `reconnect_s` and sends the request again there, as the first of a new session and context window
(a request without frames carries the newest frames this client sent).

A server at capacity closes a new connection with code 1013 (try again later). With `capacity_wait_s` the client
tries again (backing off up to 5 s) until a session is free, here or on another replica behind the same address,
instead of failing: a fleet's robots queue for a slot. After a server went away, a full one is tried again for
`reconnect_s` (the robots of the old replica all reconnect at once).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wam.platform.errors import UserError

if TYPE_CHECKING:  # wam.platform imports without numpy; the arrays come from openpi-client
    import numpy as np

Observation = dict  # camera frames, state, prompt (see the server's metadata for the keys)
GOING_AWAY = 1001  # the close code of a server that shuts down (RFC 6455)
TRY_AGAIN_LATER = 1013  # ... and of a server at capacity
# the policy's API key, where the server requires one: the server's and the client's environment variable; robots
# send it as openpi-client's api_key does (the header `Authorization: Api-Key <key>`)
API_KEY_ENV = "WAM_POLICY_API_KEY"

log = logging.getLogger("wam.client")


@dataclass
class ChunkResult:
    actions: np.ndarray  # (actions_per_chunk, dims)
    round_trip_ms: float
    server_timing: dict  # infer_ms, queue_ms, encode_ms, denoise_ms
    budget_ms: float  # how long the robot takes to execute one chunk
    new_window: bool
    predicted_video: np.ndarray | None = None  # (frames, H, W, 3) uint8, when the request asked for it
    reconnected: bool = False  # the server went away; a new session (and window) answered the request

    @property
    def met_deadline(self) -> bool:
        return self.round_trip_ms <= self.budget_ms


class PolicyClient:
    def __init__(self, uri: str, control_hz: float | None = None, reconnect_s: float = 120.0,
                 api_key: str | None = None, capacity_wait_s: float = 0.0):
        """control_hz: the robot's control rate, which sets a chunk's deadline (default: the server's, the rate its
        model's robot data was recorded at); api_key: the server's, where it requires one (default:
        $WAM_POLICY_API_KEY); capacity_wait_s: how long to keep trying a server at capacity (0: fail at once)."""
        self.uri, self.reconnect_s = uri, reconnect_s
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or None
        self.policy = self._connect(time.monotonic() + capacity_wait_s)
        self.metadata = self.policy.get_server_metadata()
        if "needs_wrist_camera" in self.metadata:  # RoboArena's PolicyServerConfig, not a wam server's metadata
            self.policy._ws.close()
            raise UserError(f"the policy server at {uri} speaks RoboArena's protocol (serving.protocol: roboarena), "
                            "for RoboArena's DROID evaluation client; this client speaks openpi's: serve the model with "
                            "--protocol openpi for it")
        self.control_hz = control_hz or self.metadata.get("control_hz")
        if not self.control_hz:
            self.policy._ws.close()
            raise UserError(f"the policy server at {uri} does not know its robots' control rate (a model trained "
                            "without robot data, or quantized before policy.json recorded it): give the control rate "
                            "(wam client --control-hz)")
        self.budget_ms = 1000 * self.metadata["actions_per_chunk"] / self.control_hz
        self._frames: Observation = {}  # the cameras' frames of the newest request that had them
        self._pool = ThreadPoolExecutor(max_workers=1)

    def infer(self, obs: Observation) -> ChunkResult:
        start = time.perf_counter()
        cameras = self.metadata["cameras"]
        if all(c in obs for c in cameras):
            self._frames = {c: obs[c] for c in cameras}
        reply = self._call(lambda: self.policy.infer(obs))
        reconnected = reply is None
        if reconnected:  # on a new session, a request without frames carries the newest this client sent
            reply = self.policy.infer({**self._frames, **obs})
        return ChunkResult(reply["actions"], (time.perf_counter() - start) * 1000, reply["server_timing"],
                           self.budget_ms, reply["new_window"], reply.get("predicted_video"), reconnected)

    def _call(self, request: Callable[[], dict]) -> dict | None:
        """`request()`'s reply; None where the server went away instead (then connected anew)."""
        from websockets.exceptions import ConnectionClosed

        try:
            return request()
        except ConnectionClosed as err:
            if _close_code(err) != GOING_AWAY:
                raise
            log.warning("the policy server went away (%s); reconnecting to %s", err.rcvd.reason, self.uri)
        self._reconnect()
        return None

    def _connect(self, deadline: float, *, went_away: bool = False):
        """An openpi-client session at `uri`. A server at capacity is tried again until `deadline`, backing off up
        to 5 s; with `went_away` (the last server shut down) so are a refused connection and a draining server."""
        from openpi_client.websocket_client_policy import WebsocketClientPolicy
        from websockets.exceptions import ConnectionClosed

        pause = 0.5
        while True:
            try:
                return WebsocketClientPolicy(self.uri, api_key=self.api_key)
            except (OSError, ConnectionClosed) as err:
                code = _close_code(err) if isinstance(err, ConnectionClosed) else None
                full = code == TRY_AGAIN_LATER
                if not (full or went_away and (code == GOING_AWAY or isinstance(err, OSError))):
                    raise  # e.g. an API key refused: what the caller must see
                if time.monotonic() > deadline:
                    if full:
                        raise  # still at capacity: openpi-client's error, with the server's reason
                    raise ConnectionError(f"the policy server at {self.uri} went away and none took its place "
                                          f"within {self.reconnect_s:g} s: {err}") from err
                if full:
                    log.info("the policy server at %s is at capacity; trying again in %.1f s", self.uri, pause)
            time.sleep(pause)
            pause = min(2 * pause, 5.0)

    def _reconnect(self) -> None:
        """A new session at `uri` after the last server went away, trying until one serves (a refused, draining or
        full server: again) or reconnect_s has passed."""
        self.policy = self._connect(time.monotonic() + self.reconnect_s, went_away=True)

    def submit(self, obs: Observation) -> Future[ChunkResult]:
        return self._pool.submit(self.infer, obs)

    def reset(self) -> None:
        """Drop the session's context on the server (openpi-client's own reset is local only); a server gone away
        is connected anew, which starts afresh."""
        self._call(lambda: self.policy.infer({"reset": True}))

    def close(self) -> None:
        self._pool.shutdown()
        self.policy._ws.close()


def _close_code(err) -> int | None:
    """The close code a websockets ConnectionClosed received from the server (None: none was received)."""
    return None if err.rcvd is None else err.rcvd.code


def without_frames(obs: Observation, cameras: list[str]) -> Observation:
    return {k: v for k, v in obs.items() if k not in cameras}


def run_sync(client: PolicyClient, first: Observation, execute: Callable[[np.ndarray], Observation],
             chunks: int) -> Iterator[ChunkResult]:
    """Act, execute, send what was seen, repeat. `execute(actions)` runs a chunk on the robot and returns the
    observation after it (the chunk's frames, the current state, the prompt)."""
    result = client.infer(first)
    for _ in range(chunks - 1):
        yield result
        result = client.infer(execute(result.actions))
    yield result


def run_async(client: PolicyClient, first: Observation, execute: Callable[[np.ndarray], Observation],
              chunks: int) -> Iterator[ChunkResult]:
    """Execute chunk k while chunk k+1 is computed. A result whose `met_deadline` is False arrived after the
    robot had finished the chunk before it (the loop then waits)."""
    cameras = client.metadata["cameras"]
    current = client.infer(first)
    ahead = client.submit(without_frames(first, cameras)) if chunks > 1 else None
    for k in range(chunks):
        yield current
        if ahead is None:
            return
        seen = execute(current.actions)  # the robot moves while `ahead` is computed
        current = ahead.result()
        ahead = client.submit(seen) if k + 2 < chunks else None
