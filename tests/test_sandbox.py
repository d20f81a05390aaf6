"""The operator's containers as real processes under their pods' rules (wam.operators.sandbox, bubblewrap):
read-only root, the pod's user, only its volumes writable, its env and ConfigMap, its hostnames on loopback,
its termination message."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wam.operators import builders
from wam.operators.sandbox import SandboxedContainer, SandboxError, container_env, plan
from wam.operators.settings import OperatorSettings
from wam.platform import trainjob

from conftest import free_port, wait_for

SPEC = {"model": {"preset": "tiny"}, "config": {"data": {"source": "synthetic"}, "training": {"steps": 5}},
        "resources": {"accelerator": "h100", "nodes": 2, "gpusPerNode": 1}, "scheduling": {"gang": "none"},
        "handoff": {"quantize": "never"}, "secretRefs": ["s3-credentials"]}

# What a process checks from inside its pod: it prints one JSON line and writes its termination message.
PROBE = textwrap.dedent("""
    import errno, json, os, socket, sys
    def writable(path):
        try:
            with open(os.path.join(path, "probe"), "w") as f:
                f.write("x")
            return True
        except OSError as err:
            return err.errno
    print(json.dumps({
        "uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(),
        "root": writable("/etc"), "prefix": writable(sys.prefix),
        "workspace": writable("/workspace"), "tmp": writable("/tmp"), "shm": writable("/dev/shm"),
        "config": open(os.environ["WAM_CONFIG"]).read(), "env": {k: os.environ.get(k) for k in
            ("HOME", "WAM_TRAINJOB", "AWS_ACCESS_KEY_ID", "PET_NNODES", "PET_MASTER_ADDR")},
        "peer": socket.gethostbyname(os.environ["PET_MASTER_ADDR"]),
        "no_new_privs": [l for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0].split()[1],
        "caches": {k: os.makedirs(os.environ[k], exist_ok=True) or writable(os.environ[k]) for k in
                   ("XDG_CACHE_HOME", "WAM_CACHE_DIR", "HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                    "MPLCONFIGDIR")},
    }), flush=True)
    open(os.environ["WAM_TERMINATION_LOG"], "w").write("probe finished: exit 3")
    sys.exit(3)
""")


def _training_pod(index: int = 0) -> tuple[dict, dict, dict[tuple[str, str], dict]]:
    """Pod `index` of the tiny 2-node TrainJob's JobSet, expanded as the JobSet and Job controllers would."""
    settings = OperatorSettings()
    job = trainjob.parse({"apiVersion": trainjob.API_VERSION, "kind": trainjob.KIND,
                          "metadata": {"name": "sandboxed", "namespace": "default", "uid": "u-1"}, "spec": SPEC})
    cfg = trainjob.training_config(job, settings.platform())
    from wam.operators.reconcile import training_children

    jobset = next(o for o in training_children(job, cfg, 0, settings) if o["kind"] == "JobSet")
    template = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    name = jobset["metadata"]["name"]
    pod = {"metadata": {**template["metadata"], "name": f"{name}-node-0-{index}-abcde", "namespace": "default",
                        "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
           "spec": {**template["spec"], "hostname": f"{name}-node-0-{index}", "subdomain": name}}
    objects = {("ConfigMap", builders.config_map_name(job)): builders.config_map(job, cfg),
               ("Secret", "s3-credentials"): {"kind": "Secret", "stringData": {"AWS_ACCESS_KEY_ID": "local-key"}}}
    return pod, pod["spec"]["containers"][0], objects


def test_a_training_pod_runs_under_its_rules(tmp_path):
    pod, container, objects = _training_pod(index=1)
    container = {**container, "command": [sys.executable, "-c", PROBE]}
    master = next(e["value"] for e in container["env"] if e["name"] == "PET_MASTER_ADDR")
    run = SandboxedContainer(container, plan(pod, container, objects, tmp_path / "pod",
                                             hosts={master: "127.0.0.1"}), tmp_path / "pod.log")
    finished = run.wait(120)
    log = (tmp_path / "pod.log").read_text()
    assert finished.exit_code == 3, log
    assert finished.message == "probe finished: exit 3"
    seen = json.loads(log.strip().splitlines()[-1])
    assert (seen["uid"], seen["gid"], seen["cwd"]) == (1000, 1000, "/workspace")
    assert seen["root"] == seen["prefix"] == 30  # EROFS: the root filesystem (and the "image") is read-only
    assert seen["workspace"] is seen["tmp"] is seen["shm"] is True
    assert set(seen["caches"].values()) == {True}, seen["caches"]  # every tool's cache on a writable volume
    assert seen["config"] == objects[("ConfigMap", "sandboxed-config")]["data"]["config.yaml"]
    assert seen["env"]["HOME"] == "/workspace" and seen["env"]["WAM_TRAINJOB"] == "default/sandboxed"
    assert seen["env"]["AWS_ACCESS_KEY_ID"] == "local-key" and seen["env"]["PET_NNODES"] == "2"
    assert seen["peer"] == "127.0.0.1" and seen["no_new_privs"] == "1"


def test_a_killed_container_exits_137_and_falls_back_to_its_log(tmp_path):
    pod, container, objects = _training_pod()
    # A process tree, as torchrun and its workers: the kill must reach the grandchild too.
    container = {**container, "command": ["sh", "-c", f"{sys.executable} -c 'import time; print(\"step 1\", "
                                          "flush=True); time.sleep(600)' & wait"]}
    run = SandboxedContainer(container, plan(pod, container, objects, tmp_path / "pod"), tmp_path / "pod.log")
    assert run.poll() is None
    import time

    deadline = time.monotonic() + 120
    while "step 1" not in (tmp_path / "pod.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    run.kill()
    finished = run.wait(60)
    assert finished.exit_code == 137 and finished.reason == "Error"
    assert finished.message == "step 1"  # terminationMessagePolicy: FallbackToLogsOnError
    survivors = subprocess.run(["pgrep", "-f", "time.sleep\\(600\\)"], capture_output=True, text=True).stdout
    assert not survivors.strip(), f"processes of the killed pod still run: {survivors}"


def test_the_image_stays_visible_under_the_pods_volumes(tmp_path):
    """A virtualenv (the image's stand-in) under /tmp, which the pod mounts an emptyDir over, is bound back
    read-only after the volume, so its programs still start."""
    pod, container, objects = _training_pod()
    argv = plan(pod, container, objects, tmp_path / "pod", prefix=Path("/tmp/checkout/.venv")).argv
    volume = argv.index("/tmp", argv.index("--bind"))  # the tmp emptyDir's mount
    image = argv.index("/tmp/checkout/.venv")
    assert argv[image - 1] == "--ro-bind" and argv[image + 1] == "/tmp/checkout/.venv" and image > volume


def test_what_the_runner_cannot_honour_is_refused_by_field():
    pod, container, objects = _training_pod()
    with pytest.raises(SandboxError, match="has no command"):
        plan(pod, {k: v for k, v in container.items() if k != "command"}, objects, Path("/x"))
    writable_root = {**container, "securityContext": {"readOnlyRootFilesystem": False}}
    with pytest.raises(SandboxError, match="readOnlyRootFilesystem"):
        plan(pod, writable_root, objects, Path("/x"))
    with pytest.raises(SandboxError, match="Secret 's3-credentials' does not exist"):
        container_env(pod, container, {k: v for k, v in objects.items() if k[0] != "Secret"})
    field = {**container, "env": [{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}}]}
    with pytest.raises(SandboxError, match="status.podIPs"):
        container_env(pod, field, objects)


# -- the controllers and the kubelet: the operator's objects as real processes ------------------------------

ALL_REDUCE = ("import os, torch, torch.distributed as dist; dist.init_process_group('gloo'); "
              "t = torch.tensor([dist.get_rank() + 1.0]); dist.all_reduce(t); "
              "print(f'rank {dist.get_rank()} of {dist.get_world_size()}: all_reduce {t.item()}', flush=True); "
              "dist.barrier(); dist.destroy_process_group()")


def test_a_jobset_rendezvous_through_its_service_name_across_two_sandboxed_pods(tmp_path):
    """The JobSet the operator builds for 2 nodes: expanded into 2 indexed pods, each running torchrun under
    its pod's rules; torchrun's static rendezvous (PET_* from the pod's env, the master addressed by the
    JobSet's service hostname) joins them; statuses and logs come back from the processes."""
    from wam.operators import kube
    from wam.operators.local_cluster import LocalKubelet, expand_jobset
    from wam.operators.reconcile import training_children
    from wam.operators.testing import EmulatedCluster


    settings = OperatorSettings()
    job = trainjob.parse({"apiVersion": trainjob.API_VERSION, "kind": trainjob.KIND,
                          "metadata": {"name": "gang", "namespace": "default", "uid": "u-2"}, "spec": SPEC})
    cfg = trainjob.training_config(job, settings.platform())
    jobset = next(o for o in training_children(job, cfg, 0, settings) if o["kind"] == "JobSet")
    container = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
    container["command"] = ["torchrun", "--no-python", "python", "-c", ALL_REDUCE]
    port = str(free_port())  # tests share this machine's loopback: not the fixed rendezvous port
    container["env"] = [{**e, "value": port} if e["name"] == "PET_MASTER_PORT" else e for e in container["env"]]
    pods = expand_jobset({**jobset, "metadata": {**jobset["metadata"], "uid": "js"}})
    assert [p["spec"]["hostname"] for p in pods] == ["gang-0-node-0-0", "gang-0-node-0-1"]
    assert {p["spec"]["subdomain"] for p in pods} == {"gang-0"}
    with EmulatedCluster() as c, LocalKubelet(c.kube, "default", tmp_path, pod_log=c.set_pod_log) as kubelet:
        c.kube.create(builders.config_map(job, cfg))
        c.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials",
                       "namespace": "default"}, "stringData": {"AWS_ACCESS_KEY_ID": "local-key"}})
        c.kube.create(jobset)

        def completed():
            """the JobSet Completed"""
            js = c.kube.get(kube.JOBSET, "default", "gang-0")
            return any(x["type"] in ("Completed", "Failed") for x in (js.get("status") or {}).get("conditions", [])) \
                and js
        js = wait_for(completed, timeout=180)
        logs = "".join((tmp_path / f"{name}.log").read_text() for name in kubelet.running)
        assert js["status"]["conditions"][0]["type"] == "Completed", logs + str(kubelet.errors)
        assert "rank 0 of 2: all_reduce 3.0" in logs and "rank 1 of 2: all_reduce 3.0" in logs
        phases = {p["metadata"]["name"]: p["status"]["phase"] for p in c.kube.list(kube.POD, "default", {})}
        assert sorted(phases.values()) == ["Succeeded", "Succeeded"]
        assert kubelet.errors == []


