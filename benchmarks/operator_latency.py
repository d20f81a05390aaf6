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

    python benchmarks/operator_latency.py [--jobs 100] [--baseline 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from wam.operators import kube
from wam.operators.testing import EmulatedCluster
from wam.platform import trainjob
from wam.platform.launch import free_port

NS = "bench"


def manifest(name: str) -> dict:
    return {"apiVersion": trainjob.API_VERSION, "kind": trainjob.KIND, "metadata": {"name": name, "namespace": NS},
            "spec": {"model": {"preset": "tiny"}, "config": {"data": {"source": "synthetic"}},
                     "resources": {"accelerator": "h100", "nodes": 2, "gpusPerNode": 1},
                     "handoff": {"quantize": "never"}}}


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
    settings.write_text(yaml.safe_dump({"checkpointBase": f"{tmp}/checkpoints", "progressIntervalSeconds": 60}))
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
        "one_at_a_time": summary(single), f"{args.jobs}_concurrent": concurrent,
        "p50_ratio_concurrent_vs_single": round(concurrent["p50_ms"] / statistics.median(single) / 1000, 2),
        "p99_ratio_concurrent_vs_single": round(concurrent["p99_ms"] / percentile(single, 99) / 1000, 2),
        "per_new_trainjob": {
            "api_requests": round(sum(calls.values()) / args.jobs, 2), "api_requests_by_kind": per_job,
            "reconciles": round(reconciles / args.jobs, 2),
            "operator_cpu_ms": round((ops["process_cpu_s"] - ops_before["process_cpu_s"]) / args.jobs * 1000, 1),
            "emulated_api_process_cpu_ms": round(emulator_cpu / args.jobs * 1000, 1)},
        "cpu_ms_per_reconcile": round((ops["reconcile_cpu_s"] - ops_before["reconcile_cpu_s"]) / reconciles * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--baseline", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = latency(args, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
