"""What a config asks of its datasets, checked against their metadata before anything starts (torch-free).

Every config value that indexes data — the profile's cameras, state and action keys, relative dims, explicit
action limits and gripper dims — is checked against the LeRobot dataset's own
`meta/info.json` (feature names, dtypes, shapes), which is small and readable wherever the data is (local or any
fsspec URI). `wam train` and the training processes, `wam quantize`, `wam submit` and the operator call
`check_datasets`; `wam serve` checks the same rules against the statistics a quantized model carries.
"""

from __future__ import annotations

import json
import math

from wam.platform.config import WamConfig, resolve_preset
from wam.platform.embodiment import EmbodimentProfile, resolve_profile
from wam.platform.errors import ConfigError
from wam.platform.storage import filesystem, join


class DatasetUnreadable(ConfigError):
    """The dataset's metadata could not be read from here (credentials, network): not known to be wrong."""


def read_features(uri: str) -> dict[str, dict]:
    """The features of a LeRobot dataset (its meta/info.json), or ConfigError saying why there are none."""
    return read_info(uri)["features"]


def read_info(uri: str) -> dict:
    """A LeRobot dataset's meta/info.json (features, fps, ...), or ConfigError saying why it cannot be read."""
    info_uri = join(uri, "meta", "info.json")
    try:
        fs, path = filesystem(info_uri)
        with fs.open(path, "r") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"dataset {uri}: {info_uri} does not exist; point data.datasets at a LeRobot dataset "
                          "(v2.1 or v3.0) folder or URI") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"dataset {uri}: {info_uri} is not valid JSON ({err})") from None
    except Exception as err:  # noqa: BLE001 - credentials, network, a filesystem's own errors: unreadable from here
        raise DatasetUnreadable(f"dataset {uri}: cannot read {info_uri}: {type(err).__name__}: {err}") from None
    if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
        raise ConfigError(f"dataset {uri}: {info_uri} has no `features` mapping; is it a LeRobot dataset?")
    return info


def action_embodiments(cfg: WamConfig) -> dict[str, tuple[EmbodimentProfile, str]]:
    """The embodiments a model trained on `cfg` is served for: each profile with actions, with its first dataset's
    URI (whose statistics and rate the quantized model records), in the order of data.datasets."""
    if cfg.data.source != "lerobot":
        return {}
    found: dict[str, tuple[EmbodimentProfile, str]] = {}
    for entry in cfg.data.datasets:
        profile = resolve_profile(entry.profile, cfg.data.profiles)
        if profile.has_actions and profile.name not in found:
            found[profile.name] = (profile, entry.uri)
    return found


def control_rates(cfg: WamConfig) -> dict[str, float]:
    """The rate (Hz) each served embodiment was recorded at (its dataset's fps), as the quantized model records it
    for its server; datasets not readable from here, or without an fps, are left out."""
    rates: dict[str, float] = {}
    for name, (_, uri) in action_embodiments(cfg).items():
        try:
            fps = read_info(uri).get("fps")
        except ConfigError:
            continue
        if isinstance(fps, (int, float)) and fps > 0:
            rates[name] = float(fps)
    return rates


def feature_width(features: dict[str, dict], key: str) -> int:
    """How many numbers one frame of feature `key` holds (the product of its shape)."""
    return math.prod(features[key].get("shape") or [1])


def profile_problems(profile: EmbodimentProfile, features: dict[str, dict], state_limit: int,
                     action_limit: int) -> list[str]:
    """What in `profile` does not fit a dataset with these features (empty when it fits)."""
    problems = []
    videos = [k for k, f in features.items() if f.get("dtype") == "video"]
    if missing := [c for c in profile.cameras if c not in videos]:
        problems.append(f"cameras {missing} are not among its video streams {videos}")
    for what, keys in (("state_keys", profile.state_keys), ("action_keys", profile.action_keys)):
        if missing := [k for k in keys if k not in features]:
            problems.append(f"{what} {missing} are not among its features {sorted(features)}")
    if problems:
        return problems
    state = sum(feature_width(features, k) for k in profile.state_keys)
    action = sum(feature_width(features, k) for k in profile.action_keys)
    if state > state_limit:
        problems.append(f"its state has {state} dims; the model takes at most {state_limit}")
    if action > action_limit:
        problems.append(f"its actions have {action} dims; the model takes at most {action_limit}")
    if profile.has_actions and (beyond := [d for d in profile.relative_dims if not 0 <= d < min(action, state)]):
        problems.append(f"relative_dims {beyond} do not exist: the actions have {action} dims and the state {state} "
                        f"(relative dims index both)")
    for what in ("action_low", "action_high", "max_action_step"):
        values = getattr(profile, what)
        if values and len(values) != action:
            problems.append(f"{what} lists {len(values)} values for {action} action dims")
    return problems + gripper_problems(profile, action)


def gripper_problems(profile: EmbodimentProfile, action_dims: int) -> list[str]:
    """The profile's gripper dims that its actions (of `action_dims` dims) do not have."""
    beyond = [d for d in profile.gripper_dims if not 0 <= d < action_dims]
    return [f"gripper_dims {beyond} do not exist: the actions have {action_dims} dims"] if beyond and action_dims else []


def check_datasets(cfg: WamConfig, skip_unreadable: bool = False) -> None:
    """Refuse a config whose datasets do not hold what it indexes: ConfigError listing every problem, with the fix.
    With `skip_unreadable` (the operator, `wam submit`: they may not hold the data's credentials, the pods do), a
    dataset whose metadata cannot be read from here is left to the training processes' own check."""
    if cfg.data.source != "lerobot":
        return
    arch = resolve_preset(cfg).arch
    problems, fixes = [], []
    for entry in cfg.data.datasets:
        profile = resolve_profile(entry.profile, cfg.data.profiles)
        try:
            features = read_features(entry.uri)
        except DatasetUnreadable:
            if skip_unreadable:
                continue
            raise
        found = profile_problems(profile, features, arch.state_dim, arch.action_dim)
        if found:
            fixes.append(f"declare a profile under data.profiles that matches {entry.uri} instead of {profile.name} "
                         "(`wam data inspect URI` lists its streams and features)")
        problems += [f"dataset {entry.uri} (profile {profile.name}): {p}" for p in found]
    if problems:
        raise ConfigError("; ".join(problems) + ". To fix: " + "; ".join(dict.fromkeys(fixes)))
