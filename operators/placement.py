"""Accelerator placement: which nodes a training pod may land on and what devices it gets.

H100/H200: amd64 nodes with the GPU product label, 8 GPUs per pod. GB200 (NVL72): arm64, 4 GPUs per
pod, plus the multi-node NVLink domain: a ComputeDomain (NVIDIA's DRA driver) whose IMEX channel every
pod claims, and all pods of a job inside one NVLink clique (NVLink reaches only within a clique) —
through Kueue's topology-aware scheduling when Kueue admits the job, else JobSet's exclusive placement.
"""

from __future__ import annotations

from wam.operators import gang
from wam.operators.settings import AcceleratorProfile, OperatorSettings
from wam.platform.trainjob import TrainJob

CHANNEL_CLAIM = "nvlink-channel"
KUEUE_REQUIRED_TOPOLOGY = "kueue.x-k8s.io/podset-required-topology"


def compute_domain_name(job: TrainJob) -> str:
    return f"{job.name}-nvlink"


def channel_template_name(job: TrainJob) -> str:
    return f"{compute_domain_name(job)}-channel"


def compute_domain(job: TrainJob, meta: dict) -> dict:
    """The job's NVLink domain; its driver creates the ResourceClaimTemplate the pods claim. One per TrainJob,
    reused by every attempt."""
    return {"apiVersion": "resource.nvidia.com/v1beta1", "kind": "ComputeDomain", "metadata": meta,
            "spec": {"numNodes": 0,  # deprecated: pods start once their node's IMEX daemon is up
                     "channel": {"resourceClaimTemplate": {"name": channel_template_name(job)},
                                 "allocationMode": "Single"}}}


def profile(job: TrainJob, settings: OperatorSettings) -> AcceleratorProfile:
    return settings.accelerators[job.spec.resources.accelerator]


def node_selector(p: AcceleratorProfile) -> dict[str, str]:
    return {"kubernetes.io/arch": p.arch, **p.node_selector}


def place_pod(template: dict, job: TrainJob, settings: OperatorSettings) -> bool:
    """The profile's nodes and tolerations on a GPU pod template; for an NVLink domain (GB200) also the domain's
    channel claim, nodes in a clique, and with Kueue its required topology (all pods in one clique). True when
    the pods must share a clique and Kueue does not see to it: the training child keeps them together."""
    p = profile(job, settings)
    pod = template["spec"]
    pod["nodeSelector"] = node_selector(p)
    pod["tolerations"] = list(p.tolerations)
    if not p.nvlink_domain:
        return False
    pod["resourceClaims"] = [{"name": CHANNEL_CLAIM, "resourceClaimTemplateName": channel_template_name(job)}]
    pod["containers"][0]["resources"]["claims"] = [{"name": CHANNEL_CLAIM}]
    pod["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": p.clique_label, "operator": "Exists"}]}]}}}
    if gang.backend(job, settings) == "kueue":
        template["metadata"]["annotations"][KUEUE_REQUIRED_TOPOLOGY] = p.clique_label
        return False
    return True
