"""The operator end to end: the real kopf operator process (`python -m wam.operators`) against an emulated
Kubernetes API (kmock, wam.operators.testing), a real MLflow server and a real S3-compatible server
(moto). The tests play the cluster's controllers (Kueue, JobSet, Job, Deployment) by writing statuses;
scheduling, admission webhooks and GPUs are not exercised (see docs/platform-team.md)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import fsspec
import pytest
import yaml

from wam.operators import kube, progress
from wam.operators.rayjob import RayJobChild
from wam.operators.reconcile import Observed, plan
from wam.operators.settings import OperatorSettings
from wam.operators.testing import EmulatedCluster
from wam.platform import checkpoints, trainjob
from wam.platform.tracking import JOB_TAG, Tracker

from conftest import wait_for

NS = "default"
BUCKET = "s3://wam-checkpoints"


class Operator:
    """The operator as a process, restartable mid-test."""

    def __init__(self, cluster: EmulatedCluster, settings: Path, env: dict, log: Path):
        self.cluster, self.settings, self.env, self.log, self.proc = cluster, settings, env, log, None

    def start(self) -> None:
        self.proc = self.cluster.start_operator(self.settings, self.log, self.env)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as when a node dies under the operator."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3, mlflow_server):
    tmp = tmp_path_factory.mktemp("operator")
    settings = tmp / "settings.yaml"
    settings.write_text(yaml.safe_dump({"checkpointBase": BUCKET, "progressIntervalSeconds": 0.5,
                                        "mlflow": {"trackingUri": mlflow_server, "externalUrl": "https://mlflow.test"}}))
    with EmulatedCluster() as c:
        op = Operator(c, settings, s3, tmp / "operator.log")
        op.start()
        c.operator, c.mlflow, c.s3 = op, mlflow_server, s3
        try:
            yield c
        finally:
            op.stop()
            print((tmp / "operator.log").read_text()[-20000:])


def submit(c: EmulatedCluster, name: str, **spec) -> None:
    base = {"model": {"preset": "tiny"}, "config": {"data": {"source": "synthetic"}, "training": {"steps": 20}},
            "resources": {"accelerator": "h100", "nodes": 2, "gpusPerNode": 1}}
    assert c.kube.create({"apiVersion": trainjob.API_VERSION, "kind": trainjob.KIND,
                          "metadata": {"name": name, "namespace": NS}, "spec": {**base, **spec}})


def status(c: EmulatedCluster, name: str) -> dict:
    return (c.kube.get(kube.TRAINJOB, NS, name) or {}).get("status") or {}


def condition(st: dict, type_: str) -> dict:
    return next((x for x in st.get("conditions", []) if x["type"] == type_), {})


def phase_is(c, name, phase):
    def check():
        return status(c, name).get("phase") == phase
    check.__doc__ = f"{name} to be {phase} (now {status(c, name).get('phase')})"
    return wait_for(check)


def write_checkpoint(folder: str, step: int, env: dict) -> None:
    """What rank 0 leaves behind: the shard files, then the manifest last."""
    os.environ.update(env)  # the fsspec S3 client of this process talks to the same server
    uri = checkpoints.step_dir(folder, step)
    with fsspec.open(f"{uri}/__0_0.distcp", "wb") as f:
        f.write(os.urandom(1024))
    checkpoints.write_manifest(uri, step, config={}, metrics={"loss": 0.5})


def train_reports(c: EmulatedCluster, name: str, metrics: dict, step: int, checkpoint: int) -> tuple[Tracker, dict]:
    """What rank 0 of job `name` does: log metrics to its MLflow run and write a complete checkpoint; returns
    the tracker and the job's status once the operator shows both."""
    tracker = Tracker(c.mlflow, "wam", f"{NS}.{name}", f"wam-{name}")
    tracker.start({"model.preset": "tiny"})
    tracker.log_metrics(metrics, step=step)
    assert tracker.close(30)
    write_checkpoint(f"{BUCKET}/{NS}/{name}", checkpoint, c.s3)
    return tracker, wait_for(lambda: (s := status(c, name)).get("checkpoint") and s.get("progress") and s)