def test_a_job_whose_container_fails_on_start_reports_its_termination_message(tmp_path):
    """The quantize Job as the operator builds it, its command failing at once: the pod ends Failed with the
    process's termination message and the Job's Failed condition, as the operator reads them."""
    from wam.operators import handoff, kube
    from wam.operators.local_cluster import LocalKubelet
    from wam.operators.testing import EmulatedCluster


    settings = OperatorSettings()
    job = trainjob.parse({"apiVersion": trainjob.API_VERSION, "kind": trainjob.KIND,
                          "metadata": {"name": "quant", "namespace": "default", "uid": "u-3"},
                          "spec": {**SPEC, "handoff": {"quantize": "final"}}})
    quantize = handoff.quantize_job(job, 5, "s3://nowhere/step-5", "s3://nowhere/nvfp4/step-5", settings)
    container = quantize["spec"]["template"]["spec"]["containers"][0]
    path = container.get("terminationMessagePath", "/dev/termination-log")
    container["command"] = ["python", "-c", f"open({path!r}, 'w').write('InvalidInput: no such checkpoint'); "
                                            "raise SystemExit(2)"]
    with EmulatedCluster() as c, LocalKubelet(c.kube, "default", tmp_path, pod_log=c.set_pod_log):
        c.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials",
                       "namespace": "default"}, "stringData": {"AWS_ACCESS_KEY_ID": "local-key"}})
        c.kube.create(quantize)
        name = quantize["metadata"]["name"]

        def failed():
            """the quantize Job Failed"""
            conditions = ((c.kube.get(kube.JOB, "default", name) or {}).get("status") or {}).get("conditions", [])
            return any(x["type"] == "Failed" for x in conditions)
        wait_for(failed, timeout=120)
        pod = c.kube.list(kube.POD, "default", {})[0]
        assert pod["status"]["phase"] == "Failed"
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 2 and terminated["message"] == "InvalidInput: no such checkpoint"


