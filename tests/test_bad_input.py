"""A catalogue of bad input, where it enters: configs, datasets, checkpoints and TrainJobs (the policy server's
requests are in test_serve.py). Each case asserts the message (what is wrong, with the fix), exit code 2 and
no traceback on the command line, and that nothing was written or lost. Fuzzing of config loading at the end."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wam.operators.trainjobs import read_manifest
from wam.platform.checkpoints import latest_complete
from wam.platform.checkpoints import read_manifest as read_checkpoint_manifest
from wam.platform.config import WamConfig, load_config
from wam.platform.errors import CheckpointError, ConfigError
from wam.platform.resume import check_resume

from conftest import randomized_model, wam_cli, write_checkpoint, write_run_config


def words(text: str) -> str:
    return " ".join(text.split())


def refused(*args, message: str, env: dict | None = None, cwd: Path | None = None) -> str:
    """Run `wam ARGS`; it must end with exit code 2, say `message` (a regex over the words of stderr) in a few
    lines, and show no traceback. Returns stderr."""
    done = wam_cli(*args, env=env, cwd=cwd)
    said = words(done.stderr)
    assert done.returncode == 2, (args, done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "╭" not in done.stderr, done.stderr  # no plain or rich traceback
    assert re.search(message, said), (message, said)
    assert len(done.stderr.strip().splitlines()) <= 8, done.stderr
    return said


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small LeRobot dataset, a config training on it, a complete checkpoint of that config and its quantized
    model: the valid inputs every case spoils one thing of."""
    from wam.platform.config import resolve_preset
    from wam.trainer.data.synth_dataset import SynthOptions, synthesize
    from wam.trainer.quantize.quantizer import quantize_checkpoint

    root = tmp_path_factory.mktemp("bad-input")
    dataset = synthesize(root / "data", SynthOptions(episodes=2, seed=3))
    sections = {"sample": {"num_chunks": 2, "actions_per_chunk": 24},
                "data": {"source": "lerobot", "datasets": [{"uri": str(dataset), "profile": "droid"}]}}
    config = write_run_config(root, "good", **sections)
    cfg = load_config(config)
    preset = resolve_preset(cfg)
    checkpoint = write_checkpoint(root / "checkpoints", cfg, randomized_model(preset.arch, preset.sample))
    quantized = quantize_checkpoint(checkpoint).out
    return {"root": root, "dataset": dataset, "sections": sections, "config": config, "cfg": cfg,
            "checkpoint": Path(checkpoint), "quantized": Path(quantized)}


def config_with(data, tmp_path, name="bad", **changes) -> Path:
    """The valid config with sections changed (dicts merge one level deep)."""
    sections = copy.deepcopy(data["sections"])
    for key, value in changes.items():
        sections[key] = {**sections.get(key, {}), **value} if isinstance(value, dict) else value
    return write_run_config(tmp_path, name, **sections)


# -- config files and overrides: `wam train` refuses them before anything starts -------------------------------

