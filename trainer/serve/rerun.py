"""`wam rerun`: a recorded session's requests (wam.trainer.serve.recorder) sent, in order and byte for byte, to
a fresh server of the same model on this machine, and each reply compared with the one the robot got: the same
actions (within a tolerance: batched with other robots, a chunk differs from serving it alone by float rounding),
the same gripper commands, the same errors. What a fleet's engineers run after an incident, and to check that a
new build or device serves a recorded session as before."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from openpi_client import msgpack_numpy
from websockets.sync.client import connect

from wam.trainer.serve.policy import load_runtime
from wam.trainer.serve.recorder import Exchange
from wam.trainer.serve.server import PolicyServer, serve_in_background


@dataclass
class Rerun:
    number: int  # the exchange's number in the session, from 1
    kind: str  # chunk | reset | error
    recorded_ms: float  # the server's time to answer it then
    rerun_ms: float  # ... and here, now
    deviation: float | None  # chunks: the largest |action difference| outside the gripper dims, robot units
    gripper_flips: int  # chunks: gripper commands (binarised) that differ
    same: bool  # within the tolerance, no gripper flipped; errors: the same kind of error
    note: str = ""


def _reply(raw: bytes | str) -> dict | str:
    return raw if isinstance(raw, str) else msgpack_numpy.unpackb(raw)


def compare(exchange: Exchange, raw: bytes | str, rerun_ms: float, gripper_dims: list[int],
            atol: float) -> Rerun:
    """One exchange's reply then and now."""
    then, now = _reply(exchange.reply), _reply(raw)
    recorded_ms = exchange.seconds * 1000
    if isinstance(then, str) or isinstance(now, str):  # an error: the same kind (the text before its first colon)?
        kinds = [r.split(":", 1)[0] if isinstance(r, str) else "a reply" for r in (then, now)]
        return Rerun(exchange.number, "error", recorded_ms, rerun_ms, None, 0, kinds[0] == kinds[1],
                     kinds[0] if kinds[0] == kinds[1] else f"then {kinds[0]}, now {kinds[1]}")
    if "actions" not in then:
        return Rerun(exchange.number, "reset", recorded_ms, rerun_ms, None, 0, then == now)
    a, b = np.asarray(then["actions"]), np.asarray(now["actions"])
    if a.shape != b.shape:
        return Rerun(exchange.number, "chunk", recorded_ms, rerun_ms, None, 0, False, f"actions {a.shape} then, {b.shape} now")
    other = [d for d in range(a.shape[1]) if d not in gripper_dims]
    deviation = float(np.abs(a[:, other] - b[:, other]).max()) if other else 0.0
    flips = int((a[:, gripper_dims] != b[:, gripper_dims]).sum())
    return Rerun(exchange.number, "chunk", recorded_ms, rerun_ms, deviation, flips, deviation <= atol and flips == 0)


def rerun(description: dict, exchanges: list[Exchange], model: str | None = None, device: str = "cpu",
          compute: str | None = None, atol: float = 1e-3) -> list[Rerun]:
    """Serve a recorded session (recorder.read_recording) again: its model, or `model`, on its compute path, or
    `compute`, on `device`, one session at a time; a Rerun per exchange."""
    runtime = load_runtime(model or description["model"], device, description["steps"], description["embodiment"],
                           description["sampler"], max_batch=1, compile="off",
                           compute=compute or description["compute_path"])
    server = PolicyServer(runtime, max_sessions=1)
    gripper_dims = description["metadata"].get("gripper_dims", [])
    results = []
    try:
        with serve_in_background(server) as port, connect(f"ws://127.0.0.1:{port}/{description['embodiment']}",
                                                          compression=None, max_size=None) as ws:
            ws.recv()  # the metadata
            for exchange in exchanges:
                started = time.perf_counter()
                ws.send(exchange.request)
                raw = ws.recv()
                results.append(compare(exchange, raw, (time.perf_counter() - started) * 1000, gripper_dims,
                                       atol))
    finally:
        runtime.engine.stop()
    return results