def test_a_rayjobs_head_worker_and_submitter_run_under_their_pods_rules(tmp_path, s3, monkeypatch):
    """The RayJob the operator builds, as KubeRay would run it: the head pod's `ray start --head`, a worker pod
    joining it through the head's service name, and the submitter pod submitting the real entrypoint (the Ray
    Train driver of the tiny TrainJob) to the head's dashboard; the training runs on the worker, its
    checkpoint lands in the object store."""
    from wam.operators.local_cluster import kuberay_pods
    from wam.operators.reconcile import training_children
    from wam.platform import checkpoints

    settings = OperatorSettings()
    job = trainjob.parse({"apiVersion": trainjob.API_VERSION, "kind": trainjob.KIND,
                          "metadata": {"name": "rayed", "namespace": "default", "uid": "u-4"},
                          "spec": {**SPEC, "launcher": "ray", "checkpoint": {"uri": "s3://wam-checkpoints/rayed"},
                                   "config": {"data": {"source": "synthetic"}, "training": {"steps": 2}},
                                   "resources": {"accelerator": "h100", "nodes": 1, "gpusPerNode": 1}}})
    cfg = trainjob.training_config(job, settings.platform())
    children = training_children(job, cfg, 0, settings)
    rj = next(o for o in children if o["kind"] == "RayJob")
    objects = {("ConfigMap", builders.config_map_name(job)): builders.config_map(job, cfg),
               ("Secret", "s3-credentials"): {"kind": "Secret", "stringData": s3}}
    head, worker, submitter = kuberay_pods(rj, gcs_port=free_port(), dashboard_port=free_port())
    hosts = {f"{rj['metadata']['name']}-head-svc": "127.0.0.1"}
    runs = {}
    try:
        for pod in (head, worker, submitter):
            name = pod["metadata"]["name"]
            container = pod["spec"]["containers"][0]
            runs[name] = SandboxedContainer(container, plan(pod, container, objects, tmp_path / name, hosts=hosts),
                                            tmp_path / f"{name}.log")
            if pod is worker:  # the submitter starts once the head takes jobs (KubeRay waits for it too)
                wait_for(lambda: "Ray runtime started" in (tmp_path / f"{head['metadata']['name']}.log").read_text()
                         or runs[head["metadata"]["name"]].poll(), timeout=120)
        finished = runs[submitter["metadata"]["name"]].wait(400)
        logs = {name: (tmp_path / f"{name}.log").read_text() for name in runs}
        assert finished.exit_code == 0, "\n".join(f"--- {n}\n{t[-3000:]}" for n, t in logs.items())
        assert "succeeded" in logs[submitter["metadata"]["name"]].lower()
        assert all(run.poll() is None for name, run in runs.items() if name != submitter["metadata"]["name"])
        for key, value in s3.items():
            monkeypatch.setenv(key, value)
        assert checkpoints.latest_complete("s3://wam-checkpoints/rayed")[0] == 2
    finally:
        for run in runs.values():
            run.stop(5)


