import contextlib
import dataclasses
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from wam.platform.config import SamplerSection
from wam.platform.launch import free_port  # noqa: F401 - the tests' too
from wam.platform.presets import get_preset

# Without a GPU the Triton attention kernels run in Triton's interpreter, which must be chosen before Triton
# is first imported (tests/test_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Traced plans (`wam plan`) that admission checks read: the tests' own, never a user's ~/.cache, and none of a
# test's left behind for the next run.
os.environ["WAM_PLAN_CACHE"] = tempfile.mkdtemp(prefix="wam-test-plans-")

REPO = Path(__file__).resolve().parents[1]


# `make test` runs the modules on two pytest-xdist workers: a module's tests on one worker (--dist loadfile, so
# module fixtures are built once), modules handed out in the order collected (--no-loadscope-reorder), the next one
# to a worker as soon as it has two tests left. The longest modules go first, so that no worker is left alone with a
# long one at the end; these are those of a minute or more, by their summed test time in a fresh clone's run
# (2026-12-06: training ~8 min, benchmarks ~5, real pods and Ray ~4, serving, regression and evaluation ~3 each).
LONGEST_FIRST = ("tests/test_training.py", "tests/test_benchmarks.py", "tests/test_real_pods.py",
                 "tests/test_ray_launcher.py", "tests/test_serve.py", "tests/test_regress.py", "tests/test_eval.py",
                 "tests/test_kernels.py", "tests/test_engine.py", "tests/test_sim.py", "tests/test_local_submit.py",
                 "tests/test_sandbox.py", "tests/test_quantize.py")


def pytest_collection_modifyitems(config, items):
    """The longest modules first; tests marked `gpu` run only where CUDA exists, elsewhere they are skipped."""
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: a module stays in order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    return get_preset("tiny")


# A session of the serving engine's tests (tests/test_engine.py, and on CUDA tests/test_gpu_engine.py, which must not
# import the server's dependencies: the GPU machine lacks them): guided UniPC with the DiT cache.
GUIDED_SAMPLER = SamplerSection(solver="unipc", steps=4, guidance=3.0, dit_cache="static", dit_passes=3)


def session_rollout(model, sampler: SamplerSection, seed: int, observed: int, batch: int = 1, device: str = "cpu",
                    denoiser=None):
    """A rollout with the first frame and `observed` chunks in its cache (a compiled `denoiser`'s: in its pool),
    and a state to act on."""
    from wam.trainer.inference import ChunkRollout
    from wam.trainer.model import WamInputs

    net, preset = model
    s = preset.sample
    x = WamInputs.random(preset.arch, s, batch=batch, seed=seed, device=device)
    r = ChunkRollout(net, sampler, s, denoiser=denoiser,
                     negative_text=WamInputs.random(preset.arch, s, seed=100 + seed, device=device).text[:1])
    r.reset(x.video[:, :, :1], x.text, x.image, x.i2v_cond)
    f = s.frames_per_chunk
    for c in range(observed):
        r.observe(x.video[:, :, 1 + c * f:1 + (c + 1) * f])
    return r, x.state[:, 0]


