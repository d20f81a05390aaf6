"""`wam submit --local`: a TrainJob on this machine through the whole platform (object store, MLflow server,
emulated API, operator, real pods), followed to serving; the public openpi client reaches the policy; Ctrl-C
stops everything. Bad input is refused before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import yaml

from conftest import free_port, wait_for, wam_cli

TRAINJOB = {"apiVersion": "wam.dev/v1alpha1", "kind": "TrainJob", "metadata": {"name": "try-local"},
            "spec": {"model": {"preset": "tiny"}, "config": {"data": {"source": "synthetic"},
                                                             "training": {"steps": 6, "log_every": 2}},
                     "checkpoint": {"interval": 3}, "resources": {"accelerator": "h100", "nodes": 1, "gpusPerNode": 1},
                     "scheduling": {"gang": "none"}, "handoff": {"quantize": "final", "serving": {"replicas": 1}}}}


def test_a_trainjob_runs_locally_to_a_served_policy_and_stops_on_ctrl_c(tmp_path):
    manifest = tmp_path / "trainjob.yaml"
    manifest.write_text(yaml.safe_dump(TRAINJOB))
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "wam"), "submit", "--local", str(manifest),
                             "--workdir", str(tmp_path / "work"), "--serving-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "COLUMNS": "200"},
                            # Ctrl-C reaches it as from a terminal, also where the runner ignores SIGINT (a background
                            # job inherits SIG_IGN)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        def serving():
            """the policy served"""
            assert proc.poll() is None, "".join(lines)
            return any("the policy answers at" in line for line in lines)
        wait_for(serving, timeout=300, every=0.5)
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        client = WebsocketClientPolicy(f"ws://127.0.0.1:{port}")
        meta = client.get_server_metadata()
        assert meta["step"] == 6 and meta["preset"] == "tiny"
        low, high = np.array(meta["safety"]["state_low"]), np.array(meta["safety"]["state_high"])
        rng = np.random.default_rng(0)
        reply = client.infer({**{cam: rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for cam in meta["cameras"]},
                              "observation.state": rng.uniform(low, high).astype(np.float32), "prompt": "push"})
        assert np.isfinite(reply["actions"]).all()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = proc.wait(120)
        reader.join(10)
    text = "".join(lines)
    assert code == 0, text
    assert "Succeeded" in text and "quantized" in text and "Serving" in text
    copied = sorted(p.name for p in (tmp_path / "work" / "checkpoints").iterdir())
    assert copied == ["nvfp4", "step-3", "step-6"], copied
    assert (tmp_path / "work" / "mlflow.db").stat().st_size > 0  # the runs outlive the command
    with socket.socket() as s:  # the policy server went with the command
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_bad_input_is_refused_before_anything_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TRAINJOB, "spec": {**TRAINJOB["spec"], "resources": {"nodes": 0}}}))
    done = wam_cli("submit", "--local", bad, "--workdir", tmp_path / "work")
    assert done.returncode == 2 and "nodes" in done.stderr, done.stderr
    assert not (tmp_path / "work").exists()
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(TRAINJOB))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        done = wam_cli("submit", "--local", good, "--workdir", tmp_path / "work", "--serving-port", port)
    assert done.returncode == 2 and f"--serving-port {port} is in use" in done.stderr, done.stderr
    assert not (tmp_path / "work").exists()
