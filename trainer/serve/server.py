"""The websocket policy server, wire-compatible with openpi (the `openpi-client` package works unchanged).

Protocol: a robot connects at / or at /<embodiment> (a model trained on several robots serves each at its own
path; / is serving.embodiment's), and the server sends its metadata (msgpack) for that embodiment; a path no
embodiment is served at is refused with HTTP 404 naming those that are. Each binary msgpack-numpy request is one
`infer` (or `{"reset": true}`) and gets one binary reply. A bad request gets a text frame saying what is
wrong (openpi-client raises it as an error) and the session stays open; other sessions never notice. A chunk the
safety envelope refuses (non-finite actions) gets an error frame too, and its session starts over. A full
server closes a new connection at once with code 1013 and the reason (openpi-client raises it on connect); a
session idle for `serving.idle_timeout_s` is closed; a request larger than `serving.max_request_mb` closes its
connection with code 1009 as soon as its size is known, before its bytes are buffered.
On SIGTERM (Kubernetes replacing or scaling down the pod) the server drains: /readyz turns unready, a new
connection is closed at once, each session's request in flight is answered, and every session is then closed with
code 1001 (going away) and a reason, so that its robot reconnects elsewhere (PolicyClient does so on its own); after
`serving.drain_timeout_s` the rest are closed anyway, and the process exits 0.
Each session's request runs in its own worker thread (encoding, the KV cache's prefill); the denoising of
every session's chunk goes through the runtime's engine, which batches the sessions' steps into shared
forwards, oldest first (wam.trainer.serve.engine). Each reply reports its queue and compute time and how many
chunks were denoised together. Plain HTTP on the same port: /healthz (alive), /readyz (model loaded, the
engine warmed up and able to serve, a session slot free, not draining), /metrics (Prometheus).
`serving.protocol: roboarena` speaks RoboArena's variant of the protocol instead (wam.trainer.serve.roboarena).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http import HTTPStatus
from urllib.parse import urlparse

from openpi_client import msgpack_numpy
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from wam.platform.config import PROTOCOLS
from wam.platform.errors import ConfigError
from wam.platform.launch import LISTEN_ERRNOS, listen_error
from wam.platform.policy_client import API_KEY_ENV, GOING_AWAY
from wam.trainer.guidance_peer import PeerLost
from wam.trainer.serve.embodiments import ServedEmbodiment
from wam.trainer.serve.engine import EngineUnavailable
from wam.trainer.serve.policy import RESET_KEY, PolicyRuntime, RequestError, Session
from wam.trainer.serve.recorder import Recorder
from wam.trainer.serve.roboarena import RESET_REPLY, ROBOARENA, endpoint_of, server_config
from wam.trainer.serve.safety import UnsafeOutput

log = logging.getLogger("wam.serve")
# the reason a draining server gives its sessions as it closes them (GOING_AWAY), and a session whose request was
# still running at serving.drain_timeout_s (a close frame's reason is at most 123 bytes: RFC 6455, 5.5)
DRAINING = "server shutting down: reconnect (a new connection goes to a serving replica)"
CUT_OFF = "server shutting down: reconnect; the request was not answered within serving.drain_timeout_s = {:g} s"
# why a request was answered with an error (wam_policy_errors_total{reason}); capacity and unauthorized: a
# connection refused before its session opened
ERROR_REASONS = ("bad_request", "unavailable", "unsafe_output", "internal", "capacity", "unauthorized")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class _Metrics:
    def __init__(self, runtime: PolicyRuntime):
        self.registry = CollectorRegistry()
        # a bucket ends at each embodiment's chunk duration, so that a p99 above it means more than 1% of its chunks
        # came late
        chunks = {e.chunk_seconds for e in runtime.embodiments.values() if e.chunk_seconds is not None}
        self.latency = Histogram("wam_policy_request_seconds", "Request latency: queue + inference", ["embodiment"],
                                 registry=self.registry, buckets=sorted({*_LATENCY_BUCKETS, *chunks}))
        self.queue = Histogram("wam_policy_queue_seconds", "Time a request waited for the device", registry=self.registry,
                               buckets=_LATENCY_BUCKETS)
        self.sessions = Gauge("wam_policy_sessions", "Connected robot sessions", ["embodiment"], registry=self.registry)
        self.requests = Counter("wam_policy_requests", "Requests answered", registry=self.registry)
        self.errors = Counter("wam_policy_errors", "Requests answered with an error", ["reason"], registry=self.registry)
        self.clipped_chunks = Counter("wam_policy_clipped_chunks", "Chunks the safety envelope clipped",
                                      registry=self.registry)
        self.clipped_values = Counter("wam_policy_clipped_values", "Action values the safety envelope clipped",
                                      registry=self.registry)
        self.passes = Counter("wam_policy_transformer_passes", "Transformer forwards run to denoise chunks",
                              registry=self.registry)
        self.in_flight = Gauge("wam_policy_requests_in_flight", "Requests received and not yet answered",
                               registry=self.registry)
        self.drained = Counter("wam_policy_sessions_drained", "Sessions closed because the server shut down",
                               ["how"], registry=self.registry)  # answered: after their last reply; cut: at the timeout
        self.recorded = Counter("wam_policy_recorded_files", "Files of the sessions' recording written (serving.record)",
                                registry=self.registry)
        self.record_dropped = Counter("wam_policy_record_dropped", "Exchanges the recording dropped: storage behind "
                                      "or failing (serving.record)", ["reason"], registry=self.registry)
        # every label's series from the start, at 0: Prometheus' increase() misses a counter's first appearance
        for counter, values in ((self.errors, ERROR_REASONS), (self.drained, ("answered", "cut")),
                                (self.record_dropped, ("behind", "write_failed"))):
            for value in values:
                counter.labels(value)
        self.idle_closed = Counter("wam_policy_idle_sessions_closed", "Sessions closed for idleness",
                                   registry=self.registry)
        self.max_sessions = Gauge("wam_policy_max_sessions", "Sessions admitted at once: serving.max_sessions, fewer "
                                  "where their KV caches do not fit", registry=self.registry)
        Gauge("wam_policy_session_memory_bytes", "Device memory one session's KV caches take",
              registry=self.registry).set(runtime.session_bytes)
        # exported only where the model's data recorded its control rate
        chunk_seconds = Gauge("wam_policy_chunk_seconds", "How long a robot takes to execute one chunk (its actions at "
                              "the rate its data was recorded at): a chunk answered later leaves an asynchronous robot "
                              "idle", ["embodiment"], registry=self.registry) if chunks else None
        for embodiment in runtime.embodiments.values():
            self.latency.labels(embodiment.name)
            self.sessions.labels(embodiment.name)
            if embodiment.chunk_seconds is not None:
                chunk_seconds.labels(embodiment.name).set(embodiment.chunk_seconds)
        if (pool := runtime.engine.denoiser.pool) is not None:  # compiled: made by the warm-up's sessions
            Gauge("wam_policy_kv_pool_free_rows", "Rows of the compiled engine's KV-cache pool no session holds",
                  registry=self.registry).set_function(lambda: pool.free_rows)
        self.batch = Histogram("wam_policy_batch_chunks", "Most chunks denoised in one forward with a request's chunk",
                               registry=self.registry, buckets=(1, 2, 4, 8, 16, 32))
        meta = runtime.metadata()
        Gauge("wam_policy_info", "The served model", ["preset", "step", "compute_path"], registry=self.registry).labels(
            meta["preset"], str(meta["step"]), meta["compute_path"]).set(1)
        engine = meta["engine"]
        Gauge("wam_policy_engine_info", "How the server denoises", ["compute_path", "max_batch", "compiled",
                                                                      "cuda_graphs", "device", "devices"],
              registry=self.registry).labels(meta["compute_path"], str(engine["max_batch"]), str(engine["compiled"]),
                                             str(engine["cuda_graphs"]), engine["device"], str(engine["devices"])).set(1)


class PolicyServer:
    def __init__(self, runtime: PolicyRuntime, max_sessions: int | None = None, max_request_mb: float | None = None,
                 idle_timeout_s: float | None = None, drain_timeout_s: float | None = None,
                 api_key: str | None = None, record: str | None = None, protocol: str | None = None):
        """api_key: robots must send it (openpi-client's api_key) to open a session; None: anyone may. record: where
        every session is recorded (default serving.record; None: nowhere). protocol: openpi or roboarena (default
        serving.protocol; wam.trainer.serve.roboarena)."""
        serving = runtime.policy.config.serving
        self.runtime = runtime
        # serving.max_sessions, or what fits the device (what the compiled engine's KV pool holds): never more
        self.max_sessions = min(max_sessions or runtime.max_sessions, runtime.max_sessions)
        self.max_request_bytes = int((max_request_mb or serving.max_request_mb) * 1e6)
        self.idle_timeout_s = idle_timeout_s or serving.idle_timeout_s
        self.drain_timeout_s = drain_timeout_s or serving.drain_timeout_s
        self._authorization = f"Api-Key {api_key}".encode() if api_key else None  # the header robots must send
        self.protocol = protocol or serving.protocol
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        # RoboArena: what each embodiment's robots are sent on connect, or why they cannot be served so (the one at
        # /, where RoboArena's clients connect, must be)
        self._roboarena: dict[str, dict | str] = {}
        for name, embodiment in runtime.embodiments.items() if self.protocol == ROBOARENA else ():
            try:
                self._roboarena[name] = server_config(embodiment, runtime.canvas)
            except ConfigError as err:
                if embodiment is runtime.default_embodiment:
                    raise
                self._roboarena[name] = str(err)
        self.draining = False
        self._sessions: dict[ServerConnection, bool] = {}  # every open session: whether a request is in flight
        self._drained: asyncio.Event | None = None  # set, while draining, when the last session has closed
        self.metrics = _Metrics(runtime)
        self.metrics.max_sessions.set(self.max_sessions)
        # a thread per session: a request waits for the device in the engine, not behind other sessions' encoding
        self._workers = ThreadPoolExecutor(max_workers=self.max_sessions, thread_name_prefix="wam-infer")
        self._packer = msgpack_numpy.Packer()
        record = record or serving.record
        self.recorder = Recorder(record, self.metrics.recorded.inc,
                                 lambda reason: self.metrics.record_dropped.labels(reason).inc()) if record else None

    @property
    def active(self) -> int:
        """Sessions open now."""
        return len(self._sessions)

    # -- HTTP ------------------------------------------------------------------------------------------

    def _http(self, connection: ServerConnection, request):
        path = urlparse(request.path).path
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            engine = self.runtime.engine
            problem = (f"draining: shutting down, {self.active} sessions finishing" if self.draining
                       else f"not serving: {engine.failure}" if engine.failure
                       else "warming up: compiling the denoising step" if not engine.ready.is_set()
                       else f"at capacity: {self.active} sessions" if self.active >= self.max_sessions else "")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE if problem else HTTPStatus.OK,
                                      f"{problem or 'ready'}\n")
        if path == "/metrics":
            response = connection.respond(HTTPStatus.OK, generate_latest(self.metrics.registry).decode())
            response.headers["Content-Type"] = CONTENT_TYPE_LATEST
            return response
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found: the policy is a websocket (at / or "
                                                            "/<embodiment>), or /healthz /readyz /metrics\n")
        if self._authorization is not None and not hmac.compare_digest(
                request.headers.get("Authorization", "").encode(), self._authorization):
            self.metrics.errors.labels("unauthorized").inc()
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized: this policy server needs its API key, "
                                      "sent as the header 'Authorization: Api-Key <key>' (openpi-client: "
                                      f"WebsocketClientPolicy(uri, api_key=...); wam: ${API_KEY_ENV})\n")
        if (embodiment := self._embodiment_at(path)) is None:
            paths = ", ".join(f"/{name}" for name in self.runtime.embodiments)
            return connection.respond(HTTPStatus.NOT_FOUND, f"not found: {path}; the policy serves "
                                      f"{self.runtime.default_embodiment.name} robots at / and each embodiment at its "
                                      f"path: {paths}\n")
        if isinstance(problem := self._roboarena.get(embodiment.name), str):
            return connection.respond(HTTPStatus.NOT_FOUND, f"not found: {path}; {problem}\n")
        return None

    def _embodiment_at(self, path: str) -> ServedEmbodiment | None:
        """The embodiment of the robots connecting at `path`: / the default one, /<name> that one."""
        name = path.strip("/")
        return self.runtime.embodiments.get(name) if name else self.runtime.default_embodiment

    # -- websocket sessions ---------------------------------------------------------------------------

    async def _session(self, ws: ServerConnection) -> None:
        if self.draining:  # routed here before the endpoints caught up with /readyz
            await ws.close(GOING_AWAY, DRAINING)
            return
        if self.active >= self.max_sessions:
            self.metrics.errors.labels("capacity").inc()
            # nothing is sent first: openpi-client expects its metadata, and raises this close reason instead
            await ws.close(1013, f"server at capacity: {self.active} sessions; retry later")
            return
        embodiment = self._embodiment_at(urlparse(ws.request.path).path)  # known: _http refused any other path
        sessions = self.metrics.sessions.labels(embodiment.name)
        sessions.inc()
        self._sessions[ws] = False
        session = self.runtime.session(embodiment)
        try:
            metadata = self.runtime.metadata(embodiment)
            recording = self.recorder and self.recorder.session(self._description(embodiment, ws.request.path, metadata))
            await ws.send(self._packer.pack(self._roboarena.get(embodiment.name, metadata)))
            while True:
                try:
                    message = await asyncio.wait_for(ws.recv(), self.idle_timeout_s)
                except TimeoutError:
                    self.metrics.idle_closed.inc()
                    await ws.close(1000, f"idle for {self.idle_timeout_s:g} s; session closed "
                                         "(serving.idle_timeout_s)")
                    return
                if self.draining:  # came as the drain closed this idle session: not run, no one would get the
                    return  # reply; its robot resends it to the replica that takes over
                self._sessions[ws] = True
                self.metrics.in_flight.inc()
                try:
                    received, arrived = time.perf_counter(), time.time()
                    reply = await self._reply(session, message, received)
                    if recording:  # what the server answered, whether or not the robot is still there to get it
                        recording.add(message, reply, arrived, time.perf_counter() - received)
                    await ws.send(reply)
                finally:
                    self.metrics.in_flight.dec()
                self._sessions[ws] = False
                if self.draining:  # answered: now it may go
                    self.metrics.drained.labels("answered").inc()
                    await ws.close(GOING_AWAY, DRAINING)
                    return
        except ConnectionClosed:
            pass
        finally:
            del self._sessions[ws]
            sessions.dec()
            if self._drained is not None and not self._sessions:
                self._drained.set()

    def _description(self, embodiment: ServedEmbodiment, path: str, metadata: dict) -> dict:
        """A session's recording's session.json: what `wam rerun` needs to serve its requests again."""
        runtime = self.runtime
        return {"model": runtime.policy.uri, "step": runtime.policy.step, "embodiment": embodiment.name, "path": path,
                "sampler": runtime.sampler_preset, "steps": runtime.sampler.steps,
                "compute_path": runtime.policy.compute_path, "device": str(runtime.device), "protocol": self.protocol,
                "metadata": metadata}

    async def _reply(self, session: Session, message: bytes | str, received: float) -> bytes | str:
        try:
            if isinstance(message, str):
                raise RequestError("requests are binary msgpack-numpy frames (openpi_client.msgpack_numpy), not text")
            try:
                obs = msgpack_numpy.unpackb(message)
            except Exception as err:  # noqa: BLE001 - whatever the bytes were, the answer is the same
                raise RequestError(f"cannot decode the request as msgpack-numpy: {type(err).__name__}: {err}") from None
            if self.protocol == ROBOARENA:
                endpoint, obs = endpoint_of(obs)
                if endpoint == "reset":
                    obs = {RESET_KEY: True}
                else:  # one frame per camera, the current one: it opens a new window (wam.trainer.serve.roboarena)
                    session.close_window()
            result = await asyncio.get_running_loop().run_in_executor(self._workers, self._infer, session, obs, received)
            return RESET_REPLY if self.protocol == ROBOARENA and RESET_KEY in obs else self._packer.pack(result)
        except RequestError as err:
            self.metrics.errors.labels("bad_request").inc()
            return f"bad request: {err}"
        except (EngineUnavailable, PeerLost) as err:
            self.metrics.errors.labels("unavailable").inc()
            return f"server unavailable: {err}"
        except UnsafeOutput as err:
            session.reset()
            self.metrics.errors.labels("unsafe_output").inc()
            log.error("refused a chunk: %s", err)
            return f"unsafe output: {err}; the session was reset (the next call starts a new window)"
        except Exception as err:  # noqa: BLE001 - one failed request must not take the server down
            log.exception("inference failed")
            session.reset()
            self.metrics.errors.labels("internal").inc()
            return f"internal error: {type(err).__name__}: {err}; the session was reset (the next call starts a new window)"

    def _infer(self, session: Session, obs: dict, received: float) -> dict:
        started = time.perf_counter()
        result = session.infer(obs)
        finished = time.perf_counter()
        queued = started - received  # for a worker thread, then (in the engine) for a place in a batch
        if "server_timing" in result:
            timing = result["server_timing"]
            queued += timing["queue_ms"] / 1000
            timing["queue_ms"] = queued * 1000
            self.metrics.passes.inc(timing["transformer_passes"])
            self.metrics.batch.observe(timing["batch"])
        if result.get("safety", {}).get("clipped"):
            self.metrics.clipped_chunks.inc()
            self.metrics.clipped_values.inc(result["safety"]["clipped_values"])
        self.metrics.queue.observe(queued)
        self.metrics.latency.labels(session.embodiment.name).observe(finished - received)
        self.metrics.requests.inc()
        return result

    # -- running --------------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> Server:
        # max_size: websockets refuses a larger message (close code 1009) as soon as its frame header says how large,
        # so no more than the limit is ever buffered per connection
        return await serve(self._session, host, port, compression=None, process_request=self._http,
                           max_size=self.max_request_bytes)

    async def drain(self) -> int:
        """Stop taking sessions and close every one (1001, going away) once its request in flight is answered;
        after drain_timeout_s the rest are closed anyway, and the engine stops, so that their requests end at its
        next step instead of keeping the process alive. Returns how many were cut off so, mid-request."""
        self.draining, self._drained = True, asyncio.Event()
        idle = [ws for ws, busy in self._sessions.items() if not busy]
        self.metrics.drained.labels("answered").inc(len(idle))
        await asyncio.gather(*(ws.close(GOING_AWAY, DRAINING) for ws in idle))  # the others close after their reply
        if self._sessions:
            try:
                await asyncio.wait_for(self._drained.wait(), self.drain_timeout_s)
            except TimeoutError:
                pass
        cut = list(self._sessions)
        if cut:
            self.metrics.drained.labels("cut").inc(len(cut))
            self.runtime.engine.fail("the server is shutting down")
            await asyncio.gather(*(ws.close(GOING_AWAY, CUT_OFF.format(self.drain_timeout_s)) for ws in cut))
        return len(cut)

    async def run(self, host: str, port: int) -> None:
        """Serve until SIGTERM or SIGINT, then drain (a second signal ends the process at once)."""
        server = await self.start(host, port)
        log.info("serving %s on ws://%s:%d (%s)", self.runtime.metadata()["preset"], host, port,
                 self.runtime.policy.compute_path)
        stop, loop = asyncio.Event(), asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for sig in signals:  # back to the defaults: a second Ctrl-C interrupts the drain
            loop.remove_signal_handler(sig)
        log.info("shutting down: draining %d sessions (up to %g s: serving.drain_timeout_s)", self.active,
                 self.drain_timeout_s)
        cut = await self.drain()
        server.close()
        await server.wait_closed()
        if self.recorder:
            self.recorder.close()  # what the sessions sent last, written before the process exits
        if cut:
            log.warning("drained: %d sessions cut off mid-request at the timeout", cut)
        else:
            log.info("drained: every session answered and closed")


def serve_forever(runtime: PolicyRuntime, host: str, port: int, record: str | None, protocol: str) -> None:
    """`wam serve`: log to the console and serve until interrupted; robots must send $WAM_POLICY_API_KEY where it
    is set."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # a line per connection and health probe otherwise
    api_key = os.environ.get(API_KEY_ENV) or None
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no API key: anyone who reaches %s:%d can drive this policy; set %s to require one", host, port,
                    API_KEY_ENV)
    if api_key is not None and protocol == ROBOARENA:
        log.warning("RoboArena's client sends no API key: it will be refused (HTTP 401) unless a proxy in front of "
                    "this server adds the header; unset %s to let it in", API_KEY_ENV)
    try:
        asyncio.run(PolicyServer(runtime, api_key=api_key, record=record, protocol=protocol).run(host, port))
    except KeyboardInterrupt:
        pass
    except OSError as err:
        if err.errno in LISTEN_ERRNOS:  # taken since `wam serve` checked it
            raise listen_error(host, port, err) from None
        raise
    finally:
        runtime.engine.stop()


@contextmanager
def serve_in_background(server: PolicyServer, host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """Run the server on an event loop in a thread (tests, the local pipeline); yields the bound port."""
    loop = asyncio.new_event_loop()
    started: dict = {}
    ready = threading.Event()

    async def main() -> None:
        started["server"] = await server.start(host, port)
        ready.set()
        await started["server"].serve_forever()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True, name="wam-policy-server")
    thread.start()
    if not ready.wait(60):
        raise RuntimeError("the policy server did not start")
    try:
        yield started["server"].sockets[0].getsockname()[1]
    finally:
        loop.call_soon_threadsafe(started["server"].close)
        thread.join(10)
