"""The operator's decisions, as a pure function: (TrainJob, what exists) -> (what to create, patch, delete;
the new status). Level-triggered: it looks only at the current state, never at which event woke it, so
running it twice, or after an operator restart, plans nothing new.

Rules that Kubeflow Trainer / JobSet users asked for:
- restarts are counted in the TrainJob's status, never in a child that a restart recreates;
- with Kueue, Kueue owns the JobSet's `suspend`: the operator creates the JobSet suspended and never
  touches that field again (suspending a queued job goes through the Workload's `spec.active`);
- a Succeeded or Failed TrainJob never gets training children again;
- the phase says Queued / Running / Restarting with the reason, and progress comes from the job itself.
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass, field

from wam.operators import builders, gang, handoff, kube, placement
from wam.operators.progress import TrainingReport, run_url
from wam.operators.settings import OperatorSettings
from wam.operators.status import TERMINAL_PHASES, is_true, job_state, set_condition, workload_admission
from wam.operators.training_child import started, training_child
from wam.platform.checkpoints import quantized_uri
from wam.platform.config import WamConfig
from wam.platform.data_contract import action_embodiments
from wam.platform.embodiment import SYNTHETIC_PROFILE
from wam.platform.trainjob import (
    CheckpointStatus,
    FailureStatus,
    ProgressStatus,
    QuantizedStatus,
    ServingStatus,
    TrackingStatus,
    TrainJob,
    TrainJobStatus,
    checkpoint_uri,
)


@dataclass
class Observed:
    """The children of one TrainJob (and the training job's own reports) as read just now."""

    child: dict | None = None  # the training child of the current attempt: JobSet, or RayJob (spec.launcher: ray)
    stale: list[str] = field(default_factory=list)  # training children of earlier attempts still present
    pods: list[dict] = field(default_factory=list)  # pods of the current attempt (read when it failed)
    workload: dict | None = None  # Kueue's Workload of the current child
    quantize_jobs: dict[int, dict] = field(default_factory=dict)  # checkpoint step -> Job
    deployment: dict | None = None
    service: dict | None = None
    report: TrainingReport | None = None
    checkpoint: CheckpointStatus | None = None


@dataclass
class Plan:
    status: TrainJobStatus
    create: list[dict] = field(default_factory=list)
    patch: list[tuple[kube.Kind, str, dict]] = field(default_factory=list)
    delete: list[tuple[kube.Kind, str]] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def training_children(job: TrainJob, cfg: WamConfig, attempt: int, settings: OperatorSettings) -> list[dict]:
    """Everything one attempt needs, in creation order (the training child last: its pods mount the others)."""
    child = training_child(job)
    obj = child.build(job, attempt, settings)
    children = [builders.config_map(job, cfg)]
    if placement.profile(job, settings).nvlink_domain:
        children.append(placement.compute_domain(job, builders.metadata(job, placement.compute_domain_name(job),
                                                                         "nvlink")))
    if (group := child.pod_group(obj, job, settings)) is not None:
        children.append(group)
    if job.spec.suspend and not gang.kueue_owns_suspend(job, settings):
        obj["spec"]["suspend"] = True
    return [*children, obj]


def invalid(status: TrainJobStatus, generation: int, message: str, now: str) -> TrainJobStatus:
    """The status of a TrainJob whose spec cannot run: Failed, with what to change."""
    status = copy.deepcopy(status)
    status.phase, status.observed_generation = "Failed", generation
    if status.last_failure is None or status.last_failure.message != message:
        status.last_failure = FailureStatus(reason="InvalidSpec", message=message, time=now)
    set_condition(status, "Failed", True, "InvalidSpec", message, now, generation)
    return status


def plan(job: TrainJob, cfg: WamConfig, seen: Observed, settings: OperatorSettings, now: str) -> Plan:
    st = copy.deepcopy(job.status)
    if st.phase == "Failed" and st.last_failure and st.last_failure.reason == "InvalidSpec" and not started(st):
        st = TrainJobStatus(restarts=st.restarts)  # the spec was fixed: start over (nothing ran yet)
    st.observed_generation = job.generation
    p = Plan(status=st)
    if st.phase not in TERMINAL_PHASES:
        _training(job, cfg, seen, settings, now, p)
    _report(job, cfg, seen, settings, now, p)
    _handoff(job, cfg, seen, settings, now, p)
    return p


def _training(job: TrainJob, cfg: WamConfig, seen: Observed, settings: OperatorSettings, now: str, p: Plan) -> None:
    st, gen, child = p.status, job.generation, training_child(job)
    kind, current = child.kind, builders.attempt_name(job, st.attempt)
    for stale in seen.stale:
        p.delete.append((kind, stale))
    deadline = job.spec.active_deadline_seconds
    if deadline and st.start_time and _seconds_between(st.start_time, now) > deadline:
        if seen.child is not None:
            p.delete.append((kind, current))
        _fail(p, FailureStatus("DeadlineExceeded", f"ran longer than activeDeadlineSeconds={deadline}", now), now, gen)
        return
    if seen.child is None:
        if started(st) == current:
            p.events.append(("Warning", f"{kind.kind}Missing", f"{kind.kind} {current} disappeared; creating it again"))
        _start_attempt(job, cfg, settings, now, p)
        return
    state, message = child.state(seen.child)
    kueue = gang.kueue_owns_suspend(job, settings)
    if kueue and seen.workload is not None and seen.workload["spec"].get("active", True) == job.spec.suspend:
        p.patch.append((kube.WORKLOAD, seen.workload["metadata"]["name"], {"spec": {"active": not job.spec.suspend}}))
    if not kueue and bool(seen.child["spec"].get("suspend")) != job.spec.suspend and state in ("suspended",
                                                                                                "starting", "running"):
        p.patch.append((kind, current, {"spec": {"suspend": job.spec.suspend}}))
    if state == "completed":
        st.phase, st.completion_time = "Succeeded", now
        set_condition(st, "Running", False, "Completed", "training finished", now, gen)
        set_condition(st, "Succeeded", True, "TrainingComplete", message or f"{cfg.training.steps} steps done", now, gen)
        p.events.append(("Normal", "Succeeded", "training finished"))
    elif state == "failed":
        failure = child.classify_failure(seen.child, seen.pods)
        failure.time = now
        st.last_failure = failure
        policy = job.spec.failure_policy
        if failure.reason in policy.restart_on and st.restarts < policy.max_restarts:
            st.restarts += 1
            p.delete.append((kind, current))
            if (group_kind := child.pod_group_kind(job, settings)) is not None:
                p.delete.append((group_kind, current))
            st.attempt += 1
            set_condition(st, "Restarting", True, failure.reason,
                          f"restart {st.restarts}/{policy.max_restarts} from the newest checkpoint: {failure.message}",
                          now, gen)
            set_condition(st, "Running", False, failure.reason, failure.message, now, gen)
            p.events.append(("Warning", "Restarting", f"{failure.reason}: {failure.message}"))
            _start_attempt(job, cfg, settings, now, p, phase="Restarting")
        else:
            why = "not restartable by spec.failurePolicy.restartOn" if failure.reason not in policy.restart_on \
                else f"no restarts left ({st.restarts}/{policy.max_restarts})"
            failure.message = f"{failure.message} ({why})"
            _fail(p, failure, now, gen)
    elif state == "suspended":
        if job.spec.suspend:
            st.phase = "Suspended"
            set_condition(st, "Suspended", True, "SuspendedBySpec", "spec.suspend is true", now, gen)
        else:
            st.phase = "Queued"
            set_condition(st, "Suspended", False, "NotSuspended", "", now, gen)
            admitted, why = workload_admission(seen.workload) if kueue else (False, f"{kind.kind} is suspended")
            set_condition(st, "Admitted", admitted, "Queued" if not admitted else "Admitted",
                          f"queue {gang.queue(job, settings)}: {why}" if not admitted else "", now, gen)
        set_condition(st, "Running", False, "Suspended", "", now, gen)
    else:
        set_condition(st, "Suspended", False, "Admitted", "", now, gen)
        if kueue or gang.backend(job, settings) != "none":
            set_condition(st, "Admitted", True, "Admitted", f"gang of {job.spec.resources.nodes} node(s) admitted",
                          now, gen)
        if state == "running":
            if st.phase != "Running":
                p.events.append(("Normal", "Running", f"all {job.spec.resources.nodes} node(s) running"))
            st.phase = "Running"
            set_condition(st, "Running", True, "AllNodesReady", f"{job.spec.resources.nodes} node(s) ready", now, gen)
            set_condition(st, "Restarting", False, "Running", "", now, gen)
        elif st.phase not in ("Restarting",):
            st.phase = "Pending"
            set_condition(st, "Running", False, "PodsStarting", "waiting for every node's pod to be ready", now, gen)


def _start_attempt(job: TrainJob, cfg: WamConfig, settings: OperatorSettings, now: str, p: Plan,
                   phase: str = "Pending") -> None:
    st, child = p.status, training_child(job)
    p.create.extend(training_children(job, cfg, st.attempt, settings))
    name = builders.attempt_name(job, st.attempt)
    setattr(st, child.status_field, name)
    st.phase = "Suspended" if job.spec.suspend else phase
    st.start_time = st.start_time or now
    set_condition(st, "Created", True, f"{child.kind.kind}Created", f"{child.kind.kind} {name}", now, job.generation)


def _fail(p: Plan, failure: FailureStatus, now: str, gen: int) -> None:
    st = p.status
    st.phase, st.last_failure, st.completion_time = "Failed", failure, now
    set_condition(st, "Running", False, failure.reason, failure.message, now, gen)
    set_condition(st, "Restarting", False, failure.reason, "", now, gen)
    set_condition(st, "Failed", True, failure.reason, failure.message, now, gen)
    p.events.append(("Warning", "Failed", f"{failure.reason}: {failure.message}"))


def _seconds_between(start: str, end: str) -> float:
    return (datetime.datetime.fromisoformat(end) - datetime.datetime.fromisoformat(start)).total_seconds()


def _report(job: TrainJob, cfg: WamConfig, seen: Observed, settings: OperatorSettings, now: str, p: Plan) -> None:
    st = p.status
    if (r := seen.report) is not None:
        total = cfg.training.steps
        step = r.step if r.step is not None else (st.progress.step if st.progress else 0)
        st.progress = ProgressStatus(step=step, total_steps=total, summary=f"{step}/{total}", loss=r.loss,
                                     tokens_per_second=r.tokens_per_second, updated=r.updated)
        st.mlflow = TrackingStatus(run_id=r.run_id, url=run_url(settings.mlflow.external_url, r))
    ck = seen.checkpoint
    if ck is not None and (st.checkpoint is None or ck.step > st.checkpoint.step):
        st.checkpoint = ck
        set_condition(st, "Checkpointed", True, "CheckpointComplete", f"step {ck.step} at {ck.uri}", now,
                      job.generation)
        p.events.append(("Normal", "Checkpointed", f"complete checkpoint at step {ck.step}: {ck.uri}"))


def _handoff(job: TrainJob, cfg: WamConfig, seen: Observed, settings: OperatorSettings, now: str, p: Plan) -> None:
    st, gen, mode = p.status, job.generation, job.spec.handoff.quantize
    folder = checkpoint_uri(job, settings.platform())
    for step, qjob in sorted(seen.quantize_jobs.items()):
        state, message = job_state(qjob)
        newer = st.quantized is None or step > st.quantized.step
        if state == "succeeded" and newer:
            st.quantized = QuantizedStatus(step=step, uri=quantized_uri(folder, step),
                                           job=qjob["metadata"]["name"])
            set_condition(st, "Quantized", True, "Quantized", f"NVFP4 model of step {step}: {st.quantized.uri}",
                          now, gen)
            p.events.append(("Normal", "Quantized", f"step {step} -> {st.quantized.uri}"))
        elif state == "failed" and newer:
            set_condition(st, "Quantized", False, "QuantizationFailed", f"step {step}: {message}", now, gen)
    wanted = st.checkpoint is not None and (mode == "every" or (mode == "final" and st.phase == "Succeeded"))
    busy = any(job_state(j)[0] == "active" for j in seen.quantize_jobs.values())
    if wanted and st.checkpoint.step not in seen.quantize_jobs and not busy and \
            (st.quantized is None or st.quantized.step < st.checkpoint.step):
        ck = st.checkpoint
        out = quantized_uri(folder, ck.step)
        p.create.append(handoff.quantize_job(job, ck.step, ck.uri, out, settings))
        set_condition(st, "Quantized", False, "Quantizing", f"quantizing step {ck.step}", now, gen)
    serving = job.spec.handoff.serving
    if not serving.replicas or st.quantized is None:
        return
    if seen.service is None:
        p.create.append(handoff.serving_service(job, settings))
    wanted_dep = handoff.serving_deployment(job, cfg, st.quantized.step, st.quantized.uri, settings)
    serving_step = st.quantized.step
    if seen.deployment is None:
        p.create.append(wanted_dep)
        ready = 0
    else:
        labels = seen.deployment["spec"]["template"]["metadata"].get("labels") or {}
        serving_step = int(labels.get(handoff.STEP_LABEL, 0))
        if serving_step != st.quantized.step:
            p.patch.append((kube.DEPLOYMENT, wanted_dep["metadata"]["name"], {"spec": wanted_dep["spec"]}))
            p.events.append(("Normal", "ServingRolled", f"rolling the policy server to step {st.quantized.step}"))
        ready = (seen.deployment.get("status") or {}).get("readyReplicas", 0)
    st.serving = ServingStatus(endpoint=handoff.endpoint(job, settings),
                               embodiments=list(action_embodiments(cfg)) or [SYNTHETIC_PROFILE.name],
                               step=serving_step, ready_replicas=ready)
    serving_ok = ready > 0 and serving_step == st.quantized.step
    if serving_ok and not is_true(st, "Serving"):
        p.events.append(("Normal", "Serving", st.serving.endpoint))
    set_condition(st, "Serving", serving_ok, "PolicyServerReady" if serving_ok else "Rolling",
                  f"{ready}/{serving.replicas} replica(s) ready, step {serving_step}", now, gen)


