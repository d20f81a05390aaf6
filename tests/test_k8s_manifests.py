"""Everything the platform sends to Kubernetes, checked offline: builders (golden files, Kubernetes 1.37
schemas, the published JobSet / PodGroup / ComputeDomain CRDs), the generated CRD and values schema, the
examples, the Helm chart rendered and linted by a real helm, and the Dockerfiles' rules."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from wam.operators import builders, gang, handoff, placement
from wam.operators.chart import json_schema
from wam.operators.chart import render as render_values_schema
from wam.operators.reconcile import training_children
from wam.operators.settings import OperatorSettings, load_settings
from wam.platform import crd, suite, trainjob
from wam.platform.launch import RAY_DRIVER_ENV, RAY_VERSION
from wam.platform.policy_client import API_KEY_ENV

from conftest import (
    CHART,
    HELM,
    KUBE_VERSION,
    alert_metrics,
    alert_rules,
    dashboard_queries,
    helm,
    render_chart,
)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
SCHEMAS = Path(__file__).parent / "schemas"
UPDATE = os.environ.get("WAM_UPDATE_GOLDEN") == "1"

JOBS = {
    "tiny": {"model": {"preset": "tiny"}, "config": {"data": {"source": "synthetic"}, "training": {"steps": 50}},
             "resources": {"accelerator": "h100", "nodes": 1, "gpusPerNode": 1}, "scheduling": {"gang": "none"},
             "handoff": {"quantize": "never"}},
    "h100": yaml.safe_load((ROOT / "examples" / "dreamzero-14b-h100.yaml").read_text())["spec"],
    "gb200": yaml.safe_load((ROOT / "examples" / "dreamzero-14b-gb200.yaml").read_text())["spec"],
}
# The same jobs under Ray (KubeRay RayJobs): no gang, Volcano through KubeRay, Kueue with NVLink placement.
JOBS.update({f"{key}-ray": {**JOBS[key], "launcher": "ray", "handoff": {"quantize": "never"}} for key in list(JOBS)})


def make_job(spec: dict, name: str = "golden", namespace: str = "robotics") -> trainjob.TrainJob:
    return trainjob.parse({"apiVersion": trainjob.API_VERSION, "kind": trainjob.KIND,
                           "metadata": {"name": name, "namespace": namespace, "uid": "00000000-0000-0000-0000-0000000000aa"},
                           "spec": spec})


def training_objects(spec: dict, attempt: int = 0) -> tuple[trainjob.TrainJob, list[dict]]:
    """A TrainJob of `spec` and its training children for `attempt`, under the default operator settings."""
    settings = OperatorSettings()
    job = make_job(spec)
    return job, training_children(job, trainjob.training_config(job, settings.platform()), attempt, settings)


def children(key: str, settings: OperatorSettings | None = None) -> list[dict]:
    settings = settings or OperatorSettings()
    job = make_job(JOBS[key])
    cfg = trainjob.training_config(job, settings.platform())
    objs = training_children(job, cfg, 0, settings)
    if job.spec.handoff.quantize != "never":
        objs.append(handoff.quantize_job(job, 1000, "s3://ckpt/step-1000", "s3://ckpt/nvfp4/step-1000", settings))
    if job.spec.handoff.serving.replicas:
        objs += [handoff.serving_deployment(job, cfg, 1000, "s3://ckpt/nvfp4/step-1000", settings),
                 handoff.serving_service(job, settings)]
    return objs


def crd_schema(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        doc = yaml.safe_load(f)
    versions = {v["name"]: v["schema"]["openAPIV3Schema"] for v in doc["spec"]["versions"]}
    return {"group": doc["spec"]["group"], "kind": doc["spec"]["names"]["kind"], "versions": versions}


PUBLISHED = [crd_schema(p) for p in sorted(SCHEMAS.glob("*.yaml.gz"))]


def test_vendored_crds_are_the_recorded_upstream_files():
    recorded = dict(re.findall(r"^\| (\S+\.yaml) \|.*\| ([0-9a-f]{64}) \|$", (SCHEMAS / "SOURCES.md").read_text(), re.M))
    vendored = sorted(SCHEMAS.glob("*.yaml.gz"))
    assert sorted(recorded) == sorted(p.name.removesuffix(".gz") for p in vendored)
    for path in vendored:
        assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == recorded[path.name[:-3]], path.name


def validate_custom(obj: dict) -> None:
    """A custom object against its published CRD (JSON Schema from the OpenAPI v3 schema; unknown fields
    refused, as the API server's pruning would silently drop them)."""
    group, version = obj["apiVersion"].split("/")
    for schema in PUBLISHED:
        if schema["group"] == group and schema["kind"] == obj["kind"]:
            published = json_schema(schema["versions"][version])
            # not jsonschema.validate: it checks the schema first, and some upstream patterns are Go regexps
            # (Prometheus Operator's '^(?i)(abort|warn)?$') that Python's re refuses
            jsonschema.validators.validator_for(published)(published).validate(obj)
            return
    raise AssertionError(f"no published schema for {obj['apiVersion']} {obj['kind']}")


def validate(obj: dict) -> None:
    if "/" in obj["apiVersion"] and obj["apiVersion"].split("/")[0].endswith(
            ("x-k8s.io", "volcano.sh", "nvidia.com", "ray.io", "coreos.com")):
        validate_custom(obj)
    else:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


# -- builders ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(JOBS))
def test_builders_match_golden_files(key):
    rendered = yaml.safe_dump_all(children(key), sort_keys=True, width=120)
    path = GOLDEN / f"{key}.yaml"
    if UPDATE:
        path.write_text(rendered)
    assert path.read_text() == rendered, f"builders changed {path.name}; review, then WAM_UPDATE_GOLDEN=1 pytest"


@pytest.mark.parametrize("key", list(JOBS))
def test_every_child_passes_its_schema(key):
    objs = children(key)
    kinds = {o["kind"] for o in objs}
    assert {"ConfigMap", "RayJob" if key.endswith("-ray") else "JobSet"} <= kinds
    for obj in objs:
        validate(obj)


@pytest.mark.parametrize("backend", ["volcano", "coscheduling", "kueue"])
def test_gang_backends_produce_valid_objects(backend):
    spec = {**JOBS["h100"], "scheduling": {"gang": backend, "queue": "research"}}
    _, objs = training_objects(spec)
    for obj in objs:
        validate(obj)
    js = objs[-1]
    pod = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    if backend == "kueue":
        assert js["metadata"]["labels"][gang.KUEUE_QUEUE_LABEL] == "research" and js["spec"]["suspend"] is True
    elif backend == "volcano":
        assert pod["spec"]["schedulerName"] == "volcano"
        group = next(o for o in objs if o["kind"] == "PodGroup")
        assert group["spec"]["minMember"] == 8 and group["spec"]["minResources"]["nvidia.com/gpu"] == "64"
    else:
        assert pod["metadata"]["labels"][gang.COSCHEDULING_GROUP_LABEL] == js["metadata"]["name"]


def test_placement_h100_vs_gb200():
    gb200 = children("gb200")
    js_h100 = next(o for o in children("h100") if o["kind"] == "JobSet")
    js_gb200 = next(o for o in gb200 if o["kind"] == "JobSet")
    pod_h100 = js_h100["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod_gb200 = js_gb200["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod_h100["nodeSelector"]["kubernetes.io/arch"] == "amd64"
    assert pod_h100["nodeSelector"]["nvidia.com/gpu.product"].startswith("NVIDIA-H100")
    assert pod_h100["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "resourceClaims" not in pod_h100
    assert pod_gb200["nodeSelector"]["kubernetes.io/arch"] == "arm64"
    assert pod_gb200["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    domain = next(o for o in gb200 if o["kind"] == "ComputeDomain")
    assert pod_gb200["resourceClaims"][0]["resourceClaimTemplateName"] == domain["spec"]["channel"][
        "resourceClaimTemplate"]["name"]
    clique = pod_gb200["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert clique["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.clique"
    template = js_gb200["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert template["metadata"]["annotations"][placement.KUEUE_REQUIRED_TOPOLOGY] == "nvidia.com/gpu.clique"
    assert js_gb200["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == 8


def test_a_policy_server_that_guides_on_two_gpus_gets_two():
    """serving.devices 2 runs the unconditional pass on the pod's second GPU: the pod must have one."""
    settings = OperatorSettings()

    def policy_gpus(spec: dict) -> str:
        job = make_job(spec)
        cfg = trainjob.training_config(job, settings.platform())
        deployment = handoff.serving_deployment(job, cfg, 1000, "s3://ckpt/nvfp4/step-1000", settings)
        return deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]

    one = JOBS["h100"]
    two = {**one, "config": {**one["config"], "serving": {**one["config"]["serving"], "devices": 2}}}
    assert (policy_gpus(one), policy_gpus(two)) == ("1", "2")


def test_a_policy_server_with_an_api_key_secret_gets_it_and_is_ready_only_on_readyz():
    """The key reaches the server from the Secret, never from the spec; the pod is ready when /readyz says so (the
    engine compiled and warmed up), not when the port opens, and has time to drain its sessions on SIGTERM."""
    def deployment(key: str) -> dict:
        return next(o for o in children(key) if o["kind"] == "Deployment")

    keyed, open_ = deployment("gb200"), deployment("h100")
    container = keyed["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env[API_KEY_ENV] == {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {
        "name": "wam-policy-api-key", "key": handoff.API_KEY_SECRET_KEY}}}
    assert API_KEY_ENV not in {e["name"] for e in open_["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "policy"}
    cfg = trainjob.training_config(make_job(JOBS["gb200"]), OperatorSettings().platform())
    assert keyed["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > cfg.serving.drain_timeout_s


def test_rendezvous_env_and_owner_references():
    objs = children("gb200")
    js = next(o for o in objs if o["kind"] == "JobSet")
    container = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PET_NNODES"] == "8" and env["PET_NPROC_PER_NODE"] == "4"
    assert env["PET_MASTER_ADDR"] == f"{js['metadata']['name']}-node-0-0.{js['metadata']['name']}"
    assert {"name": "wam-s3-credentials"} in [e.get("secretRef") for e in container["envFrom"]]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", builders.CONFIG_DIR, builders.WORKSPACE} <= mounts
    for obj in objs:
        ref = obj["metadata"]["ownerReferences"][0]
        assert (ref["kind"], ref["name"], ref["controller"]) == ("TrainJob", "golden", True)


def _ray_templates(rj: dict) -> dict[str, dict]:
    cluster = rj["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"], "worker": cluster["workerGroupSpecs"][0]["template"],
            "submitter": rj["spec"]["submitterPodTemplate"]}


def test_rayjob_runs_the_ray_driver_on_a_cpu_head_and_places_gpu_workers():
    objs = children("gb200-ray")
    rj = objs[-1]
    assert [o["kind"] for o in objs] == ["ConfigMap", "ComputeDomain", "RayJob"], "KubeRay makes no PodGroup here"
    spec = rj["spec"]
    assert spec["entrypoint"] == "python -m wam.trainer.titan.ray_train"
    assert (spec["backoffLimit"], spec["shutdownAfterJobFinishes"]) == (0, True), "the operator restarts attempts"
    pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "trainer"] if d.startswith("ray["))
    assert pin.endswith(f"=={spec['rayClusterSpec']['rayVersion']}") and RAY_VERSION in pin
    templates = _ray_templates(rj)
    head, worker = templates["head"]["spec"], templates["worker"]["spec"]
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 8
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["requests"] and "nodeSelector" not in head
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert worker["nodeSelector"]["kubernetes.io/arch"] == "arm64" and worker["resourceClaims"]
    assert templates["worker"]["metadata"]["annotations"][placement.KUEUE_REQUIRED_TOPOLOGY] == "nvidia.com/gpu.clique"
    for template in (head, worker):
        env = {e["name"]: e.get("value") for e in template["containers"][0]["env"]}
        assert env["WAM_CONFIG"] == f"{builders.CONFIG_DIR}/{builders.CONFIG_KEY}"
        assert RAY_DRIVER_ENV.items() <= env.items() and not any(k.startswith("PET_") for k in env)
        assert {"name": "wam-s3-credentials"} in [e.get("secretRef") for e in template["containers"][0]["envFrom"]]
    for name, template in templates.items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert "memory" in pod["containers"][0]["resources"]["limits"], name
        assert template["metadata"]["labels"][builders.ATTEMPT_LABEL] == "0", name
    config = yaml.safe_load(objs[0]["data"][builders.CONFIG_KEY])
    assert (config["training"]["launcher"], config["training"]["processes"], config["training"]["nodes"]) == ("ray", 4, 8)


def test_rayjob_keeps_gb200_workers_in_one_clique_without_kueue():
    spec = {**JOBS["gb200-ray"], "scheduling": {"gang": "none"}}
    job, objs = training_objects(spec, attempt=2)
    rj = objs[-1]
    worker = _ray_templates(rj)["worker"]
    [term] = worker["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "nvidia.com/gpu.clique"
    assert term["labelSelector"]["matchLabels"] == {**builders.labels(job, "training"), builders.ATTEMPT_LABEL: "2"}
    assert placement.KUEUE_REQUIRED_TOPOLOGY not in worker["metadata"]["annotations"]
    assert rj["spec"]["suspend"] is False


@pytest.mark.parametrize("backend", ["none", "volcano", "coscheduling", "kueue"])
def test_rayjob_gang_scheduling_goes_through_kuberay_or_kueue(backend):
    spec = {**JOBS["h100-ray"], "scheduling": {"gang": backend, "queue": "research", "priorityClass": "high"}}
    _, objs = training_objects(spec)
    for obj in objs:
        validate(obj)
    rj = objs[-1]
    assert "PodGroup" not in {o["kind"] for o in objs}, "KubeRay makes the PodGroup of its cluster"
    labels, templates = rj["metadata"]["labels"], _ray_templates(rj)
    expected = {"none": {}, "kueue": {gang.KUEUE_QUEUE_LABEL: "research", gang.KUEUE_PRIORITY_LABEL: "high"},
                "volcano": {gang.KUBERAY_VOLCANO_QUEUE_LABEL: "research", gang.KUBERAY_PRIORITY_LABEL: "high"},
                "coscheduling": {gang.KUBERAY_GANG_LABEL: "true"}}[backend]
    assert expected.items() <= labels.items()
    assert rj["spec"]["suspend"] is (backend == "kueue")
    for template in templates.values():
        assert "schedulerName" not in template["spec"], "KubeRay names the scheduler on the pods it makes"
        assert template["spec"].get("priorityClassName") == (None if backend == "kueue" else "high")


# -- the API: CRD, values schema, examples -----------------------------------------------------------------


def test_chart_crd_and_values_schema_are_generated():
    assert (CHART / "crds" / "trainjobs.wam.dev.yaml").read_text() == crd.render(), "run `make generate`"
    assert (CHART / "values.schema.json").read_text() == render_values_schema(), "run `make generate`"


@pytest.fixture(scope="module")
def trainjob_schema() -> dict:
    return json_schema(crd.trainjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_examples_validate_against_the_crd_and_fit_their_gpus(example, trainjob_schema):
    obj = yaml.safe_load((ROOT / "examples" / example).read_text())
    jsonschema.validate(obj, trainjob_schema)
    job = trainjob.parse(obj)
    cfg = trainjob.training_config(job, OperatorSettings().platform())
    assert cfg.training.nodes == job.spec.resources.nodes


def test_crd_schema_refuses_bad_specs(trainjob_schema):
    good = yaml.safe_load((ROOT / "examples" / "tiny-smoke.yaml").read_text())
    for path, value in [(("resources", "accelerator"), "TPU"), (("resources", "nodes"), 0),
                        (("scheduling", "gang"), "slurm"), (("handoff", "quantize"), "sometimes"),
                        (("failurePolicy", "restartOn"), ["Always"]), (("resources", "nodez"), 2)]:
        bad = yaml.safe_load(yaml.safe_dump(good))
        target = bad["spec"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, trainjob_schema)


def test_capacity_check_names_the_fix():
    job = make_job({**JOBS["h100"], "config": {"training": {"activation_checkpointing": "none"}},
                    "resources": {"accelerator": "h100", "nodes": 1, "gpusPerNode": 1}})
    with pytest.raises(trainjob.ConfigError, match="(?i)memory"):
        trainjob.training_config(job, OperatorSettings().platform())


# -- the Helm chart ----------------------------------------------------------------------------------------


CHART_VARIANTS = {
    "defaults": (),
    "nightly-external-mlflow": ("--set", "nightly.enabled=true", "--set", "mlflow.enabled=false",
                                "--set", "mlflow.trackingUri=https://mlflow.example.com",
                                "--set", "settings.gang=volcano", "--set", "settings.secretRefs={wam-s3}"),
}


MONITORED = ("--set", "monitoring.enabled=true", "--set", "monitoring.labels.release=kube-prometheus-stack")


def test_chart_lints():
    helm("lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION)
    helm("lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, *CHART_VARIANTS["nightly-external-mlflow"])


@pytest.mark.parametrize("variant", list(CHART_VARIANTS))
def test_chart_renders_valid_secure_objects(variant):
    docs = render_chart(*CHART_VARIANTS[variant])
    kinds = [d["kind"] for d in docs]
    assert "Deployment" in kinds and "ClusterRole" in kinds
    assert ("CronJob" in kinds) == (variant != "defaults")
    assert ("PersistentVolumeClaim" in kinds) == (variant == "defaults")
    assert any(d["kind"] == "Pod" and d["metadata"]["annotations"]["helm.sh/hook"] == "test" for d in docs)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        for pod in _pod_specs(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], (doc["kind"], c["name"])
                assert "limits" in c["resources"] and "memory" in c["resources"]["limits"]


def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "Pod":
        return [doc["spec"]]
    if doc["kind"] in ("Deployment", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def test_chart_monitors_every_policy_server_and_the_operator():
    """monitoring.enabled: a PodMonitor selecting the serving pods the operator makes, on their port, in the namespaces
    it watches; a ServiceMonitor of the operator's metrics Service; the alerts: each valid against the Prometheus
    Operator's published CRDs and labelled for the Prometheus that selects them. Off by default."""
    assert not {"PodMonitor", "ServiceMonitor", "PrometheusRule"} & {d["kind"] for d in render_chart()}
    docs = render_chart(*MONITORED, "--set", "settings.namespaces={robots}")
    by_kind = {d["kind"]: d for d in docs}
    for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule"):
        validate(by_kind[kind])
        assert by_kind[kind]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pods = by_kind["PodMonitor"]["spec"]
    assert pods["namespaceSelector"] == {"matchNames": ["robots"]}
    for key in ("h100", "gb200"):
        serving = next(o for o in children(key) if o["kind"] == "Deployment")["spec"]["template"]
        assert pods["selector"]["matchLabels"].items() <= serving["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in serving["spec"]["containers"][0]["ports"]}
        assert {p["port"] for p in pods["podMetricsEndpoints"]} <= set(ports)
        # ... and a Prometheus without the operator finds them by the conventional annotations
        assert serving["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
                                                      "prometheus.io/port": str(ports["policy"])}
    training = next(o for o in children("h100") if o["kind"] == "JobSet")  # other components are not scraped
    assert not pods["selector"]["matchLabels"].items() <= training["metadata"]["labels"].items()
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-operator-metrics"))
    monitor = by_kind["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert not {d["kind"] for d in render_chart(*MONITORED, "--set", "monitoring.rules=false")} & {"PrometheusRule"}
    assert {d["kind"]: d for d in render_chart(*MONITORED)}["PodMonitor"]["spec"]["namespaceSelector"] == {"any": True}
    dashboards = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboards"))
    kubernetes_validate.validate(dashboards, KUBE_VERSION, strict=True)
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar loads
    dashboard = json.loads(dashboards["data"]["wam-policy-servers.json"])
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and all("gridPos" in p for p in panels)
    assert all(t["expr"] and t["refId"] and t["datasource"]["uid"] == "${datasource}"
               for p in panels for t in p.get("targets", []))
    queries = dashboard_queries().values()
    assert queries and not any("$" in q for q in queries)
    assert not any(d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboards")
                   for d in render_chart(*MONITORED, "--set", "monitoring.dashboard=false"))
    helm("lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, *MONITORED)


def test_the_fleet_alerts_fire_on_what_they_name_and_read_metrics_that_exist(tmp_path):
    """The PrometheusRule's alerts, rendered by helm, pass `promtool check rules` and promtool's unit tests
    (tests/alerts/fleet.test.yaml: each fires on its series, and not on a near miss); the operator metrics they read
    are the operator's (the policy servers' are checked against a real server's /metrics in tests/test_serve.py)."""
    from prometheus_client import REGISTRY, generate_latest

    from wam.operators import metrics  # noqa: F401 - registers the operator's metrics

    groups = alert_rules()
    rules, firing = tmp_path / "wam-alerts.yaml", tmp_path / "firing.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))  # checked whole, annotations' templates included
    firing.write_text(yaml.safe_dump({"groups": [  # the unit tests compare labels: without the prose
        {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]} for g in groups]}))
    tests = tmp_path / "fleet.test.yaml"
    tests.write_text((ROOT / "tests" / "alerts" / "fleet.test.yaml").read_text().replace("[RULES]", f"[{firing}]"))
    for args in (("check", "rules", str(rules)), ("test", "rules", str(tests))):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    exported = generate_latest(REGISTRY).decode()
    read = alert_metrics("wam_operator_")
    assert read and all(f"# TYPE {name} " in exported for name in read)


def test_chart_rbac_is_least_privilege():
    role = next(d for d in render_chart() if d["kind"] == "ClusterRole")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "update" not in rule["verbs"], "the operator only merge-patches"
    granted = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert ("", "secrets") not in granted, "the operator never reads secrets: pods reference them by name"
    assert granted[("", "pods")] == {"list"}, "no exec, no log reading: progress comes from the job itself"
    assert granted[("wam.dev", "trainjobs/status")] == {"patch"}
    assert granted[("ray.io", "rayjobs")] == granted[("jobset.x-k8s.io", "jobsets")] == {
        "list", "watch", "create", "patch", "delete"}


def test_chart_settings_load_as_operator_settings(tmp_path):
    docs = render_chart(*CHART_VARIANTS["nightly-external-mlflow"])
    settings_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-settings"))
    path = tmp_path / "settings.yaml"
    path.write_text(settings_map["data"]["settings.yaml"])
    settings = load_settings(path)
    assert settings.accelerators == OperatorSettings().accelerators, "values.yaml profiles drifted from the code's"
    assert (settings.gang, settings.secret_refs) == ("volcano", ["wam-s3"])
    assert settings.mlflow.tracking_uri == "https://mlflow.example.com"
    nightly = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-nightly"))
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(nightly["data"]["suite.yaml"])
    loaded = suite.load_suite(suite_file)  # what `wam regress` in the CronJob reads
    job = trainjob.TrainJob(name=suite.run_name(loaded), namespace="wam", spec=suite.with_overrides(loaded, []))
    trainjob.training_config(job, settings.platform())


def test_chart_nightly_suite_can_include_closed_loop_simulation(tmp_path):
    sim = ("--set-json", 'nightly.suite.eval={"windows": 16, "sim": {"tasks": ["reach-v3"], "episodes": 20, "size": 64}}',
           "--set-json", 'nightly.suite.metrics=[{"name": "reach_success", "key": "sim/metaworld/success_rate", '
                         '"better": "higher", "relative": false, "tolerance": 0.15}]')
    docs = render_chart(*CHART_VARIANTS["nightly-external-mlflow"], *sim)
    nightly = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-nightly"))
    (tmp_path / "suite.yaml").write_text(nightly["data"]["suite.yaml"])
    loaded = suite.load_suite(tmp_path / "suite.yaml")  # what `wam regress` in the CronJob reads
    assert loaded.eval.open_loop and (loaded.eval.sim.tasks, loaded.eval.sim.episodes) == (["reach-v3"], 20)
    assert loaded.metrics[0].key == "sim/metaworld/success_rate"
    bad = subprocess.run([str(HELM), "template", "wam", str(CHART), "--kube-version", KUBE_VERSION,
                          *CHART_VARIANTS["nightly-external-mlflow"], "--set-json",
                          'nightly.suite.eval={"sim": {"tasks": ["reach-v3"], "episodes": 0}}'],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "/nightly/suite/eval/sim/episodes" in bad.stderr


def test_nightly_cronjob_runs_the_regression_suite():
    docs = render_chart(*CHART_VARIANTS["nightly-external-mlflow"], "--set", "nightly.updateBaseline=true")
    cron = next(d for d in docs if d["kind"] == "CronJob")
    job = cron["spec"]["jobTemplate"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    assert container["command"][:3] == ["wam", "regress", "/etc/wam-nightly/suite.yaml"]
    assert {"--namespace=wam", "--update-baseline"} <= set(container["command"])
    assert container["image"] == OperatorSettings().trainer_image, "evaluation needs the trainer image (torch)"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert container["envFrom"] == [{"secretRef": {"name": "wam-s3"}}]  # reads the final checkpoint
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [1, 2], "a regression is not retried"
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-nightly"))
    assert role["rules"] == [{"apiGroups": ["wam.dev"], "resources": ["trainjobs"], "verbs": ["create", "get"]}]
    plain = render_chart(*CHART_VARIANTS["nightly-external-mlflow"])
    assert "--update-baseline" not in next(d for d in plain if d["kind"] == "CronJob")[
        "spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]


def test_chart_refuses_bad_values():
    for sets, message in [(("--set", "settings.gang=slurm"), "settings/gang"),
                          (("--set", "settings.acceleratorz.x=1"), "acceleratorz"),
                          (("--set", "mlflow.enabled=false"), "mlflow.trackingUri"),
                          (("--set", "nightly.suite.trainJob.resources.nodes=0"), "/nightly/suite/trainJob/resources/nodes"),
                          (("--set", "nightly.suite.name=Nightly_Suite"), "/nightly/suite/name")]:
        done = subprocess.run([str(HELM), "template", "wam", str(CHART), "--kube-version", KUBE_VERSION, *sets],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stderr, done.stderr


# -- images ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,extra", [("trainer", "trainer"), ("operator", "operator")])
def test_dockerfiles_follow_the_rules(name, extra):
    text = "\n".join(line for line in (ROOT / "dockerfiles" / f"{name}.Dockerfile").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases and all(":" in b and not b.endswith((":latest", ":stable")) for b in bases), bases
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert re.search(rf'pip install "\.\[{extra}\]"', text), f"installs the {extra} extra"
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    assert all(re.search(rf"^COPY {f} {f}$", text, re.M) for f in folders), f"copies every code folder: {folders}"
    assert not re.search(r"^(ENV|ARG)\s+\S*(KEY|SECRET|TOKEN|PASSWORD)", text, re.M | re.I), "no secrets baked in"
    if name == "operator":
        assert "torch" not in text, "the operator image stays slim"
