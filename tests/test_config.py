"""Config loading and preset validation: bad input fails with a message that says what to fix."""

import pytest

from wam.platform.config import load_config, resolve_preset
from wam.platform.errors import ConfigError
from wam.platform.presets import get_preset

from conftest import REPO


def test_defaults_resolve_to_the_tiny_preset():
    cfg = load_config()
    assert cfg.model.preset == "tiny"
    assert resolve_preset(cfg).arch.dim == 64


def test_yaml_and_overrides_layer_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\n  num_layers: 3\nflow:\n  schedule: flash\n")
    cfg = load_config(path, ["model.num_layers=4", "sample.num_chunks=2"])
    preset = resolve_preset(cfg)
    assert (preset.arch.num_layers, preset.sample.num_chunks, cfg.flow.schedule) == (4, 2, "flash")


def test_serving_compile_off_means_off_in_yaml_and_overrides(tmp_path):
    """YAML reads a bare off as false; the setting still means "off" (not the refused string "False")."""
    path = tmp_path / "c.yaml"
    path.write_text("serving: {compile: off}\n")
    assert load_config(path).serving.compile == "off"
    assert load_config(None, ["serving.compile=on"]).serving.compile == "on"


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  preset: tiny\n  nmu_layers: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "nmu_layers" in str(err.value) and "bad.yaml" in str(err.value)


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="num_layers"):
        load_config(None, ["model.num_layers=many"])


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="dreamzero-14b"):
        load_config(None, ["model.preset=dreamzero-15b"])


def test_dims_not_divisible_by_heads_suggests_head_counts():
    with pytest.raises(ConfigError) as err:
        get_preset("tiny", dim=100, num_heads=3)
    message = str(err.value)
    assert "not divisible" in message and "num_heads" in message and "[" in message


def test_head_dim_too_small_for_3d_rope():
    with pytest.raises(ConfigError, match="3D RoPE"):
        get_preset("tiny", dim=64, num_heads=16)


@pytest.mark.parametrize("override, fragment", [
    ("model.attention=dense", "model.attention"),
    ("flow.schedule=linear", "flow.schedule"),
    ("sampler.steps=0", "sampler.steps"),
    ("flow.flash_video_beta=[7,0]", "flash_video_beta"),
    ("sample.latent_height=7", "patch size"),
    ("sample.num_chunks=0", "num_chunks"),
])
def test_bad_values_are_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    resolve_preset(load_config(path))


@pytest.mark.parametrize("request_keys, message", [
    ({"observation.state": ["a", "a"]}, r"request_keys \['a'\] stand for more than one camera or state key"),
    ({"cam": ["observation.state"]}, r"request_keys \['observation.state'\] stand for more than one"),
    ({"cam": ["a", "b"]}, r"a camera is sent under one request key; request_keys gives cam \['a', 'b'\]"),
    ({"cam": [""]}, r"request_keys must map each key to a list of non-empty strings"),
])
def test_a_profiles_request_keys_are_checked(request_keys, message):
    """request_keys (wam.platform.embodiment): each stands for one camera or state key, a camera's is one key."""
    from wam.platform.embodiment import profile_from_fields

    profile = profile_from_fields("mine", {"cameras": ["cam"], "layout": "single", "state_keys": ["observation.state"],
                                           "request_keys": request_keys})
    with pytest.raises(ConfigError, match=rf"profile mine: {message}"):
        profile.validate(8)


def test_a_request_key_stands_in_only_where_all_its_parts_were_sent():
    from wam.platform.embodiment import BUILTIN_PROFILES

    droid = BUILTIN_PROFILES["droid"]
    joints, gripper = "observation/joint_position", "observation/gripper_position"
    assert droid.request_sources("observation.state", {joints: 0, gripper: 0}) == (joints, gripper)
    assert droid.request_sources("observation.state", {joints: 0}) is None
    assert droid.request_sources("observation.state", {"observation.state": 0, joints: 0}) == ("observation.state",)