def test_a_deployments_new_template_replaces_its_pods_on_the_same_port(tmp_path):
    """A policy server rolled to a newer model: the Deployment's template changes, the old revision's pod is
    deleted and its process stopped before the new one starts (Recreate: both want the Service's port)."""
    from wam.operators import kube
    from wam.operators.local_cluster import LocalKubelet
    from wam.operators.testing import EmulatedCluster

    port = free_port()
    serve = ["python", "-c", f"import http.server, os; print('serving', os.environ['MODEL'], flush=True); "
             f"http.server.HTTPServer(('127.0.0.1', {port}), http.server.SimpleHTTPRequestHandler).serve_forever()"]

    def deployment(model: str) -> dict:
        container = {"name": "policy", "image": "trainer", "command": serve, "env": [{"name": "MODEL", "value": model}],
                     "securityContext": builders.security_context(), "workingDir": "/tmp",
                     "readinessProbe": {"tcpSocket": {"port": port}},
                     "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "policy", "namespace": "default"},
                "spec": {"replicas": 1, "template": {"metadata": {"labels": {"app": "policy"}}, "spec": {
                    "containers": [container], "volumes": [{"name": "tmp", "emptyDir": {}}],
                    "securityContext": builders.pod_security_context()}}}}

    with EmulatedCluster() as c, LocalKubelet(c.kube, "default", tmp_path, pod_log=c.set_pod_log) as kubelet:
        c.kube.create(deployment("step-10"))

        def ready(model):
            pods = c.kube.list(kube.POD, "default", {})
            logs = [c.emulator.pod_logs.get(("default", p["metadata"]["name"], "policy"), "") for p in pods]
            ok = len(pods) == 1 and f"serving {model}" in logs[0] and \
                (c.kube.get(kube.DEPLOYMENT, "default", "policy").get("status") or {}).get("readyReplicas") == 1
            return ok and pods[0]["metadata"]["name"]
        first = wait_for(lambda: ready("step-10"), timeout=60)
        c.kube.patch(kube.DEPLOYMENT, "default", "policy", {"spec": deployment("step-20")["spec"]})
        second = wait_for(lambda: ready("step-20"), timeout=60)
        assert second != first and list(kubelet.running) == [second]
        assert kubelet.errors == []
