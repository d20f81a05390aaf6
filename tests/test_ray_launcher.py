"""The Ray launcher (`wam train --launcher ray`): the same torchtitan training in Ray Train workers, on a real
local Ray cluster (loopback only), with real checkpoints and MLflow store; a worker killed with SIGKILL is
restarted by Ray Train and the run resumes from the newest complete checkpoint. Also the smoke run of
benchmarks/launchers.py."""

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from wam.app import local_training
from wam.platform.checkpoints import list_checkpoints
from wam.platform.config import load_config
from wam.platform.tracking import JOB_TAG

from conftest import INTERRUPTED_RUN, run_benchmark, step_losses, wait_for, wam_cli, write_run_config

# Ray Train workers and torchrun processes run the same code with the same process group (gloo, 2 ranks),
# the same threads (OMP_NUM_THREADS=1) and the same seeds. Measured on a 12-step run: 11 of the 12 losses
# are bit-identical; one differs in its last float32 bit (8.7e-8 relative): a loss is a reduction whose
# rounding depends on how its buffers happen to be aligned in the process, and the steps after it agree
# exactly again (the parameters did not drift). Hence a relative tolerance of 1e-6, about 8 float32 ulps.
LOSS_TOLERANCE = 1e-6


def _in_session(sid: int) -> list[int]:
    """Processes of a session (the driver's: Ray's processes and workers all stay in it)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == sid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _listening(pids: list[int]) -> list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """(process, address) of every TCP socket the processes listen on (/proc/net/tcp*, by socket inode)."""
    owners = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        owners.update({link[8:-1]: name for link in links if link.startswith("socket:[")})
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in owners:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((owners[fields[9]], ipaddress.ip_address(socket.inet_ntop(family, raw))))
    return found


def _loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def _rank0_pid(log: Path) -> int | None:
    """Ray Train's own record of where world rank 0 runs."""
    for line in reversed(log.read_text(errors="replace").splitlines() if log.exists() else []):
        if "world_rank=0," in line and "pid=" in line:
            return int(line.split("pid=")[-1].split(")")[0])
    return None


@pytest.mark.slow
def test_ray_run_survives_a_sigkilled_worker_and_matches_torchrun(tmp_path, uninterrupted_losses):
    """2 Ray Train workers train and checkpoint; rank 0 is SIGKILLed after step 8; Ray Train restarts the
    group, which resumes from the newest complete checkpoint; every loss equals the torchrun run's."""
    # The MLflow store exists before the run, as a tracking server would: MLflow creates an embedded sqlite
    # store with tens of non-atomic migrations, and a process killed during them (whatever its launcher)
    # leaves a store nothing can open again.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.get_experiment(client.create_experiment("wam", (tmp_path / "mlartifacts").as_uri()))
    cfg = load_config(write_run_config(tmp_path, "killed", tracking={"uri": store}, **INTERRUPTED_RUN),
                      ["training.launcher=ray"])
    process = local_training.start(cfg, local_training.prepare(cfg).config_path)
    log = cfg.run_dir / "train.log"
    deadline = time.time() + 600

    def tracked() -> int:
        """The newest step rank 0's (asynchronous) tracker has stored in the MLflow run."""
        runs = client.search_runs([experiment.experiment_id], f"tags.`{JOB_TAG}` = 'killed'")
        return max((m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")), default=0) if runs else 0
    def completed() -> list[int]:
        """The steps of the complete checkpoints (their manifests are written off the training's path)"""
        return [step for step, _, ok in list_checkpoints(cfg.checkpoint_uri) if ok]
    while (tracked() < 8 or not completed()) and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    logged = tracked()
    rank0 = _rank0_pid(log)
    assert rank0 and process.poll() is None, "the run ended before it could be interrupted"
    # Ray's cluster listens on loopback only. (The training's own rendezvous store, torch's TCPStore in
    # rank 0, binds every interface under either launcher, so the training workers are left out.)
    ray = [(name, address) for name, address in _listening(_in_session(process.pid)) if "RayTrainWorker" not in name]
    assert any("gcs_server" in name for name, _ in ray) and all(_loopback(a) for _, a in ray), ray
    # Rank 0 writes every manifest: once it is gone no checkpoint can complete, so the newest complete one
    # now is the one the restarted workers must resume from.
    os.kill(rank0, signal.SIGKILL)
    complete = max(completed())
    assert 4 <= complete < 16
    assert process.wait(600) == 0, log.read_text()[-5000:]

    text = log.read_text()
    assert "Started training worker group of size 2" in text and "ip=127.0.0.1" in text
    assert "PlacementGroupCleaner" not in text, "no warnings about the dashboard a local run does without"
    assert "[FailurePolicy] RETRY" in text
    assert f"Loading the checkpoint from {cfg.checkpoint_uri}/step-{complete}." in text
    steps = [json.loads(line)["step"] for line in (cfg.run_dir / "progress.jsonl").read_text().splitlines()]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[:restart] == list(range(1, steps[restart - 1] + 1)) and steps[restart - 1] >= 8
    assert steps[restart:] == list(range(complete + 1, 17)), "the resumed steps follow the checkpoint"
    # Steps 1..complete are the first attempt's, the rest the restarted workers': all as torchrun's.
    assert step_losses(cfg.run_dir) == pytest.approx(uninterrupted_losses, rel=LOSS_TOLERANCE, abs=0)
    assert [(s, ok) for s, _, ok in list_checkpoints(cfg.checkpoint_uri)] == [(s, True) for s in (4, 8, 12, 16)]

    info = json.loads((cfg.run_dir / "run.json").read_text())
    runs = client.search_runs([experiment.experiment_id], f"tags.`{JOB_TAG}` = 'killed'")
    assert [r.info.run_id for r in runs] == [info["mlflow_run_id"]], "one MLflow run across the restart"
    assert runs[0].info.status == "FINISHED" and info["finished"] is True
    history = [m.step for m in client.get_metric_history(info["mlflow_run_id"], "loss")]
    assert set(history) == set(range(1, 17)) and len(history) >= 16 + logged - complete, "both attempts logged here"
    def ray_gone() -> bool:
        """Ray's processes to leave (they do after the driver)"""
        return not _in_session(process.pid)
    wait_for(ray_gone, timeout=30)


def test_launcher_choice_is_checked_before_anything_starts(tmp_path):
    config = write_run_config(tmp_path, "launchers")
    unknown = wam_cli("train", config, "--launcher", "slurm")
    said = " ".join(unknown.stderr.split())
    assert unknown.returncode == 2 and "training.launcher = 'slurm' is not one of torchrun, ray" in said, said
    # An environment without Ray (a module set to None is one Python cannot import).
    missing = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['ray'] = None; from wam.app.cli import main; "
                               f"sys.argv = ['wam', 'train', {str(config)!r}, '--launcher', 'ray']; main()"],
        capture_output=True, text=True, timeout=120)
    message = " ".join(missing.stderr.split())
    assert missing.returncode == 2 and "training.launcher=ray needs Ray Train" in message, missing.stderr
    assert not (load_config(config).run_dir / "train.log").exists()  # nothing was started


@pytest.mark.slow  # here rather than in test_benchmarks: one module, one worker, one Ray cluster at a time
def test_launchers_benchmark_smoke(tmp_path):
    data = run_benchmark("launchers.py", tmp_path, "--quick")
    assert [r["launcher"] for r in data["runs"]] == ["torchrun", "ray"]
    assert all(r["startup_s"] > 0 and r["step_s"] > 0 for r in data["runs"])
    assert set(data["ray_over_torchrun"]) == {"startup_s", "step_s"}
