"""Pure reading of statuses: conditions of the TrainJob, the state of a batch Job and of a Kueue Workload, and
why a failed attempt failed (from its pods' statuses; the operator never execs into pods). What the training
children's own statuses mean is theirs to say (wam.operators.jobset, wam.operators.rayjob)."""

from __future__ import annotations

from wam.platform import termination
from wam.platform.trainjob import Condition, FailureStatus, TrainJobStatus

TERMINAL_PHASES = ("Succeeded", "Failed")


def set_condition(status: TrainJobStatus, type_: str, value: bool, reason: str, message: str, now: str,
                  generation: int) -> None:
    """Add or update a condition; lastTransitionTime moves only when its status flips."""
    text = "True" if value else "False"
    for cond in status.conditions:
        if cond.type == type_:
            if cond.status != text:
                cond.last_transition_time = now
            cond.status, cond.reason, cond.message, cond.observed_generation = text, reason, message, generation
            return
    status.conditions.append(Condition(type=type_, status=text, reason=reason, message=message,
                                       last_transition_time=now, observed_generation=generation))


def is_true(status: TrainJobStatus, type_: str) -> bool:
    return any(c.type == type_ and c.status == "True" for c in status.conditions)


def true_condition(obj: dict, type_: str) -> dict | None:
    """The condition of `type_` of a Kubernetes object when it is True, else None."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def job_state(job: dict) -> tuple[str, str]:
    """(state, message) of a batch Job: succeeded, failed or active."""
    if true_condition(job, "Complete"):
        return "succeeded", ""
    if cond := true_condition(job, "Failed"):
        return "failed", cond.get("message", "") or cond.get("reason", "")
    return "active", ""


def workload_admission(workload: dict | None) -> tuple[bool, str]:
    """(admitted, why not) of a Kueue Workload, from its QuotaReserved / Admitted conditions."""
    if workload is None:
        return False, "waiting for Kueue to create the Workload"
    if true_condition(workload, "Admitted"):
        return True, ""
    for cond in (workload.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("QuotaReserved", "Admitted") and cond.get("message"):
            return False, cond["message"]
    return False, "pending in the queue"


def classify_failure(pods: list[dict], fallback: str) -> FailureStatus:
    """Why an attempt failed, by precedence: a process that reported invalid input (restarting cannot help),
    a disruption (node lost, preemption, eviction; the other ranks' errors are its consequence), an OOM
    kill, else an error. `fallback` is the training child's own message, for when no pod tells more."""
    found: dict[str, str] = {}
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        if status.get("reason") == "Evicted":
            found.setdefault("Disruption", f"pod {name} was evicted: {status.get('message', '')}".rstrip(": "))
        for cond in status.get("conditions") or []:
            if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
                found.setdefault("Disruption", f"pod {name}: {cond.get('reason', '')} {cond.get('message', '')}".strip())
        for container in status.get("containerStatuses") or []:
            ended = (container.get("state") or {}).get("terminated") or \
                (container.get("lastState") or {}).get("terminated")
            if not ended or ended.get("exitCode", 0) == 0:
                continue
            if ended.get("reason") == "OOMKilled":
                found.setdefault("OOMKilled", f"pod {name}: container {container['name']} ran out of memory")
                continue
            reported = termination.parse(ended.get("message"))
            if reported and reported[0] == termination.INVALID_INPUT:
                found.setdefault("InvalidInput", f"pod {name}: {reported[1]}")
            else:
                detail = reported[1] if reported else (ended.get("message") or "").strip()[-500:]
                found.setdefault("Error", f"pod {name} exited with code {ended.get('exitCode')}"
                                          + (f": {detail}" if detail else ""))
    for reason in ("InvalidInput", "Disruption", "OOMKilled", "Error"):
        if reason in found:
            return FailureStatus(reason=reason, message=found[reason])
    return FailureStatus(reason="Error", message=fallback or "the attempt failed; no pod reported why")
