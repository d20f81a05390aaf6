"""Classifier-free guidance in parallel: the unconditional branch on a second process and device.

Rank 0 (the server) keeps every session's conditional KV cache and runs the conditional pass; rank 1 (`run_peer`,
started by `GuidancePeer.spawn`) keeps every session's unconditional cache and runs the unconditional pass of the
same step at the same time, and its velocities come back every step (DreamZero's CFG parallelism). The two talk
over a process group of their own (no global torch.distributed state): gloo on CPUs, NCCL between GPUs. Each
command is one pickled message from rank 0 (tensors on the CPU); a predict is answered with the velocities.
Rank 0 never hangs on a dead peer: a watcher thread sees the process exit at once (the server turns unready
with its exit code), a transfer to a peer that died fails (gloo: the connection closes) or times out after
PEER_TIMEOUT (NCCL), and raises PeerLost.
"""

from __future__ import annotations

import itertools
import multiprocessing
import pickle
import threading
import weakref
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from wam.platform.launch import free_port
from wam.trainer.model.model import Prediction, WamOutputs

CONNECT_TIMEOUT = timedelta(seconds=300)
PEER_TIMEOUT = timedelta(seconds=60)  # rank 0's longest wait for one transfer (a step of the 14B takes ~1 s)
IDLE = timedelta(days=365)  # the peer waits for commands as long as the server runs


class PeerLost(RuntimeError):
    """The guidance peer (rank 1) is gone; the message says how."""


def _group(host: str, port: int, rank: int, device: torch.device, timeout: timedelta) -> dist.ProcessGroup:
    store = dist.TCPStore(host, port, 2, is_master=rank == 0, timeout=CONNECT_TIMEOUT, wait_for_workers=False)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    return dist.ProcessGroupGloo(store, rank, 2, timeout)


def _transfer(op: str, group, tensor: torch.Tensor, peer: int, alive: Callable[[], str | None]) -> None:
    try:
        getattr(group, op)([tensor], peer, 0).wait()
    except RuntimeError as err:  # a closed connection, a timeout
        raise PeerLost(alive() or f"the guidance peer stopped answering: {err}") from None


def _send(group, obj, device: torch.device, peer: int, alive: Callable[[], str | None]) -> None:
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    for tensor in (torch.tensor([data.numel()], dtype=torch.int64, device=device), data):
        _transfer("send", group, tensor, peer, alive)


def _recv(group, device: torch.device, peer: int, alive: Callable[[], str | None]):
    size = torch.zeros(1, dtype=torch.int64, device=device)
    _transfer("recv", group, size, peer, alive)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    _transfer("recv", group, data, peer, alive)
    return pickle.loads(data.cpu().numpy().tobytes())