CONFIG_FILES = {
    "YAML syntax error": ("model: [\n", r"is not valid YAML at line 2, column 1"),
    "a list": ("- model\n- data\n", r"holds a list; a config is a mapping of sections"),
    "empty": ("", r"is empty: a run needs at least"),
    "a scalar": ("42\n", r"is not a mapping of sections"),
    "unknown key": ("trainig: {steps: 3}\n", r"key 'trainig'"),
    "wrong type": ("training: {lr: fast}\n", r"key 'training.lr'.*could not be converted to Float"),
    "negative steps": ("training: {steps: -1}\n", r"training.steps must be >= 1, got -1"),
    "unknown choice": ("model: {attention: magic}\n", r"model.attention = 'magic' is not one of sdpa, flex, triton"),
    "unknown preset": ("model: {preset: gpt-5}\n", r"gpt-5"),
    "zero sampler steps": ("sampler: {steps: 0}\n", r"sampler.steps must be >= 1"),
    "even smoothing window": ("serving: {smoothing_window: 4}\n", r"serving.smoothing_window must be odd"),
    "gripper dims where they were": ("serving: {gripper_dims: [7]}\n",
                                     r"serving.gripper_dims has moved to the embodiment's profile \(data.profiles"),
    "negative gripper dim": ("data: {source: lerobot, datasets: [{uri: /data/x, profile: mine}], profiles: {mine: "
                             "{cameras: [c], layout: single, state_keys: [s], gripper_dims: [-1]}}}\n",
                             r"profile mine: gripper_dims are action dim indices \(>= 0\), got \[-1\]"),
    "negative margin": ("serving: {action_margin: -1}\n", r"serving.action_margin must be in \[0, 100\]"),
    "idle timeout zero": ("serving: {idle_timeout_s: 0}\n", r"serving.idle_timeout_s must be > 0, got 0"),
    "drain timeout zero": ("serving: {drain_timeout_s: 0}\n", r"serving.drain_timeout_s must be > 0, got 0"),
    "no cpu threads": ("serving: {cpu_threads: 0}\n", r"serving.cpu_threads must be >= 1 \(or unset: measured"),
    "no session memory": ("serving: {session_memory_gib: 0}\n", r"serving.session_memory_gib must be > 0"),
    "batch above sessions": ("serving: {max_batch: 32}\n", r"serving.max_batch must be in \[1, serving.max_sessions = 16\]"),
    "unknown compile mode": ("serving: {compile: maybe}\n", r"serving.compile = 'maybe' is not one of auto, on, off"),
    "unknown compute path": ("serving: {compute: fp2}\n", r"serving.compute = 'fp2' is not one of auto, nvfp4, fp8"),
    "unknown protocol": ("serving: {protocol: grpc}\n", r"serving.protocol = 'grpc' is not one of openpi, roboarena"),
    "request key of no camera": ("data: {source: lerobot, datasets: [{uri: /data/x, profile: mine}], profiles: {mine: "
                                 "{cameras: [c], layout: single, state_keys: [s], request_keys: {d: [obs/d]}}}}\n",
                                 r"profile mine: request_keys names \['d'\], which are not among its cameras or "
                                 r"state_keys \['c', 's'\]"),
    "replicas do not divide": ("training: {processes: 2, dp_replicate: 3}\n", r"training.dp_replicate \(3\) must divide"),
    "lerobot without datasets": ("data: {source: lerobot}\n", r"data.datasets is empty"),
    "name with a slash": ("name: a/b\n", r"name must be a non-empty run name without '/'"),
}


@pytest.mark.parametrize("case", list(CONFIG_FILES))
def test_bad_config_files_are_refused_before_anything_starts(case, tmp_path):
    text, message = CONFIG_FILES[case]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    refused("train", path, message=message, cwd=tmp_path)  # relative run folders would land in tmp_path
    assert not (tmp_path / "runs").exists()


def test_bad_overrides_and_missing_files_are_refused(data, tmp_path):
    refused("train", tmp_path / "nope.yaml", message=r"config file .*nope.yaml does not exist")
    refused("train", data["config"], "training.steps=[1", message=r"override 'training.steps=\[1': its value is not YAML")
    refused("train", data["config"], "steps", message=r"override 'steps' is not key=value")
    refused("train", data["config"], "model.dim=63", message=r"dim|heads")  # not divisible into heads
    assert not data["cfg"].run_dir.exists()


# -- configs against their datasets: checked before torchrun starts, nothing left behind ----------------------

PROFILE = {"cameras": ["observation.images.wrist_left"], "layout": "single", "state_keys": ["observation.state"],
           "action_keys": ["action"], "relative_dims": [0, 1], "action_horizon": 24, "video_stride": 3}
DATASET_CASES = {
    "gripper dim beyond the actions": ({"profiles": {**PROFILE, "gripper_dims": [42]}},
                                       r"gripper_dims \[42\] do not exist: the actions have 8 dims"),
    "relative dim beyond the actions": ({"profiles": {**PROFILE, "relative_dims": [0, 1, 99]}},
                                        r"relative_dims \[99\] do not exist: the actions have 8 dims"),
    "camera the dataset does not have": ({"profiles": {**PROFILE, "cameras": ["observation.images.top"]}},
                                         r"cameras \['observation.images.top'\] are not among its video streams"),
    "state key the dataset does not have": ({"profiles": {**PROFILE, "state_keys": ["observation.joints"]}},
                                            r"state_keys \['observation.joints'\] are not among its features"),
    "actions wider than the model": ({"profiles": {**PROFILE, "action_keys": ["action"] * 5}},
                                     r"its actions have 40 dims; the model takes at most 32"),
    "limits of the wrong length": ({"profiles": {**PROFILE, "action_low": [-1, -1], "action_high": [1, 1]}},
                                   r"action_low lists 2 values for 8 action dims"),
    "missing dataset": ({"uri": "/nonexistent/droid"}, r"/nonexistent/droid/meta/info.json does not exist; point "
                                                       r"data.datasets at a LeRobot dataset"),
}


