"""The flight recorder (serving.record): every exchange of every robot session, written where a fleet's engineers
can look at it after an incident: the request's bytes as the robot sent them (camera frames, state, prompt) and
the reply as the server sent it (the actions, the safety envelope's report, the timing, or the error).

One folder per session, <record>/<embodiment>/<started>-<id>/: `session.json` (the model, how it was served, the
metadata the robot got) and `000001.msgpack`, ... (one exchange each, in order). Files are written by a thread of
their own, never on a robot's path: when storage falls behind by more than RECORD_BUFFER_BYTES, exchanges are
dropped and counted (wam_policy_record_dropped_total), not waited for. `wam rerun` sends a recording's requests
to the same model again and compares the replies (wam.trainer.serve.rerun). The API key is a header: never
recorded.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from wam.platform.errors import StorageError
from wam.platform.storage import filesystem, is_remote, join, local_path, probe_writable, write_atomic

log = logging.getLogger(__name__)

RECORD_BUFFER_BYTES = 512 * 2**20  # exchanges waiting to be written; beyond this they are dropped
SESSION_FILE = "session.json"


@dataclass
class Exchange:
    number: int  # in its session, from 1 (a gap: exchanges dropped while recording)
    received: float  # unix time the request arrived
    seconds: float  # until its reply was ready
    request: bytes | str  # as the robot sent it (a text frame stays text)
    reply: bytes | str  # binary: msgpack-numpy; text: an error


class Recorder:
    def __init__(self, uri: str, on_written: Callable[[], None], on_dropped: Callable[[str], None]):
        """on_written(), on_dropped(reason): counted by the server's metrics. Raises StorageError when `uri` cannot
        be written, before any robot connects."""
        probe_writable(uri)
        self.uri, self._on_written, self._on_dropped = uri, on_written, on_dropped
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._pending = 0  # bytes queued, not yet written
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._write_all, daemon=True, name="wam-recorder")
        self._thread.start()

    def session(self, description: dict) -> SessionRecording:
        """A new session's folder, under its embodiment's (description: session.json's content)."""
        started = time.gmtime()
        folder = join(self.uri, description["embodiment"],
                      f"{time.strftime('%Y%m%dT%H%M%SZ', started)}-{uuid.uuid4().hex[:8]}")
        self.write(join(folder, SESSION_FILE), json.dumps(
            {**description, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", started)}, indent=1).encode())
        return SessionRecording(self, folder)

    def write(self, uri: str, data: bytes) -> None:
        with self._lock:
            if self._pending + len(data) > RECORD_BUFFER_BYTES:
                self._on_dropped("behind")
                log.warning("recording %s dropped: storage is %d MiB behind", uri, self._pending >> 20)
                return
            self._pending += len(data)
        self._queue.put((uri, data))

    def _write_all(self) -> None:
        while (item := self._queue.get()) is not None:
            uri, data = item
            try:
                if not is_remote(uri):  # (an object store needs no folders)
                    local_path(uri).parent.mkdir(parents=True, exist_ok=True)
                write_atomic(uri, data)
                self._on_written()
            except Exception as err:  # noqa: BLE001 - a storage failure must not reach the robots
                self._on_dropped("write_failed")
                log.warning("could not write %s: %s: %s", uri, type(err).__name__, err)
            finally:
                with self._lock:
                    self._pending -= len(data)
                self._queue.task_done()
        self._queue.task_done()

    def flush(self) -> None:
        """Wait until everything recorded so far is written."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join()


class SessionRecording:
    def __init__(self, recorder: Recorder, folder: str):
        self.recorder, self.folder, self.exchanges = recorder, folder, 0

    def add(self, request: bytes | str, reply: bytes | str, received: float, seconds: float) -> None:
        self.exchanges += 1
        self.recorder.write(join(self.folder, f"{self.exchanges:06d}.msgpack"), msgpack.packb(
            {"received": received, "seconds": seconds, "request": request, "reply": reply}))


def read_recording(folder: str) -> tuple[dict, list[Exchange]]:
    """A session's recording: (session.json, its exchanges in order)."""
    fs, path = filesystem(folder)
    path = path.rstrip("/")
    if not fs.exists(f"{path}/{SESSION_FILE}"):
        raise StorageError(f"{folder} is not a session's recording: it has no {SESSION_FILE} (a recording is "
                           "<serving.record>/<embodiment>/<session>/)")
    with fs.open(f"{path}/{SESSION_FILE}", "rb") as f:
        description = json.load(f)
    exchanges = []
    for name in sorted(fs.glob(f"{path}/[0-9]*.msgpack")):
        with fs.open(name, "rb") as f:
            exchanges.append(Exchange(int(name.rsplit("/", 1)[-1].split(".")[0]), **msgpack.unpackb(f.read())))
    return description, exchanges