def _cpu(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().cpu()


class RemoteCache:
    """One session's unconditional-branch KV cache, held by the peer; released when this handle is collected."""

    def __init__(self, peer: GuidancePeer, rows: int):
        self.peer, self.key, self.rows = peer, next(peer.keys), rows
        weakref.finalize(self, peer.released.append, self.key)

    def reset(self, shape: dict, text: torch.Tensor, image: torch.Tensor | None, i2v_cond: torch.Tensor | None,
              first_latent: torch.Tensor) -> None:
        """set_conditioning + the first frame, as ChunkRollout.reset does for a local cache (`shape`: new_cache's)."""
        self.peer.command({"op": "reset", "key": self.key, "rows": self.rows, "shape": shape, "text": _cpu(text),
                           "image": _cpu(image), "i2v": _cpu(i2v_cond), "first": _cpu(first_latent)})

    def observe(self, latents: torch.Tensor, chunk: int) -> None:
        self.peer.command({"op": "observe", "key": self.key, "latents": _cpu(latents), "chunk": chunk})


class GuidancePeer:
    """Rank 0's handle on the peer: its caches, its commands, and whether it still runs."""

    def __init__(self, group, process: multiprocessing.Process, device: torch.device, comm_device: torch.device):
        self.group, self.process, self.device, self.comm_device = group, process, device, comm_device
        self.keys = itertools.count()
        self.released: list[int] = []  # caches whose sessions ended, dropped by the peer with the next command
        self._lock = threading.Lock()  # one command (and its answer) at a time: sessions' threads and the engine's

    @classmethod
    def spawn(cls, model: str, device: torch.device, peer_device: torch.device, compute: str | None,
              compiled: bool, cache_rows: int | None = None) -> GuidancePeer:
        """Start rank 1 on `peer_device` with its own copy of the quantized `model` (compiled: its caches in a pool
        of `cache_rows` rows, as Denoiser's); returns once it is loaded."""
        port = free_port()
        context = multiprocessing.get_context("spawn")
        loaded = context.Event()
        process = context.Process(target=run_peer, name="wam-guidance-peer", daemon=True,
                                  args=(model, str(peer_device), compute, compiled, cache_rows, "127.0.0.1", port,
                                        loaded))
        process.start()
        comm = device if device.type == "cuda" else torch.device("cpu")
        peer = cls(_group("127.0.0.1", port, 0, comm, PEER_TIMEOUT), process, device, comm)
        while not loaded.wait(0.1):  # loading can take minutes: waited for outside any transfer's timeout
            if reason := peer.lost():
                raise PeerLost(reason)
        return peer

    def lost(self) -> str | None:
        """Why the peer cannot serve, or None while it runs."""
        if self.process.is_alive():
            return None
        return (f"the guidance peer (rank 1, pid {self.process.pid}) exited with code {self.process.exitcode}; "
                "classifier-free guidance cannot run; restart the server")

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` from a watcher thread when the peer process exits."""
        def watch() -> None:
            self.process.join()
            callback(self.lost())

        threading.Thread(target=watch, daemon=True, name="wam-guidance-watch").start()

    def cache(self, rows: int) -> RemoteCache:
        return RemoteCache(self, rows)

    def _send(self, message: dict) -> None:
        message["release"], self.released[:] = list(self.released), []
        _send(self.group, message, self.comm_device, 1, self.lost)

    def command(self, message: dict) -> None:
        with self._lock:
            self._send(message)

    def predict(self, items: list[Prediction]) -> Callable[[], list[WamOutputs]]:
        """Send the peer its passes of this step; the returned function waits for their outputs. Until then no
        other command is sent."""
        self._lock.acquire()
        try:
            self._send({"op": "predict", "items": [(item.cache.key, *(_cpu(x) for x in item[1:])) for item in items]})
        except BaseException:
            self._lock.release()
            raise

        def outputs() -> list[WamOutputs]:
            try:
                answer = _recv(self.group, self.comm_device, 1, self.lost)
            finally:
                self._lock.release()
            return [WamOutputs(video.to(self.device), actions.to(self.device)) for video, actions in answer]

        return outputs


def run_peer(model: str, device: str, compute: str | None, compiled: bool, cache_rows: int | None, host: str,
             port: int, loaded) -> None:
    """Rank 1: load the model, then run rank 0's commands on the unconditional caches until it goes away (its
    transfers then fail and the process ends)."""
    from wam.trainer.inference import Denoiser
    from wam.trainer.quantize.load import load_quantized

    dev = torch.device(device)
    comm = dev if dev.type == "cuda" else torch.device("cpu")
    group = _group(host, port, 1, comm, IDLE)
    net = load_quantized(model, dev, compute).model  # an error ends the process: rank 0 reports its exit code
    denoiser = Denoiser(net, compiled, cache_rows)
    caches = {}
    loaded.set()

    def never() -> None:
        return None

    while True:
        try:
            message = _recv(group, comm, 0, never)
        except PeerLost:  # rank 0 ended
            return
        for key in message["release"]:
            caches.pop(key, None)
        op = message["op"]
        if op == "reset":
            s, rows = message["shape"], message["rows"]
            cache = caches.get(message["key"])
            if cache is None or cache.layers[0].k.shape[0] != rows:
                caches.pop(message["key"], None)
                cache = caches[message["key"]] = denoiser.new_cache(rows, dev, **s)
            net.set_conditioning(cache, message["text"].to(dev), *(None if message[k] is None else message[k].to(dev)
                                                                  for k in ("image", "i2v")))
            net.observe(cache, message["first"].to(dev))
        elif op == "observe":
            net.observe(caches[message["key"]], message["latents"].to(dev), chunk=message["chunk"])
        elif op == "predict":
            items = [Prediction(caches[key], *(x.to(dev) for x in tensors)) for key, *tensors in message["items"]]
            _send(group, [(out.video.cpu(), out.actions.cpu()) for out in denoiser(items)], comm, 0, never)
