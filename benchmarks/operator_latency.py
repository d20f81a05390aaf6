"""Operator latency and cost: time from TrainJob creation to its JobSet's creation, against the emulated API,
and what each new TrainJob costs the API server and the operator's CPU.

The real operator process (kopf, `python -m wam.operators`) runs against wam.operators.testing's emulated
API server. First the baseline: TrainJobs created one at a time on an idle operator. Then the burst: N
TrainJobs created at once (N threads). Reported: p50/p99 of each, and their ratio (both measured in the
same run, on the same machine). Both instants are stamped by the emulated API server when it receives
the create request, so no polling adds to the numbers. The burst's cost per new TrainJob: the API requests
the emulated server served (by action and resource, the benchmark's own creates left out), reconciliations
and their CPU time (the operator's metrics), and the CPU time of the operator and of the emulated server's
process (which also runs the benchmark's clients).

Then progress polling with N running jobs (`--running`), against a real MLflow server and a real S3 server
(moto): every job has a RUNNING MLflow run with metrics and two complete checkpoints; the requests each
server logged per progress interval ("tick"), next to what reading each job by itself costs (what the
operator did before: get-by-name + a search per job, and a listing per checkpoint folder plus one request per
step folder and per manifest), both counted at the same servers in the same run.

    python benchmarks/operator_latency.py [--jobs 100] [--baseline 10] [--workers 16] [--running 100] [--json F]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import requests
import yaml
from moto.server import ThreadedMotoServer
from prometheus_client.parser import text_string_to_metric_families

from wam.operators import kube, progress
from wam.operators.testing import EmulatedCluster
from wam.platform import checkpoints, trainjob
from wam.platform.launch import free_port
from wam.platform.tracking import JOB_TAG

NS = "bench"


BUCKET = "bench-checkpoints"
EXPERIMENT = "fleet"


def manifest(name: str, gang: str | None = None) -> dict:
    return {"apiVersion": trainjob.API_VERSION, "kind": trainjob.KIND, "metadata": {"name": name, "namespace": NS},
            "spec": {"model": {"preset": "tiny"}, "config": {"data": {"source": "synthetic"}},
                     "resources": {"accelerator": "h100", "nodes": 2, "gpusPerNode": 1},
                     "handoff": {"quantize": "never"}, "tracking": {"experiment": EXPERIMENT},
                     **({"scheduling": {"gang": gang}} if gang else {})}}


def wait_for_jobsets(cluster: EmulatedCluster, names: list[str], timeout: float) -> dict[str, float]:
    """When each TrainJob's first JobSet reached the API server (stamped by the emulated server itself)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {n: cluster.created_at(kube.JOBSET, NS, f"{n}-0") for n in names}
        if all(seen.values()):
            return seen
        if time.monotonic() > deadline:
            raise SystemExit(f"{sum(v is None for v in seen.values())} TrainJobs got no JobSet within {timeout} s")
        time.sleep(0.01)


def wait_quiet(cluster: EmulatedCluster, quiet: float = 1.0, timeout: float = 120) -> dict[tuple[str, str], int]:
    """The API server's request counts once no request came for `quiet` seconds (the burst has settled)."""
    deadline, last, since = time.monotonic() + timeout, cluster.api_calls(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.2)
        now = cluster.api_calls()
        if now != last:
            last, since = now, time.monotonic()
    return last


