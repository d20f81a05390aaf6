"""Prometheus metrics of the operator: reconciliations (count, latency, CPU time, errors) and TrainJobs by phase."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

from wam.platform.trainjob import PHASES

RECONCILES = Counter("wam_operator_reconciles_total", "TrainJob reconciliations, by result.", ["result"])
RECONCILE_SECONDS = Histogram("wam_operator_reconcile_seconds", "Duration of one TrainJob reconciliation.",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RECONCILE_CPU_SECONDS = Histogram("wam_operator_reconcile_cpu_seconds",
                                  "CPU time of one TrainJob reconciliation (its thread's, lock waits and I/O excluded).",
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
TRAINJOBS = Gauge("wam_operator_trainjobs", "TrainJobs known to this operator, by phase.", ["phase"])

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def _publish() -> None:
    counts = dict.fromkeys(PHASES, 0)
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        TRAINJOBS.labels(phase=phase).set(count)


def observe_phase(namespace: str, name: str, phase: str) -> None:
    with _lock:
        _phases[(namespace, name)] = phase
        _publish()


def forget(namespace: str, name: str) -> None:
    with _lock:
        _phases.pop((namespace, name), None)
        _publish()
