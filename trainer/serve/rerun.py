"""`wam rerun`: a recorded session's requests (wam.trainer.serve.recorder) sent, in order and byte for byte, to
a fresh server of the same model on this machine, and each reply compared with the one the robot got: the same
actions (within a tolerance: batched with other robots, a chunk differs from serving it alone by float rounding),
the same gripper commands, the same errors. What a fleet's engineers run after an incident, and to check that a
new build or device serves a recorded session as before."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from openpi_client import msgpack_numpy
from websockets.sync.client import connect

from wam.trainer.data.videos import encode_video, resized, side_by_side
from wam.trainer.serve.policy import load_runtime
from wam.trainer.serve.recorder import Exchange
from wam.trainer.serve.roboarena import RESET_REPLY
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
    if isinstance(then, str) and then == now == RESET_REPLY:  # RoboArena's answer to a reset
        return Rerun(exchange.number, "reset", recorded_ms, rerun_ms, None, 0, True)
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
    runtime.policy.config.serving.record = None  # a rerun is not itself recorded
    server = PolicyServer(runtime, max_sessions=1, protocol=description.get("protocol"))  # None: recorded before
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


def robot_view(description: dict, exchanges: list[Exchange]) -> tuple[np.ndarray, float]:
    """What the robot's cameras saw, as it sent them request after request (its cameras side by side; requests
    without its cameras' frames left out): (n, H, W, 3) uint8 frames, all at the first's size, and their rate."""
    meta = description["metadata"]
    frames = []
    for exchange in exchanges:
        try:
            obs = msgpack_numpy.unpackb(exchange.request) if isinstance(exchange.request, bytes) else None
        except Exception:  # noqa: BLE001 - a request the server refused as undecodable shows nothing
            continue
        sent = {c: c if c in obs else meta.get("request_keys", {}).get(c, [c])[0] for c in meta["cameras"]} \
            if isinstance(obs, dict) else {}  # a camera's own key, or the one its robot sends it as
        views = {c: np.asarray(obs[key]) for c, key in sent.items() if key in obs}
        if len(views) < len(meta["cameras"]) or any(v.dtype != np.uint8 or v.ndim not in (3, 4) or v.shape[-1] != 3
                                                    or v.shape[0] == 0 for v in views.values()):
            continue
        views = {c: v[None] if v.ndim == 3 else v for c, v in views.items()}  # a first call's single frame
        if len({len(v) for v in views.values()}) == 1:
            shown = side_by_side(views)
            frames.append(resized(shown, *frames[0].shape[1:3]) if frames else shown)
    chunk_seconds = meta.get("chunk_seconds")
    rate = meta["frames_per_chunk"] / chunk_seconds if chunk_seconds else 5.0  # a robot of unknown rate: 5 a second
    return (np.concatenate(frames) if frames else np.zeros((0, 2, 2, 3), np.uint8)), rate


def write_robot_view(description: dict, exchanges: list[Exchange], path: Path) -> int:
    """The robot's view (robot_view) as an MP4 at `path`; how many frames it holds (none: nothing written)."""
    frames, rate = robot_view(description, exchanges)
    if len(frames):
        encode_video(frames, path, "h264", fps=max(1, round(rate)))
    return len(frames)


def missing_exchanges(exchanges: list[Exchange]) -> list[int]:
    """The numbers of the exchanges a recording lacks (dropped while recording) before its last."""
    return sorted(set(range(1, exchanges[-1].number + 1)) - {e.number for e in exchanges}) if exchanges else []
