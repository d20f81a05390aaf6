"""`wam pipeline`: the whole handoff on this machine, as the operator runs it in a cluster: train, quantize
the final (or every) complete checkpoint with the same `wam quantize` command a quantize Job runs, serve
it with the same `wam serve` command a serving pod runs, and optionally let a recorded episode drive it."""

from __future__ import annotations

import subprocess

import typer
from rich import box
from rich.markup import escape
from rich.table import Column, Table

from wam.app import local_training
from wam.app.console import console, err_console, fail
from wam.platform.checkpoints import list_checkpoints, quantized_uri
from wam.platform.config import WamConfig
from wam.platform.launch import local_command, quantize_command, serve_command, wait_ready


def run_pipeline(cfg: WamConfig, *, every: bool, serve: bool, port: int, client_dataset: str | None,
                 asynchronous: bool) -> None:
    local_training.run(cfg)
    complete = [(step, uri) for step, uri, ok in list_checkpoints(cfg.checkpoint_uri) if ok]
    if not complete:
        fail(f"training left no complete checkpoint in {cfg.checkpoint_uri}")
    for step, uri in complete if every else complete[-1:]:
        _stage(quantize_command(uri, quantized_uri(cfg.checkpoint_uri, step)), f"quantize step {step}")
    model = quantized_uri(cfg.checkpoint_uri, complete[-1][0])
    if not serve:
        return
    server = subprocess.Popen(local_command(serve_command(model, port, host="127.0.0.1")))
    try:
        try:
            wait_ready(port, server, timeout=300)
        except RuntimeError as err:
            fail(str(err), 1)
        if client_dataset is None:
            console.print(f"serving {escape(model)} on ws://127.0.0.1:{port}; Ctrl-C stops")
            server.wait()
        else:
            show_replay(cfg, f"ws://127.0.0.1:{port}", client_dataset, 1, asynchronous)
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait(30)


def show_replay(cfg: WamConfig, uri: str, dataset: str, windows: int, asynchronous: bool,
                control_hz: float | None = None) -> None:
    """Recorded episodes drive the served policy through openpi-client (`wam client`, and the end of the
    pipeline); a table of the chunks: latencies, the deadline, the first action, the error vs recorded."""
    from wam.trainer.serve.replay import replay

    steps = replay(cfg, dataset, uri, windows, asynchronous, control_hz)
    table = Table("chunk", "round trip", "server", "queue", "passes", "deadline", Column("first action", no_wrap=True),
                  "MAE", box=box.SIMPLE_HEAD,
                  title=f"{len(steps)} chunks from {uri} ({'async' if asynchronous else 'sync'}, a chunk's deadline "
                        f"{steps[0].result.budget_ms:.0f} ms); times in ms, transformer passes of the chunk, actions in "
                        "robot units, MAE vs the recorded ones")
    for i, step in enumerate(steps):
        r = step.result
        dims = step.recorded.shape[1]
        first = " ".join(f"{v:+.2f}" for v in r.actions[0, :min(dims, 3)])
        table.add_row(str(i), f"{r.round_trip_ms:.0f}", f"{r.server_timing['infer_ms']:.0f}",
                      f"{r.server_timing['queue_ms']:.1f}", str(r.server_timing["transformer_passes"]),
                      "met" if r.met_deadline else f"missed ({r.budget_ms:.0f})",
                      first, f"{abs(r.actions - step.recorded).mean():.3f}")
    console.print(table)


def _stage(command: list[str], what: str) -> None:
    console.print(f"[bold]{what}[/]: {escape(' '.join(command))}")
    if subprocess.run(local_command(command)).returncode != 0:
        err_console.print(f"[bold red]{what} failed[/]")
        raise typer.Exit(1)