def set_status(c, kind, name, status_patch):
    c.kube.patch(kind, NS, name, {"status": status_patch}, subresource="status")


def kueue_admits(c, kind, name: str, workload: str, owner_uid: str) -> None:
    """What Kueue does on admission: an admitted Workload owned by the job, and the job unsuspended."""
    c.kube.create({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
                   "metadata": {"name": workload, "namespace": NS, "labels": {"kueue.x-k8s.io/job-uid": owner_uid}},
                   "spec": {"active": True, "queueName": "default"},
                   "status": {"conditions": [{"type": "Admitted", "status": "True", "reason": "Admitted"}]}})
    c.kube.patch(kind, NS, name, {"spec": {"suspend": False}})


def failed_pod(c, jobset: str, message: str, exit_code: int = 1, reason: str = "Error") -> None:
    c.kube.create({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"{jobset}-node-0-0", "namespace": NS,
                                "labels": {"jobset.sigs.k8s.io/jobset-name": jobset}},
                   "spec": {"containers": [{"name": "trainer", "image": "trainer"}]},
                   "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                       "exitCode": exit_code, "reason": reason, "message": message}}}]}})


JOBSET_FAILED = {"conditions": [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                                 "message": "jobset failed due to a failed job"}]}
JOBSET_RUNNING = {"replicatedJobsStatus": [{"name": "node", "ready": 1, "succeeded": 0, "failed": 0, "active": 1,
                                            "suspended": 0}]}


