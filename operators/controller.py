"""One reconciliation of one TrainJob: read the children and the job's reports, plan (pure), then apply the
plan and write the status. Serialized per TrainJob; different TrainJobs reconcile in parallel."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict

from wam.operators import builders, gang, handoff, kube, metrics, progress
from wam.operators.reconcile import Observed, Plan, invalid, now_iso, plan
from wam.operators.settings import OperatorSettings
from wam.operators.status import TERMINAL_PHASES
from wam.operators.training_child import started, training_child
from wam.platform import trainjob
from wam.platform.apischema import to_api
from wam.platform.config import WamConfig
from wam.platform.data_contract import check_datasets
from wam.platform.errors import ConfigError
from wam.platform.trainjob import TrainJob, TrainJobStatus

log = logging.getLogger("wam.operator")


class Controller:
    def __init__(self, client: kube.Kube, settings: OperatorSettings):
        self.kube, self.settings, self.platform = client, settings, settings.platform()
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._read_at: dict[tuple[str, str], float] = {}
        self.progress = progress.ProgressReader(settings.mlflow.tracking_uri, settings.progress_interval_seconds)
        # The training config of a job is validated and rendered (~20 ms) once per spec generation.
        self._configs: dict[tuple[str, str], tuple[str, int, WamConfig]] = {}

    def reconcile(self, namespace: str, name: str) -> str | None:
        """Reconcile the TrainJob as it is now (read again under its lock, so a stale event cannot act on an
        old status twice); its phase, or None when it is gone."""
        with self._locks[(namespace, name)], metrics.RECONCILE_SECONDS.time():
            cpu = time.thread_time()
            try:
                obj = self.kube.get(kube.TRAINJOB, namespace, name)
                if obj is None or obj["metadata"].get("deletionTimestamp"):
                    metrics.forget(namespace, name)
                    self._read_at.pop((namespace, name), None)
                    if (cached := self._configs.pop((namespace, name), None)) is not None:
                        self.progress.forget(cached[2].checkpoint.uri)
                    return None
                phase = self._reconcile(obj)
            except Exception:
                metrics.RECONCILES.labels(result="error").inc()
                raise
            finally:
                metrics.RECONCILE_CPU_SECONDS.observe(time.thread_time() - cpu)
            metrics.RECONCILES.labels(result="ok").inc()
            metrics.observe_phase(namespace, name, phase)
            return phase

    def _reconcile(self, obj: dict) -> str:
        meta, now = obj["metadata"], now_iso()
        try:
            job = trainjob.parse(obj)
            cfg = self._training_config(job)
        except ConfigError as err:
            status = trainjob.parse_status(obj.get("status") or {})
            if started(status):  # it ran before: a spec edit cannot take back what was started
                log.warning("TrainJob %s/%s: %s", meta["namespace"], meta["name"], err)
                return status.phase
            new = invalid(status, meta.get("generation", 1), str(err), now)
            if self._write_status(obj, new):
                self._event(obj, "Warning", "InvalidSpec", str(err))
            return new.phase
        p = plan(job, cfg, self.observe(job), self.settings, now)
        self._apply(job, p)
        self._write_status(obj, p.status)
        for type_, reason, message in p.events:
            self._event(obj, type_, reason, message)
        return p.status.phase

    def _training_config(self, job: TrainJob) -> WamConfig:
        key, version = (job.namespace, job.name), (job.uid, job.generation)
        cached = self._configs.get(key)
        if cached is not None and cached[:2] == version:
            return cached[2]
        cfg = trainjob.training_config(job, self.platform)
        check_datasets(cfg, skip_unreadable=True)  # what the pods' own check would refuse, refused before they start
        self._configs[key] = (*version, cfg)
        return cfg

    # -- reading --------------------------------------------------------------------------------------

    def observe(self, job: TrainJob) -> Observed:
        ns, st = job.namespace, job.status
        seen = Observed()
        current, child_kind = builders.attempt_name(job, st.attempt), training_child(job)
        for child in self.kube.list(child_kind.kind, ns, {builders.JOB_LABEL: job.name}):
            if child["metadata"]["name"] == current:
                seen.child = child
            elif not child["metadata"].get("deletionTimestamp"):
                seen.stale.append(child["metadata"]["name"])
        state = child_kind.state(seen.child)[0] if seen.child else None
        running = st.phase not in TERMINAL_PHASES
        if running and state == "failed":
            seen.pods = self.kube.list(kube.POD, ns, child_kind.pod_selector(job, st.attempt))
        if running and seen.child and gang.kueue_owns_suspend(job, self.settings):
            uid = seen.child["metadata"].get("uid", "")
            workloads = self.kube.list(kube.WORKLOAD, ns, {gang.KUEUE_JOB_UID_LABEL: uid}) if uid else []
            seen.workload = workloads[0] if workloads else None
        if job.spec.handoff.quantize != "never":
            for qjob in self.kube.list(kube.JOB, ns, {builders.JOB_LABEL: job.name,
                                                       builders.COMPONENT_LABEL: handoff.QUANTIZE_COMPONENT}):
                seen.quantize_jobs[int(qjob["metadata"]["labels"][handoff.STEP_LABEL])] = qjob
        if job.spec.handoff.serving.replicas:
            name = handoff.serving_name(job)
            seen.deployment = self.kube.get(kube.DEPLOYMENT, ns, name)
            seen.service = self.kube.get(kube.SERVICE, ns, name)
        finishing = running and state in ("completed", "failed")
        if finishing or (running and self._due(job)):
            self._read_reports(job, seen, final=finishing)
        return seen

    def _due(self, job: TrainJob) -> bool:
        last = self._read_at.get((job.namespace, job.name), 0.0)
        return time.monotonic() - last >= self.settings.progress_interval_seconds

    def _read_reports(self, job: TrainJob, seen: Observed, final: bool) -> None:
        """Progress from the MLflow run (`final`: the job's own numbers, else the batch of its experiment's
        running runs) and the newest complete checkpoint; an unreachable store leaves the status as it was
        (and is logged), it never fails the reconciliation."""
        self._read_at[(job.namespace, job.name)] = time.monotonic()
        try:
            seen.report = self.progress.report(job.spec.tracking.experiment, job.run_name, final)
        except Exception as err:  # noqa: BLE001 - tracking is advisory
            log.warning("TrainJob %s/%s: MLflow unreadable: %s", job.namespace, job.name, err)
        try:
            seen.checkpoint = self.progress.checkpoint(trainjob.checkpoint_uri(job, self.platform))
        except Exception as err:  # noqa: BLE001 - storage hiccups must not stop reconciling
            log.warning("TrainJob %s/%s: checkpoints unreadable: %s", job.namespace, job.name, err)

    # -- writing --------------------------------------------------------------------------------------

    def _apply(self, job: TrainJob, p: Plan) -> None:
        ns = job.namespace
        for kind, name in p.delete:
            if self.kube.delete(kind, ns, name):
                log.info("TrainJob %s/%s: deleted %s %s", ns, job.name, kind.kind, name)
        for obj in p.create:
            if self.kube.create(obj):
                log.info("TrainJob %s/%s: created %s %s", ns, job.name, obj["kind"], obj["metadata"]["name"])
        for kind, name, patch in p.patch:
            self.kube.patch(kind, ns, name, patch)
            log.info("TrainJob %s/%s: patched %s %s", ns, job.name, kind.kind, name)

    def _write_status(self, obj: dict, status: TrainJobStatus) -> bool:
        """Patch the status subresource when it changed (keys that went away are removed); True if it did."""
        meta = obj["metadata"]
        old, new = obj.get("status") or {}, to_api(status)
        if new == old:
            return False
        patch = {**{key: None for key in old if key not in new}, **new}
        self.kube.patch(kube.TRAINJOB, meta["namespace"], meta["name"], {"status": patch}, subresource="status")
        return True

    def _event(self, obj: dict, type_: str, reason: str, message: str) -> None:
        meta, now = obj["metadata"], now_iso()
        log.info("TrainJob %s/%s: %s: %s", meta["namespace"], meta["name"], reason, message)
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid", "")},
            "type": type_, "reason": reason, "message": message[:1024], "firstTimestamp": now,
            "lastTimestamp": now, "count": 1, "source": {"component": builders.MANAGED_BY},
        }
        try:
            self.kube.create(event)
        except Exception as err:  # noqa: BLE001 - events are best effort
            log.debug("event not recorded: %s", err)