def operator_metrics(port: int) -> dict[str, float]:
    """The operator's reconciliations, their CPU time, and its process's CPU time (Prometheus /metrics)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
               if not s.labels or s.name == "wam_operator_reconciles_total"}
    return {"reconciles": samples.get("wam_operator_reconciles_total", 0.0),
            "reconcile_cpu_s": samples["wam_operator_reconcile_cpu_seconds_sum"],
            "process_cpu_s": samples["process_cpu_seconds_total"]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(latencies: list[float]) -> dict:
    ms = [v * 1000 for v in latencies]
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1), "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1)}


def latency(args: argparse.Namespace, tmp: Path) -> dict:
    settings = tmp / "settings.yaml"
    settings.write_text(yaml.safe_dump({"checkpointBase": f"{tmp}/checkpoints", "progressIntervalSeconds": 60,
                                        "workers": args.workers}))
    port = free_port()
    with EmulatedCluster() as cluster:
        operator = cluster.start_operator(settings, tmp / "operator.log", metrics_port=port)
        try:
            def create(name: str) -> None:
                cluster.kube.create(manifest(name))

            def latencies(names: list[str], timeout: float) -> list[float]:
                done = wait_for_jobsets(cluster, names, timeout)
                return [done[n] - cluster.created_at(kube.TRAINJOB, NS, n) for n in names]

            create("warmup")  # the first reconciliation waits for kopf to start watching
            wait_for_jobsets(cluster, ["warmup"], timeout=120)
            single = []
            for name in [f"single-{i}" for i in range(args.baseline)]:
                create(name)
                single += latencies([name], timeout=60)
            calls_before, ops_before = wait_quiet(cluster), operator_metrics(port)
            cpu_before = time.process_time()
            burst = [f"burst-{i}" for i in range(args.jobs)]
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                list(pool.map(create, burst))
            concurrent = summary(latencies(burst, 600))
            calls = Counter(wait_quiet(cluster)) - Counter(calls_before)
            emulator_cpu, ops = time.process_time() - cpu_before, operator_metrics(port)
        finally:
            operator.terminate()
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:  # kopf stops each of its timers in turn
                operator.kill()
    calls[("create", "trainjobs")] -= args.jobs  # the benchmark's own
    per_job = {f"{action} {resource}": round(n / args.jobs, 2) for (action, resource), n in sorted(calls.items()) if n}
    reconciles = ops["reconciles"] - ops_before["reconciles"]
    return {
        "workers": args.workers, "one_at_a_time": summary(single), f"{args.jobs}_concurrent": concurrent,
        "p50_ratio_concurrent_vs_single": round(concurrent["p50_ms"] / statistics.median(single) / 1000, 2),
        "p99_ratio_concurrent_vs_single": round(concurrent["p99_ms"] / percentile(single, 99) / 1000, 2),
        "per_new_trainjob": {
            "api_requests": round(sum(calls.values()) / args.jobs, 2), "api_requests_by_kind": per_job,
            "reconciles": round(reconciles / args.jobs, 2),
            "operator_cpu_ms": round((ops["process_cpu_s"] - ops_before["process_cpu_s"]) / args.jobs * 1000, 1),
            "emulated_api_process_cpu_ms": round(emulator_cpu / args.jobs * 1000, 1)},
        "cpu_ms_per_reconcile": round((ops["reconcile_cpu_s"] - ops_before["reconcile_cpu_s"]) / reconciles * 1000, 1),
    }


class RequestLog(logging.Handler):
    """Counts the requests a werkzeug server (moto's) logs."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def mlflow_requests(log: Path) -> int:
    """API requests in the MLflow server's access log so far."""
    return sum('"GET /api/' in line or '"POST /api/' in line for line in log.read_text().splitlines())


def start_mlflow(tmp: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """A real MLflow server (sqlite store); `wait_up` waits until it answers."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts"),
         "--workers", "1"], stdout=log.open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    return server, f"http://127.0.0.1:{port}"


def wait_up(uri: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the MLflow server did not start; see {log}")
        time.sleep(0.5)


def seed_jobs(names: list[str], uri: str) -> None:
    """What N training jobs would have written: a RUNNING MLflow run with metrics at step 10, and complete
    checkpoints at steps 5 and 10 (a data file and its manifest each)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(EXPERIMENT)
    stamp = int(time.time() * 1000)
    for name in names:
        run_name = f"{NS}.{name}"
        run = client.create_run(exp, run_name=run_name, tags={JOB_TAG: run_name}).info.run_id
        client.log_batch(run, metrics=[Metric("loss", 0.5, stamp, 10), Metric("tokens_per_s", 1e4, stamp, 10)])
        for step in (5, 10):
            folder = checkpoints.step_dir(f"s3://{BUCKET}/{NS}/{name}", step)
            with fsspec.open(f"{folder}/__0_0.distcp", "wb") as f:
                f.write(b"weights")
            checkpoints.write_manifest(folder, step, {}, {"loss": 0.5}, threads=1)


def polling(args: argparse.Namespace, tmp: Path) -> dict:
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    s3_log = RequestLog()
    logging.getLogger("werkzeug").addHandler(s3_log)
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    fs = fsspec.filesystem("s3")
    fs.mkdir(BUCKET)
    mlflow_log = tmp / "mlflow.log"
    mlflow, uri = start_mlflow(tmp, mlflow_log)
    names = [f"run-{i}" for i in range(args.running)]
    settings = tmp / "polling.yaml"
    settings.write_text(yaml.safe_dump({"checkpointBase": f"s3://{BUCKET}", "progressIntervalSeconds": args.interval,
                                        "mlflow": {"trackingUri": uri}}))
    try:
        wait_up(uri, mlflow_log)
        seed_jobs(names, uri)
        with EmulatedCluster() as cluster:
            operator = cluster.start_operator(settings, tmp / "polling-operator.log", env)
            try:
                for name in names:
                    cluster.kube.create(manifest(name, gang="none"))
                wait_for_jobsets(cluster, names, 600)
                for name in names:  # the JobSet controller's part: every node's pod ready
                    js = cluster.kube.get(kube.JOBSET, NS, f"{name}-0")
                    ready = [{"name": r["name"], "ready": r.get("replicas", 1)} for r in js["spec"]["replicatedJobs"]]
                    cluster.kube.patch(kube.JOBSET, NS, f"{name}-0", {"status": {"replicatedJobsStatus": ready}},
                                       subresource="status")
                deadline = time.monotonic() + 600
                while not all((st := (o.get("status") or {})).get("phase") == "Running"
                              and (st.get("progress") or {}).get("step") == 10 and (st.get("checkpoint") or {})
                              .get("step") == 10 for o in cluster.objects(kube.TRAINJOB, NS).values()):
                    if time.monotonic() > deadline:
                        raise SystemExit("not every job showed its progress and checkpoint within 600 s")
                    time.sleep(0.5)
                time.sleep(args.interval)  # past the ticks that first read the checkpoints
                before = (mlflow_requests(mlflow_log), s3_log.count, sum(cluster.api_calls().values()))
                time.sleep(args.interval * args.ticks)
                after = (mlflow_requests(mlflow_log), s3_log.count, sum(cluster.api_calls().values()))
            finally:
                operator.terminate()
                operator.wait(60)
        batched = [(a - b) / args.ticks for a, b in zip(after, before, strict=True)]
        # The alternative, against the same servers: every job read by itself, as the operator did before.
        api = f"{uri}/api/2.0/mlflow"
        before = (mlflow_requests(mlflow_log), s3_log.count)
        for name in names:
            progress.search_runs(api, progress.experiment_id(api, EXPERIMENT), f"tags.`{JOB_TAG}` = '{NS}.{name}'")
            _, newest = checkpoints.latest_complete(f"s3://{BUCKET}/{NS}/{name}")
            checkpoints.read_manifest(newest)
        time.sleep(1)  # the server's access log is written after each response
        per_job = [mlflow_requests(mlflow_log) - before[0], s3_log.count - before[1]]
    finally:
        mlflow.terminate()
        mlflow.wait(60)
        s3.stop()
    return {"running_jobs": args.running, "interval_s": args.interval, "ticks": args.ticks,
            "mlflow_requests_per_tick": {"batched": round(batched[0], 1), "each_job_by_itself": per_job[0]},
            "object_store_requests_per_tick": {"batched": round(batched[1], 1), "each_job_by_itself": per_job[1]},
            "kubernetes_api_requests_per_tick": round(batched[2], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--baseline", type=int, default=10)
    parser.add_argument("--workers", type=int, default=16, help="the operator's settings.workers")
    parser.add_argument("--running", type=int, default=100, help="running jobs whose progress is polled (0: skip)")
    parser.add_argument("--interval", type=float, default=3.0, help="progressIntervalSeconds while polling")
    parser.add_argument("--ticks", type=int, default=5, help="intervals counted")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = latency(args, Path(tmp))
        if args.running:  # after the latency runs, so that the MLflow server's start does not share their CPU
            result["progress_polling"] = polling(args, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
