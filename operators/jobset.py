"""The training child of `spec.launcher: torchrun`: one JobSet per attempt (wam.operators.training_child).

`nodes` indexed pods of one replicated Job, reachable by DNS through the JobSet's headless service; each
runs torchrun with a static rendezvous on pod 0 (`PET_*`). Gang scheduling: Kueue labels, or one PodGroup
for the whole JobSet under volcano / coscheduling (without it each child Job would be its own gang of
one). GB200: all pods in one NVLink clique (Kueue's required topology, else JobSet's exclusive placement).
"""

from __future__ import annotations

from wam.operators import builders, gang, kube, placement
from wam.operators.settings import OperatorSettings
from wam.operators.status import classify_failure, true_condition
from wam.platform.launch import training_command
from wam.platform.trainjob import FailureStatus, TrainJob, gpus_per_node

REPLICATED_JOB = "node"
RENDEZVOUS_PORT = 29500
NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # on every pod of a JobSet
POD_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"  # the node rank of an indexed Job's pod
JOBSET_EXCLUSIVE_TOPOLOGY = "alpha.jobset.sigs.k8s.io/exclusive-topology"


def _rendezvous_env(job: TrainJob, name: str, settings: OperatorSettings) -> list[dict]:
    rank_field = f"metadata.annotations['{POD_INDEX_LABEL}']"
    # torchrun reads PET_<ARG> as the default of --<arg>: static rendezvous on the first pod
    return [
        {"name": "PET_NNODES", "value": str(job.spec.resources.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(gpus_per_node(job, settings.platform()))},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": rank_field}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-{REPLICATED_JOB}-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
    ]


class JobSetChild:
    kind = kube.JOBSET
    status_field = "jobset"

    def build(self, job: TrainJob, attempt: int, settings: OperatorSettings) -> dict:
        """One attempt: `nodes` indexed pods of one Job, reachable by DNS, gang-scheduled and placed."""
        name = builders.attempt_name(job, attempt)
        nodes = job.spec.resources.nodes
        container = builders.trainer_container(
            job, settings, builders.CONTAINER, _rendezvous_env(job, name, settings) + builders.trainer_env(job, settings),
            builders.node_resources(job, settings))
        container["command"] = training_command("torchrun")
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
        template = builders.attempt_template(job, attempt, "training",
                                             builders.trainer_pod_spec(job, settings, container))
        js = {
            "apiVersion": self.kind.api_version,
            "kind": self.kind.kind,
            "metadata": builders.metadata(job, name, "training", **{builders.ATTEMPT_LABEL: str(attempt)}),
            "spec": {
                "suspend": job.spec.suspend,
                "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True, "subdomain": name},
                "successPolicy": {"operator": "All"},
                # No failurePolicy: a failed pod fails the JobSet, and the operator decides whether to restart
                # (new JobSet, restart count kept in the TrainJob's status where nothing can reset it).
                "replicatedJobs": [{
                    "name": REPLICATED_JOB,
                    "replicas": 1,
                    "template": {
                        "metadata": {"labels": dict(template["metadata"]["labels"])},
                        "spec": {
                            "parallelism": nodes,
                            "completions": nodes,
                            "completionMode": "Indexed",
                            "backoffLimit": 0,
                            "template": template,
                        },
                    },
                }],
            },
        }
        if placement.place_pod(template, job, settings):  # without Kueue, JobSet keeps the pods in one clique
            js["metadata"].setdefault("annotations", {})[JOBSET_EXCLUSIVE_TOPOLOGY] = \
                placement.profile(job, settings).clique_label
        if not gang.queue_in_kueue(js, job, settings):
            gang.set_priority([template], job)
            gang.join_pod_group([template], name, job, settings)
        return js

    def pod_group(self, js: dict, job: TrainJob, settings: OperatorSettings) -> dict | None:
        """The PodGroup of the whole JobSet (same name) under volcano or coscheduling."""
        pod = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        return gang.pod_group(js["metadata"], pod["containers"][0]["resources"], job, settings)

    def pod_group_kind(self, job: TrainJob, settings: OperatorSettings) -> kube.Kind | None:
        return gang.pod_group_kind(job, settings)

    def state(self, js: dict) -> tuple[str, str]:
        """(completed | failed | suspended | running | starting, message)."""
        if cond := true_condition(js, "Completed"):
            return "completed", cond.get("message", "")
        if cond := true_condition(js, "Failed"):
            return "failed", cond.get("message", "") or cond.get("reason", "")
        if (js.get("spec") or {}).get("suspend") or true_condition(js, "Suspended"):
            return "suspended", ""
        replicated = (js.get("status") or {}).get("replicatedJobsStatus") or []
        wanted = sum(r.get("replicas", 1) for r in js["spec"]["replicatedJobs"])
        if replicated and sum(r.get("ready", 0) + r.get("succeeded", 0) for r in replicated) >= wanted:
            return "running", ""
        return "starting", ""

    def classify_failure(self, js: dict, pods: list[dict]) -> FailureStatus:
        """From the pods' statuses and the trainer's termination messages; the JobSet's own message when no
        pod tells more."""
        return classify_failure(pods, self.state(js)[1])

    def pod_selector(self, job: TrainJob, attempt: int) -> dict[str, str]:
        return {NAME_LABEL: builders.attempt_name(job, attempt)}

    def log_source(self, job: TrainJob, attempt: int, rank: int) -> tuple[dict[str, str], str]:
        """The pod of node `rank` (its torchrun and every local rank's output) and its container."""
        return {**self.pod_selector(job, attempt), POD_INDEX_LABEL: str(rank)}, builders.CONTAINER
