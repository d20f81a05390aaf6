"""Operator latency: time from TrainJob creation to its JobSet's creation, against the emulated API.

The real operator process (kopf, `python -m wam.operators`) runs against wam.operators.testing's emulated
API server. First the baseline: TrainJobs created one at a time on an idle operator. Then the burst: N
TrainJobs created at once (N threads). Reported: p50/p99 of each, and their ratio (both measured in the
same run, on the same machine). Both instants are stamped by the emulated API server when it receives
the create request, so no polling adds to the numbers.

    python benchmarks/operator_latency.py [--jobs 100] [--baseline 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from wam.operators import kube
from wam.operators.testing import EmulatedCluster
from wam.platform import trainjob

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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(latencies: list[float]) -> dict:
    ms = [v * 1000 for v in latencies]
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1), "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--baseline", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, EmulatedCluster() as cluster:
        settings = Path(tmp) / "settings.yaml"
        settings.write_text(yaml.safe_dump({"checkpointBase": f"{tmp}/checkpoints", "progressIntervalSeconds": 60}))
        operator = cluster.start_operator(settings, Path(tmp) / "operator.log")
        try:
            def create(name: str) -> None:
                cluster.kube.create(manifest(name))

            def latencies(names: list[str], timeout: float) -> list[float]:
                done = wait_for_jobsets(cluster, names, timeout)
                return [done[n] - cluster.created_at(kube.TRAINJOB, NS, n) for n in names]

            create("warmup")  # the first reconciliation waits for kopf to start watching
            wait_for_jobsets(cluster, ["warmup"], timeout=120)
            baseline = [f"single-{i}" for i in range(args.baseline)]
            single = []
            for name in baseline:
                create(name)
                single += latencies([name], timeout=60)
            burst = [f"burst-{i}" for i in range(args.jobs)]
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                list(pool.map(create, burst))
            result = {"one_at_a_time": summary(single), f"{args.jobs}_concurrent": summary(latencies(burst, 600))}
        finally:
            operator.terminate()
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:  # kopf stops each of its timers in turn
                operator.kill()
    concurrent = result[f"{args.jobs}_concurrent"]
    result["p50_ratio_concurrent_vs_single"] = round(concurrent["p50_ms"] / result["one_at_a_time"]["p50_ms"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