def seeded_generator(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def random_inputs(arch, sample, batch=2, seed=0):
    from wam.trainer.model import WamInputs

    return WamInputs.random(arch, sample, batch, seed)


def randomized_model(arch, sample, seed=0, attention="sdpa"):
    """A tiny model with every parameter random (the zero-initialised output head would hide errors)."""
    from wam.trainer.model import build_model, model_config

    model = build_model(model_config(arch, sample, attention), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:  # fan-in scaled, so activations stay O(1) through the blocks
                p.copy_(torch.randn(p.shape, generator=g) * (p.numel() / p.shape[0]) ** -0.5)
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture
def arch_with(tiny):
    def make(**overrides):
        return dataclasses.replace(tiny.arch, **overrides)
    return make


def wan_i2v_keys(dim, ffn, layers, in_dim, out_dim, text_dim, freq_dim, image_dim=1280, image=True,
                 patch=(1, 2, 2)) -> dict[str, tuple[int, ...]]:
    """Every DiT key of a Wan2.1 checkpoint with its shape, written out from Wan's published model code
    (independently of our modules, so a renamed parameter of ours shows up as a mismatch)."""
    d = dim
    keys = {
        "patch_embedding.weight": (d, in_dim, *patch), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, text_dim), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, freq_dim), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d), "head.head.weight": (out_dim * patch[0] * patch[1] * patch[2], d),
        "head.head.bias": (out_dim * patch[0] * patch[1] * patch[2],),
    }
    if image:
        keys.update({
            "img_emb.proj.0.weight": (image_dim,), "img_emb.proj.0.bias": (image_dim,),
            "img_emb.proj.1.weight": (image_dim, image_dim), "img_emb.proj.1.bias": (image_dim,),
            "img_emb.proj.3.weight": (d, image_dim), "img_emb.proj.3.bias": (d,),
            "img_emb.proj.4.weight": (d,), "img_emb.proj.4.bias": (d,),
        })
    for i in range(layers):
        b = f"blocks.{i}."
        keys[b + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                keys[f"{b}{attn}.{proj}.weight"] = (d, d)
                keys[f"{b}{attn}.{proj}.bias"] = (d,)
            keys[f"{b}{attn}.norm_q.weight"] = (d,)
            keys[f"{b}{attn}.norm_k.weight"] = (d,)
        if image:
            for proj in ("k_img", "v_img"):
                keys[f"{b}cross_attn.{proj}.weight"] = (d, d)
                keys[f"{b}cross_attn.{proj}.bias"] = (d,)
            keys[b + "cross_attn.norm_k_img.weight"] = (d,)
        keys[b + "norm3.weight"] = (d,)
        keys[b + "norm3.bias"] = (d,)
        keys[b + "ffn.0.weight"] = (ffn, d)
        keys[b + "ffn.0.bias"] = (ffn,)
        keys[b + "ffn.2.weight"] = (d, ffn)
        keys[b + "ffn.2.bias"] = (d,)
    return keys


# -- training runs --------------------------------------------------------------------------------------

def write_run_config(directory, name, **sections):
    """A YAML config for a tiny training run under `directory`; sections are dicts of overrides."""
    import yaml

    config = {"name": name, "output_dir": str(directory / "runs"), "model": {"preset": "tiny"},
              "training": {"steps": 6, "processes": 2, "lr": 0.003, "batch_size": 2, "warmup_steps": 2},
              "checkpoint": {"interval": 2, "keep": 0}}
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wam_cli(*args, env=None, timeout=600, cwd=None):
    """Run the `wam` console script of this environment."""
    import os
    import subprocess

    wam = Path(sys.executable).parent / "wam"
    return subprocess.run([str(wam), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def progress(run_dir):
    """{step: record} from a run's progress file (the last record wins for a step logged twice)."""
    import json

    path = run_dir / "progress.jsonl"
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def step_losses(run_dir) -> dict[int, float]:
    """{step: loss} from a run's progress file."""
    return {step: r["loss"] for step, r in progress(run_dir).items()}


# The run the SIGKILL tests interrupt (torchrun in test_training, Ray in test_ray_launcher): both compare
# with the same uninterrupted torchrun run of it.
# Prompt dropout on: its draws, like the noise, must repeat exactly in a resumed run. Packed windows of 1..K
# chunks: which windows share a sequence, and the per-real-token loss over ranks, must repeat too.
INTERRUPTED_RUN = {"training": {"steps": 16}, "checkpoint": {"interval": 4, "keep": 0}, "flow": {"prompt_dropout": 0.5},
                   "data": {"packing": True}}


def once_per_run(tmp_path_factory, name: str, compute):
    """compute(folder)'s JSON result, computed once for the whole `make test` run: the first pytest-xdist worker to
    ask computes it while any other waits for it (modules on different workers would each compute it otherwise)."""
    import json

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the run's folder, above the workers'
    result = root / f"{name}.json"
    with FileLock(f"{result}.lock"):
        if not result.exists():  # a folder of its own for each try: a worker may try again after another's failed
            result.write_text(json.dumps(compute(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root)))))
        return json.loads(result.read_text())


@pytest.fixture(scope="session")
def uninterrupted_losses(tmp_path_factory) -> dict[int, float]:
    """{step: loss} of INTERRUPTED_RUN trained to the end under torchrun (its SIGKILL tests run on both workers)."""
    from wam.platform.config import load_config

    def train(folder: Path) -> dict[int, float]:
        config = write_run_config(folder, "uninterrupted", **INTERRUPTED_RUN)
        result = wam_cli("train", config)
        assert result.returncode == 0, result.stdout + result.stderr
        return step_losses(load_config(config).run_dir)

    losses = {int(step): loss for step, loss in once_per_run(tmp_path_factory, "uninterrupted", train).items()}
    assert sorted(losses) == list(range(1, 17))
    return losses


def run_benchmark(script: str, tmp_path, *args: str) -> dict:
    """Run a script of benchmarks/ (a smoke run: the arguments keep it short); returns its --json output."""
    import json
    import subprocess

    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--json", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())


def load_factor() -> float:
    """How much slower than idle this machine is right now: 1 when idle, up to 6 when its cores are busy (the load
    average per core). Tests stretch their deadlines by it: a busy machine is slow, not broken."""
    return min(6.0, max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1)))