@pytest.mark.slow
def test_trainjob_from_queue_to_serving(cluster):
    c = cluster
    submit(c, "e2e", handoff={"quantize": "final", "serving": {"replicas": 1, "accelerator": "h100"}})
    js = wait_for(lambda: c.objects(kube.JOBSET).get("e2e-0"))
    pod = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert js["spec"]["suspend"] is True, "created suspended: Kueue admits it"
    assert js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "default"
    assert pod["nodeSelector"]["kubernetes.io/arch"] == "amd64"
    phase_is(c, "e2e", "Queued")
    assert condition(status(c, "e2e"), "Admitted")["status"] == "False"

    # The operator dies and comes back: nothing is created twice, nothing is recreated.
    before = {n: o["metadata"]["uid"] for n, o in {**c.objects(kube.JOBSET), **c.objects(kube.CONFIGMAP)}.items()}
    c.operator.kill()
    c.operator.start()
    time.sleep(3)
    after = {n: o["metadata"]["uid"] for n, o in {**c.objects(kube.JOBSET), **c.objects(kube.CONFIGMAP)}.items()}
    assert after == before
    assert status(c, "e2e")["attempt"] == 0

    # Kueue admits the workload and unsuspends the JobSet; its pods become ready.
    kueue_admits(c, kube.JOBSET, "e2e-0", "jobset-e2e-0", js["metadata"]["uid"])
    set_status(c, kube.JOBSET, "e2e-0", JOBSET_RUNNING)
    phase_is(c, "e2e", "Running")
    assert c.objects(kube.JOBSET)["e2e-0"]["spec"]["suspend"] is False, "the operator never touches suspend"

    # Rank 0 reports to MLflow and writes a complete checkpoint.
    tracker, st = train_reports(c, "e2e", {"loss": 0.75, "tokens_per_s": 1234.0}, step=15, checkpoint=20)
    assert st["progress"]["step"] == 15 and st["progress"]["summary"] == "15/20" and st["progress"]["loss"] == 0.75
    assert st["mlflow"]["runId"] == tracker.run_id and st["mlflow"]["url"].startswith("https://mlflow.test/#/")
    assert st["checkpoint"]["uri"] == f"{BUCKET}/{NS}/e2e/step-20"
    assert condition(st, "Checkpointed")["status"] == "True"
    assert not c.objects(kube.JOB), "quantize: final waits for the end of training"

    # Training ends: the final checkpoint is quantized, then served.
    set_status(c, kube.JOBSET, "e2e-0", {"conditions": [{"type": "Completed", "status": "True",
                                                         "reason": "AllJobsCompleted", "message": "done"}]})
    phase_is(c, "e2e", "Succeeded")
    qjob = wait_for(lambda: c.objects(kube.JOB).get("e2e-quantize-20"))
    command = qjob["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["wam", "quantize", f"{BUCKET}/{NS}/e2e/step-20"]
    set_status(c, kube.JOB, "e2e-quantize-20", {"conditions": [{"type": "Complete", "status": "True"}],
                                                 "succeeded": 1})
    dep = wait_for(lambda: c.objects(kube.DEPLOYMENT).get("e2e-policy"))
    assert "e2e-policy" in c.objects(kube.SERVICE)
    assert dep["spec"]["template"]["spec"]["containers"][0]["command"][:3] == [
        "wam", "serve", f"{BUCKET}/{NS}/e2e/nvfp4/step-20"]
    set_status(c, kube.DEPLOYMENT, "e2e-policy", {"readyReplicas": 1, "availableReplicas": 1})
    st = wait_for(lambda: condition(s := status(c, "e2e"), "Serving").get("status") == "True" and s)
    assert st["quantized"] == {"step": 20, "uri": f"{BUCKET}/{NS}/e2e/nvfp4/step-20", "job": "e2e-quantize-20"}
    assert st["serving"]["endpoint"] == f"ws://e2e-policy.{NS}.svc:8000" and st["serving"]["readyReplicas"] == 1
    assert st["serving"]["embodiments"] == ["synthetic"]  # procedural data: no robot kind of its own
    assert condition(st, "Succeeded")["status"] == "True" and st["restarts"] == 0

    # A terminal TrainJob never gets training children again, whatever happens to them.
    c.kube.delete(kube.JOBSET, NS, "e2e-0")
    time.sleep(3)
    assert not [n for n in c.objects(kube.JOBSET) if n.startswith("e2e-")]
    assert status(c, "e2e")["phase"] == "Succeeded"

    # Deleting the TrainJob removes everything it owns.
    c.kube.delete(kube.TRAINJOB, NS, "e2e")
    wait_for(lambda: c.kube.get(kube.TRAINJOB, NS, "e2e") is None)
    wait_for(lambda: "e2e-policy" not in c.objects(kube.DEPLOYMENT) and "e2e-config" not in c.objects(kube.CONFIGMAP))


@pytest.mark.slow
def test_failures_restart_with_a_counter_then_stop_and_serving_rolls(cluster):
    c = cluster
    submit(c, "flaky", scheduling={"gang": "none"}, failurePolicy={"maxRestarts": 1, "restartOn": ["Error"]},
           handoff={"quantize": "every", "serving": {"replicas": 1, "accelerator": "h100"}})
    wait_for(lambda: "flaky-0" in c.objects(kube.JOBSET))
    set_status(c, kube.JOBSET, "flaky-0", JOBSET_RUNNING)
    phase_is(c, "flaky", "Running")

    # A rank crashes: the attempt fails, a new JobSet starts, the counter lives in the TrainJob.
    failed_pod(c, "flaky-0", "Error: CUDA error: an illegal memory access was encountered")
    set_status(c, kube.JOBSET, "flaky-0", JOBSET_FAILED)
    wait_for(lambda: "flaky-1" in c.objects(kube.JOBSET))
    wait_for(lambda: "flaky-0" not in c.objects(kube.JOBSET))
    st = status(c, "flaky")
    assert (st["restarts"], st["attempt"], st["jobset"], st["phase"]) == (1, 1, "flaky-1", "Restarting")
    assert st["lastFailure"]["reason"] == "Error" and "illegal memory access" in st["lastFailure"]["message"]
    set_status(c, kube.JOBSET, "flaky-1", JOBSET_RUNNING)
    phase_is(c, "flaky", "Running")
    assert status(c, "flaky")["restarts"] == 1, "running again does not reset the counter"

    # quantize: every -> each new complete checkpoint is quantized; a newer one rolls the policy server.
    folder = f"{BUCKET}/{NS}/flaky"
    for step in (10, 20):
        write_checkpoint(folder, step, c.s3)
        wait_for(lambda name=f"flaky-quantize-{step}": name in c.objects(kube.JOB))
        set_status(c, kube.JOB, f"flaky-quantize-{step}", {"conditions": [{"type": "Complete", "status": "True"}]})

        def serving_step(expected=step):
            dep = c.objects(kube.DEPLOYMENT).get("flaky-policy")
            return dep and dep["spec"]["template"]["metadata"]["labels"]["wam.dev/step"] == str(expected) and dep
        dep = wait_for(serving_step)
        assert dep["spec"]["template"]["spec"]["containers"][0]["command"][2] == f"{folder}/nvfp4/step-{step}"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    # A user error is not worth a restart, and no restarts are left anyway.
    failed_pod(c, "flaky-1", "InvalidInput: dataset s3://x/droid: meta/info.json not found", exit_code=2)
    set_status(c, kube.JOBSET, "flaky-1", JOBSET_FAILED)
    phase_is(c, "flaky", "Failed")
    st = status(c, "flaky")
    assert st["lastFailure"]["reason"] == "InvalidInput" and "info.json" in st["lastFailure"]["message"]
    assert condition(st, "Failed")["reason"] == "InvalidInput"
    time.sleep(2)
    assert "flaky-2" not in c.objects(kube.JOBSET) and status(c, "flaky")["restarts"] == 1


@pytest.mark.slow
def test_ray_trainjob_goes_through_rayjob_states_to_completion(cluster):
    c = cluster
    submit(c, "ray", launcher="ray", failurePolicy={"maxRestarts": 1, "restartOn": ["Error"]})
    rj = wait_for(lambda: c.objects(kube.RAYJOB).get("ray-0"))
    assert rj["spec"]["suspend"] is True and rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "default"
    assert not c.objects(kube.JOBSET).get("ray-0")
    phase_is(c, "ray", "Queued")

    # Kueue admits the RayJob; KubeRay starts its cluster, then submits the Ray job.
    kueue_admits(c, kube.RAYJOB, "ray-0", "rayjob-ray-0", rj["metadata"]["uid"])
    set_status(c, kube.RAYJOB, "ray-0", rayjob_status("Initializing"))
    phase_is(c, "ray", "Pending")
    set_status(c, kube.RAYJOB, "ray-0", rayjob_status("Running", "RUNNING", rayClusterName="ray-0-x7k2p"))
    phase_is(c, "ray", "Running")
    assert condition(status(c, "ray"), "Created")["reason"] == "RayJobCreated"

    # A failure Ray Train's own worker restarts could not absorb: a new RayJob, the count kept in the TrainJob.
    set_status(c, kube.RAYJOB, "ray-0", APP_FAILED)
    wait_for(lambda: "ray-1" in c.objects(kube.RAYJOB))
    wait_for(lambda: "ray-0" not in c.objects(kube.RAYJOB))
    st = status(c, "ray")
    assert (st["restarts"], st["attempt"], st["rayJob"]) == (1, 1, "ray-1") and "jobset" not in st
    assert st["lastFailure"]["reason"] == "Error" and "NCCL" in st["lastFailure"]["message"]
    c.kube.patch(kube.RAYJOB, NS, "ray-1", {"spec": {"suspend": False}})
    set_status(c, kube.RAYJOB, "ray-1", rayjob_status("Running", "RUNNING"))
    phase_is(c, "ray", "Running")

    # Rank 0 (on a worker pod) reports to MLflow and writes a complete checkpoint, as under torchrun.
    tracker, st = train_reports(c, "ray", {"loss": 0.5, "tokens_per_s": 99.0}, step=20, checkpoint=20)
    assert st["progress"]["summary"] == "20/20" and st["mlflow"]["runId"] == tracker.run_id

    set_status(c, kube.RAYJOB, "ray-1", rayjob_status("Complete", "SUCCEEDED"))
    phase_is(c, "ray", "Succeeded")
    assert condition(status(c, "ray"), "Succeeded")["status"] == "True"
    c.kube.delete(kube.RAYJOB, NS, "ray-1")  # KubeRay's TTL, or a person: a terminal job is never restarted
    time.sleep(2)
    assert not [n for n in c.objects(kube.RAYJOB) if n.startswith("ray-")] and status(c, "ray")["restarts"] == 1


@pytest.mark.slow
def test_invalid_specs_end_with_a_clear_condition(cluster):
    c = cluster
    submit(c, "no-tpu", resources={"accelerator": "tpu", "nodes": 1})
    submit(c, "too-big", model={"preset": "dreamzero-14b"}, config={"data": {"source": "synthetic"}},
           resources={"accelerator": "h100", "nodes": 1, "gpusPerNode": 1})
    for name, words in (("no-tpu", ("tpu", "h100")), ("too-big", ("memory",))):
        phase_is(c, name, "Failed")
        st = status(c, name)
        failed = condition(st, "Failed")
        assert failed["reason"] == "InvalidSpec" and all(w in failed["message"] for w in words), failed
        assert not [n for n in c.objects(kube.JOBSET) if n.startswith(name)]


# -- the pure plan ----------------------------------------------------------------------------------------


def _job(**spec) -> trainjob.TrainJob:
    return trainjob.parse({"metadata": {"name": "unit", "namespace": NS, "uid": "u1"}, "spec": {
        "model": {"preset": "tiny"}, "config": {"data": {"source": "synthetic"}},
        "resources": {"accelerator": "h100", "nodes": 1, "gpusPerNode": 1}, **spec}})


def test_plan_is_idempotent_and_kueue_owns_suspend():
    settings = OperatorSettings()
    job = _job()
    cfg = trainjob.training_config(job, settings.platform())
    first = plan(job, cfg, Observed(), settings, "2026-01-01T00:00:00+00:00")
    assert [o["kind"] for o in first.create] == ["ConfigMap", "JobSet"]
    job.status = first.status
    js = first.create[-1]
    js["spec"]["suspend"] = False  # Kueue admitted it
    again = plan(job, cfg, Observed(child=js), settings, "2026-01-01T00:01:00+00:00")
    assert not again.create and not again.delete
    assert all(kind != kube.JOBSET for kind, _, _ in again.patch), "never patches a Kueue-managed JobSet"
    job.spec.suspend = True
    workload = {"metadata": {"name": "w"}, "spec": {"active": True}}
    suspended = plan(job, cfg, Observed(child=js, workload=workload), settings, "2026-01-01T00:02:00+00:00")
    assert suspended.patch == [(kube.WORKLOAD, "w", {"spec": {"active": False}})]


def test_plan_active_deadline_fails_the_job():
    settings = OperatorSettings()
    job = _job(activeDeadlineSeconds=60)
    cfg = trainjob.training_config(job, settings.platform())
    first = plan(job, cfg, Observed(), settings, "2026-01-01T00:00:00+00:00")
    job.status = first.status
    late = plan(job, cfg, Observed(child=first.create[-1]), settings, "2026-01-01T00:02:00+00:00")
    assert late.status.phase == "Failed" and late.status.last_failure.reason == "DeadlineExceeded"
    assert (kube.JOBSET, "unit-0") in late.delete


# -- RayJobs (spec.launcher: ray) -------------------------------------------------------------------------


def rayjob_status(deployment: str, job_status: str = "", **extra) -> dict:
    """A RayJob status as KubeRay writes it."""
    return {"jobDeploymentStatus": deployment, "jobStatus": job_status, **extra}


APP_FAILED = rayjob_status("Failed", "FAILED", reason="AppFailed", message=(
    "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
    "(RayTrainWorker pid=7) RuntimeError: NCCL error\n"
    "Error: WorkerGroupError: Training failed due to worker errors:\n[Rank 1 Error Snippet]:\nRuntimeError: NCCL error\n"))
USER_ERROR = rayjob_status("Failed", "FAILED", reason="AppFailed", message=(
    "Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\n"
    "(RayTrainWorker pid=7) Traceback (most recent call last):\n"
    "InvalidInput: s3://x/droid is not a LeRobot dataset: s3://x/droid/meta/info.json is missing\n"))


@pytest.mark.parametrize("rj_status,suspend,state", [
    ({}, False, "starting"),
    (rayjob_status("Initializing"), False, "starting"),
    (rayjob_status("Waiting"), False, "starting"),
    (rayjob_status("Running", "PENDING"), False, "running"),
    (rayjob_status("Running", "RUNNING"), False, "running"),
    ({}, True, "suspended"),
    (rayjob_status("Suspended"), False, "suspended"),
    (rayjob_status("Suspending", "STOPPED"), False, "suspended"),
    (rayjob_status("Complete", "SUCCEEDED"), False, "completed"),
    (rayjob_status("Complete", "STOPPED"), False, "failed"),
    (APP_FAILED, False, "failed"),
    (rayjob_status("Failed", reason="DeadlineExceeded", message="past activeDeadlineSeconds"), False, "failed"),
    (rayjob_status("ValidationFailed", message="bad spec"), False, "failed"),
])
def test_rayjob_states_in_a_jobsets_terms(rj_status, suspend, state):
    assert RayJobChild().state({"spec": {"suspend": suspend}, "status": rj_status})[0] == state


def test_rayjob_failures_are_classified_from_the_drivers_last_words_and_the_pods():
    user = RayJobChild().classify_failure({"status": USER_ERROR}, [])
    assert user.reason == "InvalidInput" and user.message.startswith("s3://x/droid is not a LeRobot dataset")
    error = RayJobChild().classify_failure({"status": APP_FAILED}, [])
    assert error.reason == "Error" and error.message.startswith("WorkerGroupError") and "NCCL" in error.message
    evicted = {"metadata": {"name": "unit-0-node-worker-x"}, "status": {"reason": "Evicted", "message": "node drained"}}
    assert RayJobChild().classify_failure({"status": APP_FAILED}, [evicted]).reason == "Disruption"
    refused = RayJobChild().classify_failure({"status": rayjob_status("ValidationFailed", message="bad spec")}, [])
    assert refused.reason == "InvalidSpec" and "bad spec" in refused.message


def _ray_plan(job, cfg, child, settings, minute):
    return plan(job, cfg, Observed(child=child), settings, f"2026-01-01T00:{minute:02d}:00+00:00")


def test_plan_takes_a_rayjob_through_its_states_and_restarts_failed_attempts():
    settings = OperatorSettings()
    job = _job(launcher="ray", scheduling={"gang": "none"}, failurePolicy={"maxRestarts": 1, "restartOn": ["Error"]})
    cfg = trainjob.training_config(job, settings.platform())
    assert cfg.training.launcher == "ray"
    first = plan(job, cfg, Observed(), settings, "2026-01-01T00:00:00+00:00")
    assert [o["kind"] for o in first.create] == ["ConfigMap", "RayJob"]
    assert (first.status.ray_job, first.status.jobset, first.status.phase) == ("unit-0", None, "Pending")
    job.status, rj = first.status, first.create[-1]
    for minute, (rj_status, phase) in enumerate([(rayjob_status("Initializing"), "Pending"),
                                                 (rayjob_status("Running", "RUNNING"), "Running")], start=1):
        rj["status"] = rj_status
        step = _ray_plan(job, cfg, rj, settings, minute)
        assert step.status.phase == phase and not step.create and not step.delete
        job.status = step.status

    rj["status"] = APP_FAILED  # a failure Ray Train's own restarts (training.max_failures) could not absorb
    restarted = _ray_plan(job, cfg, rj, settings, 3)
    st = restarted.status
    assert (st.phase, st.restarts, st.attempt, st.ray_job) == ("Restarting", 1, 1, "unit-1")
    assert (kube.RAYJOB, "unit-0") in restarted.delete and restarted.create[-1]["metadata"]["name"] == "unit-1"
    job.status, rj = st, restarted.create[-1]

    rj["status"] = USER_ERROR  # a restart could not help, and none is left anyway
    failed = _ray_plan(job, cfg, rj, settings, 4)
    assert failed.status.phase == "Failed" and failed.status.last_failure.reason == "InvalidInput"
    assert not failed.create and failed.status.restarts == 1


def test_plan_completes_a_rayjob_and_never_touches_kueues_suspend():
    settings = OperatorSettings()
    job = _job(launcher="ray")
    cfg = trainjob.training_config(job, settings.platform())
    first = plan(job, cfg, Observed(), settings, "2026-01-01T00:00:00+00:00")
    rj = first.create[-1]
    assert rj["spec"]["suspend"] is True and rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "default"
    job.status = first.status
    queued = _ray_plan(job, cfg, rj, settings, 1)
    assert queued.status.phase == "Queued" and not queued.patch
    job.status = queued.status
    rj["spec"]["suspend"] = False  # Kueue admitted it
    rj["status"] = rayjob_status("Complete", "SUCCEEDED")
    done = _ray_plan(job, cfg, rj, settings, 2)
    assert done.status.phase == "Succeeded" and not done.patch and not done.create


# -- progress polling, batched ------------------------------------------------------------------------------


def test_progress_reader_answers_every_running_job_from_one_search_per_interval(mlflow_server):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.create_experiment("progress-batch")
    runs = {}
    for job in ("ns.a", "ns.b", "ns.done"):
        runs[job] = client.create_run(exp, run_name=job, tags={JOB_TAG: job}).info.run_id
        client.log_batch(runs[job], metrics=[Metric("loss", 0.5, 1, 10)])
    client.set_terminated(runs["ns.done"], "FINISHED")
    reader = progress.ProgressReader(mlflow_server, interval=3600)
    assert reader.report("progress-batch", "ns.a").step == 10
    client.log_batch(runs["ns.a"], metrics=[Metric("loss", 0.25, 2, 20)])
    client.log_batch(runs["ns.b"], metrics=[Metric("loss", 0.25, 2, 30)])
    assert reader.report("progress-batch", "ns.b").step == 10, "answered from the snapshot taken for ns.a"
    assert reader.report("progress-batch", "ns.done") is None, "only running runs are polled"
    final = reader.report("progress-batch", "ns.done", final=True)
    assert final.run_id == runs["ns.done"] and final.loss == 0.5
    assert reader.report("progress-batch", "ns.a", final=True).step == 20
    assert reader.report("no-such-experiment", "ns.a") is None


def test_progress_reader_takes_the_newest_readable_checkpoint_from_one_listing(tmp_path):
    folder = str(tmp_path / "job")

    def save(step: int, manifest: bool = True) -> str:
        path = checkpoints.step_dir(folder, step)
        os.makedirs(path)
        Path(path, "__0_0.distcp").write_bytes(b"weights")
        if manifest:
            checkpoints.write_manifest(path, step, {}, {}, threads=1)
        return path

    reader = progress.ProgressReader(None, interval=30)
    assert reader.checkpoint(folder) is None  # nothing written yet
    save(5)
    Path(save(7), checkpoints.MANIFEST_NAME).write_text("{truncated")  # corrupt: passed over
    save(9, manifest=False)  # still being written
    quantized = tmp_path / "job" / "nvfp4" / "step-12"  # a quantized model is not a training checkpoint
    quantized.mkdir(parents=True)
    (quantized / "model.safetensors").write_bytes(b"fp4")
    checkpoints.write_manifest(str(quantized), 12, {}, {}, threads=1)
    assert reader.checkpoint(folder).step == 5
    newest = save(11)
    assert (found := reader.checkpoint(folder)).step == 11 and found.uri == newest and found.time