@pytest.mark.parametrize("case", list(DATASET_CASES))
def test_configs_that_do_not_fit_their_data_are_refused_before_training_starts(case, data, tmp_path):
    change, message = DATASET_CASES[case]
    sections = copy.deepcopy(data["sections"])
    if "profiles" in change:
        sections["data"]["profiles"] = {"mine": change["profiles"]}
        sections["data"]["datasets"][0]["profile"] = "mine"
    if "uri" in change:
        sections["data"]["datasets"][0]["uri"] = change["uri"]
    config = write_run_config(tmp_path, "misfit", **sections)
    refused("train", config, message=message)
    assert not (tmp_path / "runs").exists(), "nothing may be left behind"


def test_a_dataset_whose_metadata_is_broken_is_refused(data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(data["dataset"], broken)
    (broken / "meta" / "info.json").write_text("{not json")
    sections = copy.deepcopy(data["sections"])
    sections["data"]["datasets"][0]["uri"] = str(broken)
    refused("train", write_run_config(tmp_path, "broken", **sections), message=r"info.json is not valid JSON")


def test_statistics_that_do_not_fit_the_dataset_are_refused(data, tmp_path):
    from wam.platform.config import resolve_preset
    from wam.platform.embodiment import BUILTIN_PROFILES
    from wam.trainer.data.lerobot import DataError
    from wam.trainer.data.robot import RobotSource
    from wam.trainer.data.stats import stats_paths

    copy_of = tmp_path / "data"
    shutil.copytree(data["dataset"], copy_of)
    for stale in (copy_of / "meta").glob("wam_stats.*"):
        stale.unlink()
    path = stats_paths(str(copy_of), BUILTIN_PROFILES["droid"])[0]
    path.write_text(json.dumps({"state_q01": [0.0] * 3, "state_q99": [1.0] * 3, "action_q01": [0.0] * 8,
                                "action_q99": [1.0] * 8}))  # written for another robot
    entry = copy.deepcopy(data["cfg"].data.datasets[0])
    entry.uri = str(copy_of)
    preset = resolve_preset(data["cfg"])
    with pytest.raises(DataError, match=r"hold 3 state and 8 action dims, dataset .* has 8 and 8 .*delete that file"):
        RobotSource([entry], {}, preset.arch, preset.sample, 0)


# -- checkpoints ------------------------------------------------------------------------------------------------


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def test_checkpoint_mistakes_are_named(data, tmp_path):
    checkpoint, quantized = data["checkpoint"], data["quantized"]
    before = digest(quantized)
    refused("quantize", quantized, message=r"is a quantized model \(from `wam quantize`\), not a training checkpoint: "
                                           r"serve it with `wam serve")
    assert digest(quantized) == before, "quantizing a quantized folder must leave it as it was"
    refused("serve", checkpoint, "--port", "0", message=r"is a training checkpoint, not a quantized model: quantize it "
                                                          r"first with `wam quantize")
    refused("serve", checkpoint.parent, "--port", "0", message=r"is not a complete quantized model \(no manifest.json\); "
                                                                 r"run `wam quantize`")
    refused("eval", quantized, message=r"is a quantized model")
    (tmp_path / "a-file").write_text("")
    refused("serve", quantized, "--port", "0", "--record", tmp_path / "a-file" / "sessions",
            message=r"cannot write to .*a-file/sessions: .*Fix the path or its credentials")
    refused("serve", quantized, "--port", "0", "--protocol", "grpc", message=r"--protocol 'grpc' is not one of openpi, "
                                                                            r"roboarena")
    refused("rerun", checkpoint, message=r"is not a session's recording: it has no session.json \(a recording is "
                                         r"<serving.record>/<embodiment>/<session>/\)")
    refused("export", checkpoint, tmp_path / "x.safetensors", "--dtype", "float16",
            message=r"dtype 'float16' is not one of bfloat16, float32")
    copied = tmp_path / "elsewhere"
    shutil.copytree(checkpoint, copied)
    refused("quantize", copied, message=r"is not a step-N folder .* pass --out")
    assert not (tmp_path / "x.safetensors").exists() and not list(tmp_path.glob("nvfp4*"))


def test_a_busy_port_is_named(data):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused("serve", data["quantized"], "--port", port, message=rf"cannot listen on 127.0.0.1:{port}: .*in use; "
                                                                    r"pick another --port")
    # TEST-NET-1: documentation's addresses, never this machine's
    refused("serve", data["quantized"], "--host", "192.0.2.1", message=r"cannot listen on 192.0.2.1:8000: .*Cannot "
                                                                        r"assign requested address; pick another")


def test_an_attempt_never_rewrites_the_runs_recorded_config(data, tmp_path):
    from wam.app.local_training import prepare

    first = load_config(config_with(data, tmp_path, name="history", output_dir=str(tmp_path / "runs")))
    prepare(first)
    recorded = (first.run_dir / "config.yaml").read_text()
    second = load_config(config_with(data, tmp_path, name="history", output_dir=str(tmp_path / "runs"),
                                     training={"lr": 0.0005}))
    prepare(second)
    assert (first.run_dir / "config.yaml").read_text() == recorded and "lr: 0.003" in recorded
    attempts = sorted((first.run_dir / "attempts").iterdir())
    assert len(attempts) == 2 and "lr: 0.0005" in attempts[-1].read_text()


def test_a_corrupt_newest_manifest_falls_back_to_the_newest_complete_checkpoint(data, tmp_path, caplog):
    series = tmp_path / "series"
    for step in (5, 9):
        shutil.copytree(data["checkpoint"], series / f"step-{step}")
    (series / "step-9" / "manifest.json").write_text('{"step": 9, "files": [')  # a torn write
    assert latest_complete(str(series))[0] == 5 and "passing over" in caplog.text
    with pytest.raises(CheckpointError, match=r"step-9/manifest.json is corrupt"):
        read_checkpoint_manifest(str(series / "step-9"))
    refused("export", series / "step-9", tmp_path / "x.safetensors", message=r"manifest.json is corrupt")
    done = wam_cli("export", series, tmp_path / "y.safetensors")  # the series: its newest *complete* checkpoint
    assert done.returncode == 0 and "exported step 5" in done.stdout, done.stderr


def test_a_resume_that_changes_the_model_is_refused_and_harmless_changes_are_reported(data, tmp_path):
    series = data["checkpoint"].parent
    changed = config_with(data, tmp_path, name="good", model={"dim": 128},
                          checkpoint={"uri": str(series)}, output_dir=str(tmp_path / "runs"))
    said = refused("train", changed, message=r"this run resumes checkpoint .*step-5 \(step 5\), which was trained "
                                             r"differently: model.dim was None, now 128")
    assert "start a new run" in said and not (tmp_path / "runs").exists()
    cfg = load_config(config_with(data, tmp_path, name="good", training={"lr": 0.001},
                                  checkpoint={"uri": str(series)}))
    resume = check_resume(cfg)
    assert resume.step == 5 and resume.changed == {"training.lr": ("0.003", "0.001")}


# -- TrainJobs: `wam submit` refuses what the operator would mark InvalidSpec ----------------------------------

JOB = {"apiVersion": "wam.dev/v1alpha1", "kind": "TrainJob", "metadata": {"name": "ok"},
       "spec": {"model": {"preset": "tiny"}, "config": {"data": {"source": "synthetic"}}}}
TRAINJOB_CASES = {
    "a config value of the wrong type": (lambda o: o["spec"]["config"].update(training={"lr": "fast"}),
                                         r"key 'training.lr'"),
    "a key the spec owns": (lambda o: o["spec"]["config"].update(checkpoint={"uri": "s3://x"}),
                            r"spec.config.checkpoint.uri is set by the platform; use spec.checkpoint.uri"),
    "no datasets": (lambda o: o["spec"]["config"].pop("data"), r"spec.datasets is empty"),
    "serving without quantization": (lambda o: o["spec"].update(handoff={"quantize": "never",
                                                                         "serving": {"replicas": 1}}),
                                     r"serving needs a quantized model"),
    "14B on one H100": (lambda o: o["spec"].update(model={"preset": "dreamzero-14b"},
                                                   resources={"accelerator": "h100", "gpusPerNode": 1}),
                        r"needs ~486.4 GiB per process"),
    "negative steps": (lambda o: o["spec"]["config"].update(training={"steps": -1}), r"training.steps must be >= 1"),
    "spec: null": (lambda o: o.update(spec=None), r"spec: required, a mapping"),
    "an unknown accelerator": (lambda o: o["spec"].update(resources={"accelerator": "tpu"}),
                               r"this installation has no 'tpu' profile"),
    "a name that is not a DNS label": (lambda o: o["metadata"].update(name="My_Job!"), r"is not a DNS label"),
    "a name too long": (lambda o: o["metadata"].update(name="x" * 41), r"longer than 40 characters"),
    "zero nodes": (lambda o: o["spec"].update(resources={"nodes": 0}), r"spec.resources.nodes"),
    "metadata not a mapping": (lambda o: o.update(metadata="ok"), r"metadata: expected a mapping"),
    "another kind": (lambda o: o.update(kind="Job"), r"expected apiVersion wam.dev/v1alpha1 kind TrainJob"),
}


@pytest.mark.parametrize("case", list(TRAINJOB_CASES))
def test_trainjobs_the_operator_would_refuse_are_refused_before_submission(case):
    obj = copy.deepcopy(JOB)
    TRAINJOB_CASES[case][0](obj)
    with pytest.raises(ConfigError, match=TRAINJOB_CASES[case][1]):
        read_manifest(yaml.safe_dump(obj), None)


def test_trainjob_manifests_that_are_not_one_mapping(data, tmp_path):
    with pytest.raises(ConfigError, match=r"not YAML: .*line 1"):
        read_manifest("spec: [", None)
    with pytest.raises(ConfigError, match=r"expected one TrainJob manifest \(a YAML mapping\), got list"):
        read_manifest("- a\n- b\n", None)
    job = copy.deepcopy(JOB)
    job["spec"] = {"model": {"preset": "tiny"}, "datasets": [{"uri": str(data["dataset"]), "profile": "agibot"}],
                   "config": {"sample": {"actions_per_chunk": 48}}}
    with pytest.raises(ConfigError, match=r"profile agibot\): cameras .* are not among its video streams"):
        read_manifest(yaml.safe_dump(job), None)  # what the datasets hold, read from here
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({**JOB, "metadata": {"name": "My_Job!"}}))
    refused("submit", manifest, message=r"metadata.name: 'My_Job!' is not a DNS label",
            env={"KUBECONFIG": str(tmp_path / "no-cluster")})  # refused before any cluster is needed


# -- fuzzing ------------------------------------------------------------------------------------------------------

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12))
_KEYS = st.sampled_from(["name", "model", "training", "data", "serving", "sampler", "flow", "seed", "steps", "lr",
                         "preset", "source", "datasets", "gripper_dims", "processes", "x"])
_TREES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(_KEYS, inner, max_size=4)), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_TREES)
@example(tree={"name": None, "data": {"datasets": {}}})  # found by this test: omegaconf's bare TypeError
@example(tree={"training": {"betas": {}}, "data": []})
@example(tree="0")  # found by this test: a quoted string omegaconf reads as YAML again, and asserts on
def test_config_loading_never_fails_but_with_a_config_error(tree, tmp_path):
    """Any YAML document, however wrong: a WamConfig or a ConfigError, never another exception."""
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        assert isinstance(load_config(path), WamConfig)
    except ConfigError:
        pass


@settings(max_examples=150, deadline=None)
@given(overrides=st.lists(st.text(alphabet="abcdefghilmnoprstuvwxyz._=[]{},:-0123456789 '\"", max_size=30),
                          max_size=3))
def test_overrides_never_fail_but_with_a_config_error(overrides):
    try:
        assert isinstance(load_config(None, overrides), WamConfig)
    except ConfigError:
        pass