def wait_for(what, timeout: float = 60.0, every: float = 0.1):
    """Poll `what` until it returns something truthy, and return that. The deadline is `timeout` seconds on an idle
    machine and stretches with the load while waiting (`load_factor`)."""
    start = time.monotonic()
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() - start > timeout * load_factor():
            raise AssertionError(f"timed out after {time.monotonic() - start:.0f} s (load {os.getloadavg()[0]:.1f}) "
                                 f"waiting for {what.__doc__ or what}")
        time.sleep(every)


def waiting_together(encoder, sessions: list) -> tuple[dict, list[int]]:
    """Each of `sessions` (callables) in its own thread, all started while another request holds the server's
    BatchedEncoder, so that all wait for it together: their results (or ValueErrors) by index, and the batch of each
    VAE encoder call meanwhile."""
    import threading

    results, calls = {}, []

    def session(i: int) -> None:
        with torch.no_grad():
            try:
                results[i] = sessions[i]()
            except ValueError as err:
                results[i] = err

    def waiting() -> bool:
        """every session's work waiting for the encoders"""
        return encoder.waiting == len(sessions)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(sessions))]
    hook = encoder.encoders.vae.encoder.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    try:
        with encoder.lock:  # another request's work: what arrives meanwhile waits for it together
            for t in threads:
                t.start()
            wait_for(waiting, every=0.01)
        for t in threads:
            t.join(120)
    finally:
        hook.remove()
    assert not any(t.is_alive() for t in threads) and encoder.waiting == 0
    return results, calls


CHART = REPO / "helm" / "wam-platform"
HELM = Path(sys.executable).parent / "helm"  # installed by `make setup`
KUBE_VERSION = "1.33.0"  # the oldest Kubernetes the chart supports with DRA ComputeDomains


