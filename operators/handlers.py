"""kopf wiring: every event of a TrainJob or of one of its children, and a periodic tick while it trains,
becomes one level-triggered reconciliation of that TrainJob (wam.operators.controller)."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from wam.operators import builders, kube, metrics
from wam.operators.settings import OperatorSettings
from wam.operators.status import TERMINAL_PHASES
from wam.operators.training_child import CHILDREN
from wam.platform import trainjob

FINALIZER = "wam.dev/operator"
# Children whose status changes matter: a JobSet or RayJob starting/finishing, a quantization Job, the policy
# server. A kind the cluster does not serve (no KubeRay, say) is not watched (kopf warns once at start-up).
WATCHED_CHILDREN = (*(child.kind for child in CHILDREN.values()), kube.JOB, kube.DEPLOYMENT)


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    """Handler state lives in annotations (the TrainJob status belongs to our schema), a bounded thread
    pool runs the synchronous reconciliations."""
    ks = kopf.OperatorSettings()
    ks.persistence.finalizer = FINALIZER
    ks.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="operator.wam.dev")
    ks.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="operator.wam.dev")
    ks.execution.max_workers = settings.workers
    ks.posting.level = logging.WARNING
    ks.scanning.disabled = True  # no list/watch of CRDs or namespaces: the RBAC stays minimal
    return ks


def registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    reg = kopf.OperatorRegistry()

    @kopf.on.login(registry=reg)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    # A TrainJob event matters when its spec is new to the operator; the events of its own status writes
    # and of kopf's finalizer do not (the children's events and the tick cover everything else).
    @kopf.on.event(trainjob.GROUP, trainjob.VERSION, trainjob.PLURAL, registry=reg,
                   when=lambda type, body, **_: type == "DELETED" or _spec_unseen(body))
    def trainjob_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        if type == "DELETED":
            metrics.forget(body.metadata.namespace, body.metadata.name)
            return
        memo.controller.reconcile(body.metadata.namespace, body.metadata.name)

    # A child matters once it has a status (or is gone): a fresh child is one the operator just made.
    for kind in WATCHED_CHILDREN:
        group, version = kind.api_version.split("/")
        @kopf.on.event(group, version, kind.plural, labels={builders.JOB_LABEL: kopf.PRESENT}, registry=reg,
                       id=f"child-{kind.plural}", when=lambda type, body, **_: type == "DELETED" or bool(body.status))
        def child_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
            memo.controller.reconcile(body.metadata.namespace, body.metadata.labels[builders.JOB_LABEL])

    # Progress and checkpoints are polled: the training job reports to MLflow and storage, not to us. The
    # first tick waits one interval: a new TrainJob's own event already reconciled it.
    @kopf.timer(trainjob.GROUP, trainjob.VERSION, trainjob.PLURAL, registry=reg,
                interval=settings.progress_interval_seconds, initial_delay=settings.progress_interval_seconds,
                idle=None,
                when=lambda status, **_: status.get("phase") not in TERMINAL_PHASES)
    def progress_tick(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.controller.reconcile(body.metadata.namespace, body.metadata.name)

    return reg


def _spec_unseen(body: kopf.Body) -> bool:
    return body.status.get("observedGeneration") != body.metadata.get("generation", 1)