def helm(*args: str) -> str:
    """The real helm that `make setup` installs next to this interpreter."""
    import subprocess

    done = subprocess.run([str(HELM), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@functools.cache  # rendered once per test process; callers only read it
def alert_rules() -> list[dict]:
    """The rule groups of the chart's PrometheusRule (monitoring.enabled)."""
    docs = render_chart("--set", "monitoring.enabled=true")
    return next(d for d in docs if d["kind"] == "PrometheusRule")["spec"]["groups"]


def alert_metrics(prefix: str) -> set[str]:
    """The metrics whose names start with `prefix` that the chart's alerts read (a histogram's by its own name)."""
    import re

    names = {name for group in alert_rules() for rule in group["rules"]
             for name in re.findall(rf"\b{prefix}[a-z_]+", rule["expr"])}
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}


def dashboard_queries() -> dict[str, str]:
    """The PromQL of every target of the chart's Grafana dashboard, {"panel title/refId": query}, with Grafana's
    variables as a query over every namespace and TrainJob would set them."""
    import json

    dashboard = json.loads((CHART / "dashboards" / "wam-policy-servers.json").read_text())
    values = {"$namespace": ".*", "$trainjob": ".*", "$__rate_interval": "1m"}
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            query = target["expr"]
            for name, value in values.items():
                query = query.replace(name, value)
            queries[f"{panel['title']}/{target['refId']}"] = query
    return queries


@contextlib.contextmanager
def prometheus(folder: Path, targets: dict[str, int], rules: list[dict]):
    """A real Prometheus (Debian's, which `make setup` installs) scraping `targets` ({pod name: a loopback port},
    labelled as the chart's PodMonitor labels them) every second, evaluating the rule groups `rules` every second;
    yields a function of an HTTP API path (e.g. "/api/v1/alerts") that returns its JSON "data"."""
    import json
    import subprocess
    import urllib.request

    import yaml

    (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": rules}))
    (folder / "prometheus.yaml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(folder / "rules.yaml")],
        "scrape_configs": [{"job_name": "policy", "static_configs": [
            {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": "robots", "pod": pod}}
            for pod, port in targets.items()]}]}))
    port = free_port()
    with open(folder / "prometheus.log", "w") as log:
        process = subprocess.Popen(["prometheus", f"--config.file={folder / 'prometheus.yaml'}",
                                    f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                   stdout=log, stderr=subprocess.STDOUT)

    def api(path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return json.load(r)["data"]

    def ready() -> bool:
        """Prometheus ready"""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            assert process.poll() is None, (folder / "prometheus.log").read_text()
            return False

    try:
        wait_for(ready, timeout=60, every=0.2)
        yield api
    finally:
        process.terminate()
        process.wait(timeout=30)


def render_chart(*sets: str, namespace: str = "wam") -> list[dict]:
    """The chart's objects, rendered by helm with `--set`-style arguments."""
    import yaml

    out = helm("template", "wam", str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION, *sets)
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (moto) on loopback with one bucket; yields the client environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="wam-checkpoints")
    yield env
    server.stop()


def write_checkpoint(folder, cfg, model, step=5):
    """A complete checkpoint as training writes it (DCP folder + manifest written last), from a model in
    this process; returns the step folder."""
    import dataclasses
    import warnings

    import torch.distributed.checkpoint as dcp

    from wam.platform.checkpoints import step_dir, write_manifest

    path = step_dir(str(folder), step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(model.state_dict(), checkpoint_id=path, no_dist=True)
    write_manifest(path, step, dataclasses.asdict(cfg), {"loss": 1.0})
    return path


def quantized_synthetic_model(folder, name: str, seed: int = 5):
    """A random tiny model of procedural latents, checkpointed and quantized: (quantized folder, preset)."""
    from wam.platform.config import load_config, resolve_preset
    from wam.trainer.quantize.quantizer import quantize_checkpoint

    cfg = load_config(None, [f"name={name}", "data.source=synthetic", f"output_dir={folder}/runs"])
    preset = resolve_preset(cfg)
    checkpoint = write_checkpoint(folder / "checkpoints", cfg, randomized_model(preset.arch, preset.sample, seed=seed))
    return quantize_checkpoint(checkpoint).out, preset


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (sqlite store, served artifacts); yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    import subprocess

    import requests

    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"

    def up():
        try:
            return requests.get(f"{uri}/health", timeout=1).ok
        except requests.RequestException:  # refused, or too slow to answer on a loaded machine
            return False

    wait_for(up, timeout=90, every=0.5)
    yield uri
    proc.terminate()
    proc.wait(30)
